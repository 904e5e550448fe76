"""Probe a file, reject it with a reason, or decode it exactly once.

Every frame is converted once (FFmpeg's scaler, straight to RGB at `max_side`);
cut detection, flow, OCR, CLIP and clip encoding all read that one array.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from components.curation.config import Decode, Limits

# Rejection reasons, as recorded in rejected.jsonl.
EMPTY = "empty_file"
UNDECODABLE = "undecodable"
NO_VIDEO = "no_video_stream"
TRUNCATED = "truncated"
TOO_LARGE = "resolution_over_limit"
TOO_LONG = "duration_over_limit"
UNSUPPORTED_CODEC = "unsupported_codec"


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, h, w, 3) uint8 RGB at the decode size
    fps: float
    width: int  # source size
    height: int
    codec: str
    header_frames: int

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return _even(width * scale), _even(height * scale)


FrameConsumer = Callable[[int, np.ndarray], None]


def decode(
    path: str | Path, limits: Limits, options: Decode, start: Callable[[float], FrameConsumer] | None = None
) -> DecodedVideo:
    """Decode every frame once, or raise Rejected. Once the header is read,
    `start(fps)` returns a consumer that sees each frame as it is decoded (cut
    detection runs there, streaming)."""
    if os.path.getsize(path) == 0:
        raise Rejected(EMPTY, "0 bytes")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise Rejected(UNDECODABLE, f"cannot open: {e}") from e
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise Rejected(NO_VIDEO, f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        if codec not in limits.codecs:
            raise Rejected(UNSUPPORTED_CODEC, f"codec {codec!r} not in {list(limits.codecs)}")
        if width > limits.max_width or height > limits.max_height:
            raise Rejected(TOO_LARGE, f"{width}x{height} over {limits.max_width}x{limits.max_height}")
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise Rejected(UNDECODABLE, "no frame rate")
        duration_s = (
            float(stream.duration * stream.time_base)
            if stream.duration
            else (container.duration / 1e6 if container.duration else 0.0)
        )
        if duration_s > limits.max_duration_s:
            raise Rejected(TOO_LONG, f"{duration_s:.0f} s over {limits.max_duration_s:.0f} s")
        header_frames = stream.frames or int(round(duration_s * fps))
        out_w, out_h = output_size(width, height, options.max_side)
        stream.thread_type = "AUTO"
        if options.threads:
            stream.codec_context.thread_count = options.threads

        on_frame = start(fps) if start else None
        # The header is a hint, not a promise (a corrupt one can claim millions of frames):
        # start from at most 1024 frames and grow by doubling.
        frames = np.empty((min(max(header_frames, 1), 1024), out_h, out_w, 3), np.uint8)
        count, error = 0, None
        try:
            for frame in container.decode(stream):
                if count == len(frames):  # header undercounted: grow
                    frames = np.concatenate([frames, np.empty_like(frames)])
                frames[count] = frame.to_ndarray(width=out_w, height=out_h, format="rgb24", interpolation="AREA")
                if on_frame:
                    on_frame(count, frames[count])
                count += 1
        except av.error.FFmpegError as e:
            error = e
    if count == 0:
        raise Rejected(UNDECODABLE, f"no frame decoded{f': {error}' if error else ''}")
    if count < header_frames * (1 - limits.truncation_tolerance):
        raise Rejected(TRUNCATED, f"decoded {count} of {header_frames} frames the header claims")
    return DecodedVideo(frames[:count], fps, width, height, codec, header_frames)
