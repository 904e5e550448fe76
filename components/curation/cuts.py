"""Cut detection on the decoded frames as they stream, each reduced to a small RGB frame.

Several PySceneDetect detectors run together, each at a threshold where it rarely fires falsely,
and a cut any of them finds is kept: the content detector (hard cuts, also out of fast motion),
the adaptive detector (cuts between calm shots), the threshold detector (fades through black) and
the adaptive detector on a reduced frame rate (dissolves)."""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ThresholdDetector

from components.curation.config import Cuts
from components.curation.video import luma, reduced_rgb

# Cuts this many frames apart or closer are one cut (the earlier is kept): detectors place the same
# transition a frame or two apart.
MERGE_FRAMES = 2


class _ContentScore:
    """ContentDetector's frame score: the mean absolute difference of hue, saturation and value to the
    previous frame given, weighted equally. Computed once per frame (with OpenCV) for every detector
    that uses it, instead of once per detector."""

    def __init__(self) -> None:
        self.value = 0.0
        self._previous: np.ndarray | None = None

    def update(self, rgb: np.ndarray) -> None:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        self.value = 0.0 if self._previous is None else sum(cv2.mean(cv2.absdiff(hsv, self._previous))[:3]) / 3
        self._previous = hsv


class _Average(float):
    """A frame's mean pixel value, given to ThresholdDetector in place of the frame: it takes
    `numpy.mean(frame)`, and numpy.mean returns `.mean()` of anything that is not an array."""

    def mean(self, axis: None = None, dtype: None = None, out: None = None) -> float:
        return float(self)


class _Adaptive(AdaptiveDetector):
    """AdaptiveDetector that reads its frame score from a shared `_ContentScore`."""

    def __init__(self, score: _ContentScore, **kwargs):
        super().__init__(**kwargs)
        self._score = score

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        return self._score.value


class _DissolvePass:
    """The adaptive detector on every `step`-th frame. A dissolve changes each frame too little for
    a full-rate detector, but between two samples it stands out against the samples around it.
    A cut at a sample goes to the frame since the previous sample that changed most."""

    window = 2  # samples on each side the adaptive detector compares a sample with

    def __init__(self, fps: float, step: int, threshold: float, black: float | None):
        self.fps, self.step = fps, step
        # Intervals with a frame darker than this are fades through black, left to the fade detector
        # (which places the cut in the dark, not on the fade's ramp); None: no fade detector.
        self.black = black
        self.score = _ContentScore()
        # One cut per dissolve (min_scene_len): it may stand out in two neighbouring sample intervals.
        self.detector = _Adaptive(
            self.score, adaptive_threshold=threshold, min_scene_len=step + 1, window_width=self.window
        )
        # (change from the previous frame, luma) of the frames back to the interval before the sample
        # being decided.
        self.frames: deque[tuple[float, float]] = deque(maxlen=(self.window + 1) * step)
        self.newest_sample = 0

    def feed(self, index: int, rgb: np.ndarray, change: float, luma: float) -> list[int]:
        self.frames.append((change, luma))
        if index % self.step:
            return []
        self.newest_sample = index
        self.score.update(rgb)
        cuts = self.detector.process_frame(FrameTimecode(index, fps=self.fps), rgb)
        placed = (self._place(t.frame_num, index) for t in cuts)
        return [cut for cut in placed if cut is not None]

    def _place(self, sample: int, index: int) -> int | None:
        first = max(1, sample - self.step + 1)
        interval = [self.frames[len(self.frames) - 1 - (index - frame)] for frame in range(first, sample + 1)]
        if self.black is not None and min(luma for _, luma in interval) < self.black:
            return None
        return first + int(np.argmax([change for change, _ in interval]))

    @property
    def settled(self) -> int:
        """Samples up to `window` intervals behind the newest are decided."""
        return max(0, self.newest_sample - self.window * self.step + 1)


