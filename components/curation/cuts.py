"""Cut and fade detection (PySceneDetect detectors fed the shared decoded frames),
and clip boundaries from the cuts."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from components.curation.config import Cuts


class CutDetector:
    """Streaming: `feed` each decoded frame, then `finish` for the cut frames."""

    def __init__(self, fps: float, config: Cuts):
        self.fps, self.config = fps, config
        min_len = max(2, int(round(0.25 * fps)))
        if config.detector == "adaptive":
            hard = AdaptiveDetector(adaptive_threshold=config.adaptive_threshold, min_scene_len=min_len)
        else:
            hard = ContentDetector(threshold=config.content_threshold, min_scene_len=min_len)
        fades = ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_len)
        self.detectors = [hard, fades]
        self.cuts: set[int] = set()
        self.luma: list[float] = []
        self._size: tuple[int, int] | None = None
        self._last = 0

    def feed(self, index: int, rgb: np.ndarray) -> None:
        if self._size is None:
            # An integer reduction (at least to detection_height): OpenCV's area resize
            # has a fast path for those, about 3x faster than for 2.5x.
            h, w = rgb.shape[:2]
            factor = max(1, h // self.config.detection_height)
            self._size = (w // factor, h // factor)
        small = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(small[..., ::-1])  # the detectors expect OpenCV's BGR
        self.luma.append(float(small.mean()))
        timecode = FrameTimecode(index, fps=self.fps)
        for detector in self.detectors:
            self.cuts.update(t.frame_num for t in detector.process_frame(timecode, bgr))
        self._last = index

    def finish(self) -> list[int]:
        """Cut frames (first frame of each new shot), near-duplicates merged."""
        end = FrameTimecode(self._last, fps=self.fps)
        for detector in self.detectors:
            self.cuts.update(t.frame_num for t in detector.post_process(end))
        merged: list[int] = []
        for cut in sorted(c for c in self.cuts if 0 < c <= self._last):
            if not merged or cut - merged[-1] > 2:
                merged.append(cut)
        return merged


@dataclass(frozen=True)
class Segment:
    start: int  # first frame
    end: int  # one past the last frame
    too_short: bool


def segments(num_frames: int, fps: float, cuts: list[int], luma: np.ndarray, config: Cuts) -> list[Segment]:
    """Shots between cuts, dark ends (fades) trimmed, long shots split evenly to at
    most `max_clip_s`; shots shorter than `min_clip_s` are kept but marked."""
    min_len, max_len = config.min_clip_s * fps, config.max_clip_s * fps
    bright = luma >= config.dark_luma
    out: list[Segment] = []
    for start, end in zip([0, *cuts], [*cuts, num_frames], strict=True):
        lit = np.flatnonzero(bright[start:end])
        if len(lit) == 0:
            continue  # all black: nothing to keep
        start, end = start + int(lit[0]), start + int(lit[-1]) + 1
        pieces = max(1, int(np.ceil((end - start) / max_len)))
        bounds = np.linspace(start, end, pieces + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out.append(Segment(int(a), int(b), too_short=bool(b - a < min_len)))
    return out
