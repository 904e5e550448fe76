"""Probe a file, reject it with a reason, or decode it exactly once, as a stream.

Frames are handed on as yuv420p `av.VideoFrame`s (planar Y, then U and V at half size) at
`max_side`, read through numpy views of their planes (`planes`, `luma`). A source already
yuv420p at that size is handed on as the decoder made it, not copied; a yuv420p one 2, 4,
8, ... times that size is reduced plane by plane with OpenCV's exact halving; any other is
converted once by FFmpeg's scaler. Nothing converts every frame to RGB: cut detection reads
a small copy, flow the luma plane, clip encoding takes the frames as they are, and only a
clip's key frames become RGB (`to_rgb`). Nothing holds the whole video.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from components.curation.config import Decode, Limits

# Rejection reasons, as recorded in rejected.jsonl.
EMPTY = "empty_file"
UNDECODABLE = "undecodable"
NO_VIDEO = "no_video_stream"
TRUNCATED = "truncated"
TOO_LARGE = "resolution_over_limit"
TOO_LONG = "duration_over_limit"
UNSUPPORTED_CODEC = "unsupported_codec"
NOT_A_VIDEO = "not_a_video"  # text (a sidecar: JSON, YAML, CSV, subtitles, a playlist)

# Bytes read to tell text from a media file.
_SNIFF_BYTES = 4096
# Sources up to this many pixels a frame decode on one thread where `Decode.threads` is 0: FFmpeg's
# frame threads cost them more CPU than they save time. On two cores, curating 2-second synthetic
# clips took 0.233 against 0.260 s at 640x360 on one thread, 0.398 against 0.391 s at 854x480.
ONE_THREAD_MAX_PIXELS = 640 * 480
# Decoded frames go from the decoding thread to the caller in batches of this many (a hand-over costs
# microseconds), at most `_AHEAD` batches waiting.
_BATCH = 8
_AHEAD = 4


def is_text(path: str | Path) -> bool:
    """Whether the file begins as text (UTF-8, no control characters but whitespace). Media files
    do not; FFmpeg would read some text as a subtitle or playlist format (a playlist naming other
    files or URLs), so text is never handed to it."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")  # a character cut at the end of what was read
    return all(c.isprintable() or c in "\t\n\r\f" for c in text)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U and V of a yuv420p frame with even sides, as views (writable) without the row padding."""
    w, h = frame.width, frame.height
    y, u, v = frame.planes
    return (
        np.frombuffer(y, np.uint8).reshape(h, y.line_size)[:, :w],
        np.frombuffer(u, np.uint8).reshape(h // 2, u.line_size)[:, : w // 2],
        np.frombuffer(v, np.uint8).reshape(h // 2, v.line_size)[:, : w // 2],
    )


def luma(frame: av.VideoFrame) -> np.ndarray:
    """The Y plane (h, w) of a yuv420p frame, as a view."""
    y = frame.planes[0]
    return np.frombuffer(y, np.uint8).reshape(frame.height, y.line_size)[:, : frame.width]


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(h, w, 3) RGB of a yuv420p frame, with FFmpeg's default conversion (BT.601, limited range)."""
    return cv2.cvtColor(i420_array(frame), cv2.COLOR_YUV2RGB_I420)


def from_rgb(rgb: np.ndarray) -> av.VideoFrame:
    """The yuv420p frame of (h, w, 3) RGB with even sides (OpenCV's conversion: the same luma as
    FFmpeg's, chroma averaged where FFmpeg filters)."""
    return i420_frame(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))


def _limited_yuv_to_rgb() -> np.ndarray:
    """FFmpeg's default conversion of YUV to RGB (BT.601, limited range: Y 16-235, U and V 16-240) as
    one affine map of a (Y, U, V) pixel, for `cv2.transform`: one pass over a three-channel picture,
    a fifth of the cost of stretching each plane to full range by table and converting the stretched
    planes with OpenCV's YCrCb to RGB."""
    y, c = 255 / 219, 255 / 224
    linear = np.array([[y, 0.0, 1.402 * c], [y, -0.344136 * c, -0.714136 * c], [y, 1.772 * c, 0.0]])
    return np.hstack([linear, -linear @ [[16.0], [128.0], [128.0]]]).astype(np.float32)


LIMITED_YUV_TO_RGB = _limited_yuv_to_rgb()


