"""A kept clip's stored encodings (model/records.py RENDITIONS): the small training
rendition and the high-resolution one.

`ClipEncoder` is made once per source video (after its header is read) and asked once
per clip for its renditions, with the clip's frames at the decode size.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from components.common.media import write_video
from components.curation.config import CurationConfig
from model.records import RENDITION_EXT, SMALL, Rendition


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


class ClipEncoder:
    def __init__(self, source: SourceVideo, config: CurationConfig):
        self.source, self.config = source, config

    def renditions(self, start: int, end: int, frames: np.ndarray) -> dict[str, EncodedClip]:
        """The renditions of source frames [start, end); `frames` are those frames at the
        decode size (T, h, w, 3) RGB."""
        out = {SMALL: self._encode(frames, self.config.output.clip_max_side, RENDITION_EXT[SMALL])}
        # TODO(renditions): the HQ rendition and stream copy.
        return out

    def _encode(self, frames: np.ndarray, max_side: int, ext: str) -> EncodedClip:
        h, w = frames.shape[1:3]
        size = output_size(w, h, max_side)
        if size != (w, h):
            frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            write_video(Path(tmp.name), frames, self.source.fps, crf=self.config.output.clip_crf, deterministic=False)
            mp4 = Path(tmp.name).read_bytes()
        return EncodedClip(ext, mp4, Rendition(width=size[0], height=size[1]))