class CutDetector:
    """Streaming: `feed` each decoded frame in order; `take_cuts` returns the cuts confirmed so far
    (every cut before `settled`); `finish` after the last frame returns the rest."""

    def __init__(self, fps: float, config: Cuts):
        self.fps, self.config = fps, config
        min_len = max(2, int(round(0.25 * fps)))
        kinds = set(config.detectors)
        # The content score above a high threshold (hard cuts, also out of fast motion), and above its
        # neighbours' mean by `content_min_ratio`, so steady fast motion over that threshold is no cut.
        self.score = _ContentScore()  # of the full-rate detectors
        self.content = (
            _Adaptive(
                self.score,
                adaptive_threshold=config.content_min_ratio,
                min_content_val=config.content_threshold,
                min_scene_len=min_len,
            )
            if "content" in kinds
            else None
        )
        self.adaptive = (
            _Adaptive(self.score, adaptive_threshold=config.adaptive_threshold, min_scene_len=min_len)
            if "adaptive" in kinds
            else None
        )
        self.fades = (
            ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_len) if "fades" in kinds else None
        )
        step = max(2, int(round(config.dissolve_step_s * fps)))
        self.dissolves = (
            _DissolvePass(fps, step, config.adaptive_threshold, config.fade_threshold if "fades" in kinds else None)
            if "dissolves" in kinds
            else None
        )
        self.luma: list[float] = []  # mean of each frame at detection size (0-255)
        self._scored = bool(kinds & {"content", "adaptive", "dissolves"})
        self._halvings: int | None = None  # of the frames' sides, for detection
        self._last = -1
        self._finished = False
        self._candidates: list[int] = []  # found, not yet settled
        self._confirmed: list[int] = []  # settled and merged, not yet taken
        self._last_kept: int | None = None

    def feed(self, index: int, frame: np.ndarray) -> None:
        """`frame`: I420 (video.py), the next one in order."""
        if self._halvings is None:
            # Halved as often as the height stays at least detection_height (and at least once).
            height = luma(frame).shape[0]
            self._halvings = max(1, int(np.log2(max(1, height / self.config.detection_height))))
        # Reduced before the conversion to RGB: the detectors see a small RGB frame, at a fraction of
        # the cost of converting the whole frame.
        small = reduced_rgb(frame, self._halvings)
        mean = sum(cv2.mean(small)[:3]) / 3
        self.luma.append(mean)
        if self._scored:
            self.score.update(small)
        timecode = FrameTimecode(index, fps=self.fps)
        # Each statistic once per frame: the content score above (the adaptive detectors read it), and the
        # fade detector's, the mean of every pixel value, which is `mean`.
        for detector, image in ((self.content, small), (self.adaptive, small), (self.fades, _Average(mean))):
            if detector is not None:
                self._candidates.extend(t.frame_num for t in detector.process_frame(timecode, image))
        if self.dissolves is not None:
            # A frame's change from the previous one is its content score.
            self._candidates.extend(self.dissolves.feed(index, small, self.score.value, mean))
        self._last = index
        self._confirm()

    @property
    def settled(self) -> int:
        """Every cut at a frame before this one has been found: none before it can come later."""
        if self._finished:
            return self._last + 1
        bound = self._last + 1
        for detector in (self.content, self.adaptive):
            if detector is not None:
                bound = min(bound, self._last - detector.window_width + 1)  # decides `window_width` frames late
        if self.fades is not None and self.fades.last_fade["type"] == "out":
            # In the dark: the cut will go between the frame the picture went dark and the one it returns.
            bound = min(bound, self.fades.last_fade["frame"].frame_num)
        if self.dissolves is not None:
            bound = min(bound, self.dissolves.settled)
        return max(0, bound)

    def take_cuts(self) -> list[int]:
        """Cut frames (first frame of each new shot) confirmed since the last call, sorted."""
        cuts, self._confirmed = self._confirmed, []
        return cuts

    def finish(self) -> list[int]:
        """After the last frame: the cuts not yet taken."""
        end = FrameTimecode(max(self._last, 0), fps=self.fps)
        for detector in (self.content, self.adaptive, self.fades):
            if detector is not None:
                self._candidates.extend(t.frame_num for t in detector.post_process(end))
        self._finished = True
        self._confirm()
        return self.take_cuts()

    def _confirm(self) -> None:
        if not self._candidates:
            return
        settled = self.settled
        ready = sorted(c for c in self._candidates if c < settled)
        self._candidates = [c for c in self._candidates if c >= settled]
        for cut in ready:
            if 0 < cut <= self._last and (self._last_kept is None or cut - self._last_kept > MERGE_FRAMES):
                self._confirmed.append(cut)
                self._last_kept = cut