def halve(image: np.ndarray) -> np.ndarray:
    """An exact 2x area reduction (an odd last row or column dropped): OpenCV's fast path, 5-10x
    faster than any other factor."""
    h, w = image.shape[:2]
    return cv2.resize(image[: h & ~1, : w & ~1], (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def reduced_rgb(frame: av.VideoFrame, halvings: int) -> np.ndarray:
    """The frame at 1 / 2**halvings of its size (halvings >= 1) as RGB: luma and chroma reduced by
    area, half by half, to one size (chroma is already half), then converted as `to_rgb` does. A
    small picture for a fraction of the cost of converting the whole frame: the one cut detection
    reads, which it computes for frames in batches (cuts.FrameStatistics, tested equal to this)."""
    y, u, v = planes(frame)
    for _ in range(halvings):
        y = halve(y)
    for _ in range(halvings - 1):
        u, v = halve(u), halve(v)
    rows, cols = min(y.shape[0], u.shape[0]), min(y.shape[1], u.shape[1])
    y, u, v = y[:rows, :cols], u[:rows, :cols], v[:rows, :cols]
    return cv2.transform(cv2.merge([y, u, v]), LIMITED_YUV_TO_RGB)


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled to at most `max_side` on the longer side, both even."""
    scale = min(1.0, max_side / max(width, height))
    return _even(width * scale), _even(height * scale)


def _i420_planes(i420: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = i420.shape[0] * 2 // 3
    u, v = i420[h:].reshape(2, h // 2, i420.shape[1] // 2)
    return i420[:h], u, v


def i420_array(frame: av.VideoFrame) -> np.ndarray:
    """A yuv420p frame with even sides as I420 (h * 3 / 2, w): its planes copied without their
    row padding (`to_ndarray` costs about twice as much: it stacks copies of the planes)."""
    # Plane by plane, written out: the generic loop over `_planes` costs a third more here.
    w, h = frame.width, frame.height
    out = np.empty((h * 3 // 2, w), np.uint8)
    y, u, v = frame.planes
    out[:h] = np.frombuffer(y, np.uint8).reshape(h, y.line_size)[:, :w]
    chroma = out[h:].reshape(2, h // 2, w // 2)
    chroma[0] = np.frombuffer(u, np.uint8).reshape(h // 2, u.line_size)[:, : w // 2]
    chroma[1] = np.frombuffer(v, np.uint8).reshape(h // 2, v.line_size)[:, : w // 2]
    return out


def i420_frame(i420: np.ndarray) -> av.VideoFrame:
    """An I420 array as a yuv420p `av.VideoFrame` (a copy; 5x faster than `from_ndarray`)."""
    h, w = i420.shape[0] * 2 // 3, i420.shape[1]
    frame = av.VideoFrame(w, h, "yuv420p")
    for target, plane in zip(planes(frame), _i420_planes(i420), strict=True):
        target[...] = plane
    return frame


def _halvings(source: tuple[int, int], size: tuple[int, int]) -> int | None:
    """k where `size` is `source` halved k >= 1 times exactly on both sides, else None."""
    for k in range(1, 8):
        if (source[0] >> k << k, source[1] >> k << k) == source and (source[0] >> k, source[1] >> k) == size:
            return k
    return None


def halved(frame: av.VideoFrame, halvings: int) -> av.VideoFrame:
    """A yuv420p frame reduced by area `halvings` times, each plane by OpenCV's exact-2x path: at
    most half the time of FFmpeg's area scaler (89 against 52 us a frame from 640x272, 260 against
    159 from 1280x720), within 0.3 of its values on average."""
    out = av.VideoFrame(frame.width >> halvings, frame.height >> halvings, "yuv420p")
    for target, plane in zip(planes(out), planes(frame), strict=True):
        for _ in range(halvings - 1):
            plane = halve(plane)
        cv2.resize(plane, target.shape[::-1], dst=target, interpolation=cv2.INTER_AREA)
    return out


class VideoStream:
    """An opened video whose header passed the limits. Iterating yields its frames once,
    in order, as yuv420p frames at the decode size `size`; the end of the iteration raises
    Rejected when no frame decoded or fewer than the header claims."""

    def __init__(self, path: str | Path, limits: Limits, options: Decode):
        if os.path.getsize(path) == 0:
            raise Rejected(EMPTY, "0 bytes")
        if is_text(path):
            raise Rejected(NOT_A_VIDEO, "text, not a media file")
        try:
            # `skip_frame` for the probe only: FFmpeg's opening would decode frames to learn what the
            # header already says (1 of 1.5 ms an opening); the stream's own decoder is set up below.
            self._container = av.open(str(path), options={"skip_frame": "all"})
        except (av.error.FFmpegError, OSError) as e:
            raise Rejected(UNDECODABLE, f"cannot open: {e}") from e
        try:
            self._read_header(limits, options)
        except BaseException:
            self._container.close()
            raise
        self._limits = limits
        self.decoded_frames = 0
        self._read_ahead = options.read_ahead
        self._reader: _ReadAhead | Generator | None = None

    def _read_header(self, limits: Limits, options: Decode) -> None:
        container = self._container
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise Rejected(NO_VIDEO, f"streams: {', '.join(kinds)}")
        stream = self._stream = container.streams.video[0]
        self.codec: str = stream.codec_context.name
        self.width: int = stream.codec_context.width  # source size
        self.height: int = stream.codec_context.height
        if self.codec not in limits.codecs:
            raise Rejected(UNSUPPORTED_CODEC, f"codec {self.codec!r} not in {list(limits.codecs)}")
        if self.width > limits.max_width or self.height > limits.max_height:
            raise Rejected(TOO_LARGE, f"{self.width}x{self.height} over {limits.max_width}x{limits.max_height}")
        self.fps = float(stream.average_rate or stream.guessed_rate or 0)
        if self.fps <= 0:
            raise Rejected(UNDECODABLE, "no frame rate")
        duration_s = (
            float(stream.duration * stream.time_base)
            if stream.duration
            else (container.duration / 1e6 if container.duration else 0.0)
        )
        if duration_s > limits.max_duration_s:
            raise Rejected(TOO_LONG, f"{duration_s:.0f} s over {limits.max_duration_s:.0f} s")
        # A hint, not a promise (a corrupt header can claim millions of frames); 0: unknown.
        self.header_frames: int = stream.frames or int(round(duration_s * self.fps))
        self.size: tuple[int, int] = output_size(self.width, self.height, options.max_side)  # decode (w, h)
        stream.thread_type = "AUTO"
        # Decoder threads; 0: FFmpeg's choice.
        self.threads: int = options.threads or (1 if self.width * self.height <= ONE_THREAD_MAX_PIXELS else 0)
        if self.threads:
            stream.codec_context.thread_count = self.threads

    def __iter__(self) -> Iterator[av.VideoFrame]:
        return self.frames()

    def frames(self, on_packet: Callable[[av.Packet], None] | None = None) -> Iterator[av.VideoFrame]:
        """The frames, once, in order; `on_packet` is handed each of the stream's packets (decode
        order) as it is read, before the frames it gives: one pass over the file serves both.
        Decoding runs on a thread of its own a few batches ahead of the caller (FFmpeg decodes
        without the GIL), so the caller's work on a frame overlaps the decoding of the next, unless
        `Decode.read_ahead` is off."""
        if self._reader is not None:
            raise RuntimeError("a video's frames are read once")
        # The duration limit holds for what decodes, too: a stream whose header gives no duration
        # (raw H.264) or a wrong one is stopped at the limit.
        max_frames = int(self._limits.max_duration_s * self.fps) + 1
        decoded = self._decoded(on_packet is not None)
        self._reader = _ReadAhead(decoded, _BATCH, _AHEAD) if self._read_ahead else decoded
        error = None
        try:
            for item in self._reader:
                if isinstance(item, av.Packet):
                    on_packet(item)  # type: ignore[misc] - packets come only with on_packet
                    continue
                if self.decoded_frames == max_frames:
                    raise Rejected(TOO_LONG, f"more than {self._limits.max_duration_s:.0f} s of frames decoded")
                self.decoded_frames += 1
                yield item
        except av.error.FFmpegError as e:
            error = e
        finally:
            self._reader.close()
        count = self.decoded_frames
        if count == 0:
            raise Rejected(UNDECODABLE, f"no frame decoded{f': {error}' if error else ''}")
        if count < self.header_frames * (1 - self._limits.truncation_tolerance):
            raise Rejected(TRUNCATED, f"decoded {count} of {self.header_frames} frames the header claims")

    def _decoded(self, packets: bool) -> Generator[av.Packet | av.VideoFrame, None, None]:
        """The stream's packets (size 0, the end-of-stream marker, left out), where `packets`, and
        its frames at the decode size, in the order they are read and made."""
        width, height = self.size
        # One scaler for every frame: `frame.to_ndarray(width=...)` sets up FFmpeg's scaler anew for
        # each frame (1.4 ms a frame at 320x180, ten times the conversion with the scaler kept).
        scaler = VideoReformatter()
        source = (self.width, self.height)
        halvings = _halvings(source, self.size)
        for packet in self._container.demux(self._stream):
            if packets and packet.size:
                yield packet
            for frame in packet.decode():
                yuv420p = frame.format.name == "yuv420p"
                if halvings is not None and yuv420p and (frame.width, frame.height) == source:
                    frame = halved(frame, halvings)
                elif not yuv420p or (frame.width, frame.height) != self.size:
                    frame = scaler.reformat(frame, width, height, "yuv420p", interpolation="AREA")
                yield frame

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # before the container it reads
        self._container.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


_END = object()  # after a _ReadAhead's last batch


class _ReadAhead:
    """`items` iterated on a thread of its own, up to `ahead` batches of `batch` items ahead of the
    caller; an exception it raises is raised to the caller after the items before it. `close()`
    stops the thread and waits for it (at most a batch more is read). A generator's own interface:
    iterated, then closed."""

    def __init__(self, items: Iterator, batch: int, ahead: int):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(items, batch), name="decoder", daemon=True)
        self._thread.start()

    def _read(self, items: Iterator, batch: int) -> None:
        done: list = []
        try:
            for item in items:
                done.append(item)
                if len(done) == batch:
                    if not self._put(done):
                        return
                    done = []
            if self._put(done):
                self._put(_END)
        except BaseException as e:  # noqa: BLE001 - the caller's to handle
            if self._put(done):
                self._put(e)  # items are packets and frames, batches lists: an exception is itself

    def _put(self, item: object) -> bool:
        """Queue `item` unless stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while (done := self._queue.get()) is not _END:
            if isinstance(done, BaseException):
                raise done
            yield from done

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # free a put waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)


def open_video(path: str | Path, limits: Limits, options: Decode) -> VideoStream:
    """Open `path` and check its header against the limits, or raise Rejected."""
    return VideoStream(path, limits, options)
