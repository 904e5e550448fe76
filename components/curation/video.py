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
from collections.abc import Callable, Iterator
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


# Limited-range Y (16-235) and Cr, Cb (16-240) stretched to full range, one table per plane: OpenCV's
# YCrCb to RGB is then FFmpeg's default (BT.601, limited range) conversion. Applied to each plane
# before they are merged: OpenCV's one-channel table lookup is several times faster than its
# three-channel one.
Y_FULL_RANGE = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
C_FULL_RANGE = np.clip(np.round((np.arange(256) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)


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
    ycrcb = cv2.merge([cv2.LUT(y, Y_FULL_RANGE), cv2.LUT(v, C_FULL_RANGE), cv2.LUT(u, C_FULL_RANGE)])
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


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
        if options.threads:
            stream.codec_context.thread_count = options.threads

    def __iter__(self) -> Iterator[av.VideoFrame]:
        return self.frames()

    def frames(self, on_packet: Callable[[av.Packet], None] | None = None) -> Iterator[av.VideoFrame]:
        """The frames, once, in order; `on_packet` is handed each of the stream's packets (decode
        order) as it is read, before the frames it gives: one pass over the file serves both."""
        width, height = self.size
        # One scaler for every frame: `frame.to_ndarray(width=...)` sets up FFmpeg's scaler anew for
        # each frame (1.4 ms a frame at 320x180, ten times the conversion with the scaler kept).
        scaler = VideoReformatter()
        source = (self.width, self.height)
        halvings = _halvings(source, self.size)
        # The duration limit holds for what decodes, too: a stream whose header gives no duration
        # (raw H.264) or a wrong one is stopped at the limit.
        max_frames = int(self._limits.max_duration_s * self.fps) + 1
        error = None
        try:
            for packet in self._container.demux(self._stream):
                if on_packet is not None and packet.size:  # size 0: the end-of-stream marker
                    on_packet(packet)
                for frame in packet.decode():
                    if self.decoded_frames == max_frames:
                        raise Rejected(TOO_LONG, f"more than {self._limits.max_duration_s:.0f} s of frames decoded")
                    yuv420p = frame.format.name == "yuv420p"
                    if halvings is not None and yuv420p and (frame.width, frame.height) == source:
                        frame = halved(frame, halvings)
                    elif not yuv420p or (frame.width, frame.height) != self.size:
                        frame = scaler.reformat(frame, width, height, "yuv420p", interpolation="AREA")
                    self.decoded_frames += 1
                    yield frame
        except av.error.FFmpegError as e:
            error = e
        count = self.decoded_frames
        if count == 0:
            raise Rejected(UNDECODABLE, f"no frame decoded{f': {error}' if error else ''}")
        if count < self.header_frames * (1 - self._limits.truncation_tolerance):
            raise Rejected(TRUNCATED, f"decoded {count} of {self.header_frames} frames the header claims")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def open_video(path: str | Path, limits: Limits, options: Decode) -> VideoStream:
    """Open `path` and check its header against the limits, or raise Rejected."""
    return VideoStream(path, limits, options)
