"""Cut detection on the decoded frames as they stream, each reduced to a small RGB frame.

Several of PySceneDetect's detectors run together, each at a threshold where it rarely fires
falsely, and a cut any of them finds is kept: the content detector (hard cuts, also out of fast
motion), the adaptive detector (cuts between calm shots), the threshold detector (fades through
black) and the adaptive detector at reduced frame rates (dissolves, each rate finding those about as
long as its sample step). Detectors place one transition at different frames: a cut within the reach
of a finer detector's (two frames at the full rate, a sample step at a reduced one) is that one.

The detectors' decisions are PySceneDetect's (0.7), restated here on plain frame numbers: the
library's detectors cost about 40 us a frame together in Python (timecode objects and their
arithmetic, a list copy per frame), as much as the rest of curation's work on a small frame. The
tests feed both the same frame statistics and check they cut at the same frames.
"""

from __future__ import annotations

from collections import deque

import av
import cv2
import numpy as np

from components.curation.config import Cuts
from components.curation.video import LIMITED_YUV_TO_RGB, halve, planes

# Cuts this many frames apart or closer are one cut (the earlier is kept): detectors place the same
# transition a frame or two apart.
MERGE_FRAMES = 2
# The least content score an adaptive cut needs where no other is given (PySceneDetect's min_content_val).
ADAPTIVE_MIN_SCORE = 15.0


def hsv_change(hsv: np.ndarray, previous: np.ndarray) -> float:
    """ContentDetector's frame score from two HSV pictures: the mean absolute difference of hue,
    saturation and value, weighted equally; as the mean over every value (the channels are the
    same size), OpenCV's one-pass L1 norm."""
    return cv2.norm(hsv, previous, cv2.NORM_L1) / hsv.size


def content_score(rgb: np.ndarray, previous: np.ndarray) -> float:
    """ContentDetector's score of RGB frame `rgb` after `previous`."""
    return hsv_change(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), cv2.cvtColor(previous, cv2.COLOR_RGB2HSV))


class FrameStatistics:
    """What the detectors read of each frame, computed for frames in batches: the frame reduced as
    `reduced_rgb` does (to 1 / 2**halvings of its size), the mean of that RGB picture, its HSV
    picture and the content score against the previous frame's (0 for the first).

    The same values as frame by frame, for less: each OpenCV call costs about a microsecond before
    any work, most of it on pictures this small. A batch's pictures stand side by side and are
    reduced and converted in one call each (side by side, not stacked: OpenCV's conversions cost
    about 100 ns a row, three times more per pixel on a tall narrow picture than on a wide one)."""

    def __init__(self, shape: tuple[int, int], halvings: int, batch: int):
        """`shape`: (height, width) of the frames' luma; `halvings` >= 1."""
        h, w = shape
        self.halvings, self.batch = halvings, batch
        # Cropped to a multiple of 2**halvings (what repeated halving reads), so that side by side
        # every halving pairs columns of one picture.
        hc, wc = self._crop = (h >> halvings << halvings, w >> halvings << halvings)
        self.size = (hc >> halvings, wc >> halvings)  # (h, w) of a reduced picture
        # Each picture's planes after the first step: luma halved once; chroma (half size already)
        # halved once too where it is halved at all.
        self._luma_step = (hc // 2, wc // 2)
        self._chroma_step = (hc // 2, wc // 2) if halvings == 1 else (hc // 4, wc // 4)
        self._y = np.empty((self._luma_step[0], batch * self._luma_step[1]), np.uint8)
        self._u = np.empty((self._chroma_step[0], batch * self._chroma_step[1]), np.uint8)
        self._v = np.empty_like(self._u)
        self._previous: np.ndarray | None = None  # the last HSV picture computed
        self.count = 0  # frames waiting in the batch

    def add(self, frame: av.VideoFrame) -> None:
        """The next frame (yuv420p, video.py); `compute` when `count` reaches `batch`."""
        (hc, wc), i = self._crop, self.count
        y, u, v = planes(frame)
        rows, cols = self._luma_step
        slot = self._y[:, i * cols : (i + 1) * cols]
        cv2.resize(y[:hc, :wc], (cols, rows), dst=slot, interpolation=cv2.INTER_AREA)
        rows, cols = self._chroma_step
        for plane, side_by_side in ((u, self._u), (v, self._v)):
            slot = side_by_side[:, i * cols : (i + 1) * cols]
            if self.halvings == 1:  # chroma is at half size already
                slot[...] = plane[:rows, :cols]
            else:
                cv2.resize(plane[: hc // 2, : wc // 2], (cols, rows), dst=slot, interpolation=cv2.INTER_AREA)
        self.count += 1

    def compute(self) -> tuple[list[float], list[float], list[np.ndarray]]:
        """For the frames added since the last call: their means, content scores and HSV pictures
        (views, valid until the next call)."""
        n, ws = self.count, self.size[1]
        y = self._y[:, : n * self._luma_step[1]]
        u, v = self._u[:, : n * self._chroma_step[1]], self._v[:, : n * self._chroma_step[1]]
        for _ in range(self.halvings - 1):
            y = halve(y)
        for _ in range(self.halvings - 2):
            u, v = halve(u), halve(v)
        rgb = cv2.transform(cv2.merge([y, u, v]), LIMITED_YUV_TO_RGB)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        pictures = [hsv[:, i * ws : (i + 1) * ws] for i in range(n)]
        # The mean of a picture's channels' means, as the mean over every value (one channel, 6x faster).
        means = [cv2.mean(rgb[:, i * ws : (i + 1) * ws].reshape(self.size[0], -1))[0] for i in range(n)]
        before = [self._previous, *pictures[:-1]]
        changes = [0.0 if b is None else hsv_change(a, b) for a, b in zip(pictures, before, strict=True)]
        self._previous = pictures[-1].copy()
        self.count = 0
        return means, changes, pictures


class AdaptiveRule:
    """AdaptiveDetector's decision on frame scores fed in order: the frame `window` frames back is a
    cut when its score is at least `min_score` and at least `ratio` times the mean score of the
    `window` frames on each side (a ratio of 255 where that mean is 0), and at least `min_len`
    frames after the previous cut (or the first frame fed)."""

    def __init__(self, ratio: float, min_score: float, min_len: int, window: int = 2):
        self.ratio, self.min_score, self.min_len, self.window = ratio, min_score, min_len, window
        self._scores: deque[float] = deque(maxlen=2 * window + 1)
        self._last_cut: int | None = None

    def feed(self, index: int, score: float) -> int | None:
        """The cut this frame decides (at `index - window`), if any."""
        if self._last_cut is None:
            self._last_cut = index
        self._scores.append(score)
        if len(self._scores) < self._scores.maxlen:
            return None
        target = self._scores[self.window]
        # Summed in the library's order, so ratios on the threshold compare the same.
        average = sum(s for i, s in enumerate(self._scores) if i != self.window) / (2.0 * self.window)
        # No change around it: 255 if it is at least min_score.
        ratio = min(target / average, 255.0) if abs(average) >= 0.00001 else 255.0 * (target >= self.min_score)
        frame = index - self.window
        if ratio >= self.ratio and target >= self.min_score and frame - self._last_cut >= self.min_len:
            self._last_cut = frame
            return frame
        return None


class FadeRule:
    """ThresholdDetector's decision (floor method, no fade bias) on frame means fed in order: a
    fade out is the first frame with a mean below `threshold` (an integer, as the library makes
    it), a fade in the next frame at or above it; a fade in at least `min_len` frames after the
    previous cut cuts half-way between the two."""

    def __init__(self, threshold: float, min_len: int):
        self.threshold, self.min_len = int(threshold), min_len
        self.dark = False  # the last crossing was a fade out
        self.crossed = 0  # the frame of the last crossing (or the first frame)
        self._last_cut: int | None = None

    def feed(self, index: int, mean: float) -> int | None:
        if self._last_cut is None:
            self._last_cut, self.crossed, self.dark = index, index, mean < self.threshold
            return None
        cut = None
        if not self.dark and mean < self.threshold:
            self.dark, self.crossed = True, index
        elif self.dark and mean >= self.threshold:
            if index - self._last_cut >= self.min_len:
                cut = self.crossed + round((index - self.crossed) / 2.0)
                self._last_cut = index
            self.dark, self.crossed = False, index
        return cut


class _DissolvePass:
    """The adaptive detector on every `step`-th frame. A dissolve changes each frame too little for
    a full-rate detector, but between two samples it stands out against the samples around it.
    A cut at a sample goes to the frame since the previous sample that changed most."""

    window = 2  # samples on each side the adaptive detector compares a sample with

    def __init__(self, step: int, threshold: float, black: float | None):
        self.step = step
        # Intervals with a frame darker than this are fades through black, left to the fade detector
        # (which places the cut in the dark, not on the fade's ramp); None: no fade detector.
        self.black = black
        self._previous: np.ndarray | None = None  # HSV picture of the previous sample
        # One cut per dissolve (min_len): it may stand out in two neighbouring sample intervals.
        self.rule = AdaptiveRule(threshold, ADAPTIVE_MIN_SCORE, min_len=2, window=self.window)  # in samples
        # (change from the previous frame, luma) of the frames back to the interval before the sample
        # being decided.
        self.frames: deque[tuple[float, float]] = deque(maxlen=(self.window + 1) * step)
        self.newest_sample = 0

    def feed(self, index: int, hsv: np.ndarray, change: float, luma: float) -> list[int]:
        """Frame `index`: its HSV picture, content score (change from the previous frame) and mean."""
        self.frames.append((change, luma))
        if index % self.step:
            return []
        self.newest_sample = index
        score = 0.0 if self._previous is None else hsv_change(hsv, self._previous)
        self._previous = hsv.copy()  # the caller's picture is overwritten
        # The rule's frames are sample numbers: a sample's frame is `step` times its number.
        sample = self.rule.feed(index // self.step, score)
        cut = None if sample is None else self._place(sample * self.step, index)
        return [] if cut is None else [cut]

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

    BATCH = 16  # frames whose statistics are computed at once (FrameStatistics)

    def __init__(self, fps: float, config: Cuts):
        self.config = config
        min_len = max(2, int(round(0.25 * fps)))
        kinds = set(config.detectors)
        # The content score above a high threshold (hard cuts, also out of fast motion), and above its
        # neighbours' mean by `content_min_ratio`, so steady fast motion over that threshold is no cut.
        self.content = (
            AdaptiveRule(config.content_min_ratio, config.content_threshold, min_len) if "content" in kinds else None
        )
        self.adaptive = (
            AdaptiveRule(config.adaptive_threshold, ADAPTIVE_MIN_SCORE, min_len) if "adaptive" in kinds else None
        )
        self.fades = FadeRule(config.fade_threshold, min_len) if "fades" in kinds else None
        steps = sorted({max(2, int(round(step_s * fps))) for step_s in config.dissolve_steps_s})
        black = config.fade_threshold if "fades" in kinds else None
        self.dissolves = (
            [_DissolvePass(step, config.adaptive_threshold, black) for step in steps] if "dissolves" in kinds else []
        )
        # How far from a cut another detector may place the same transition.
        self._max_reach = max([MERGE_FRAMES, *steps]) if self.dissolves else MERGE_FRAMES
        self.luma: list[float] = []  # mean of each frame at detection size (0-255)
        self._statistics: FrameStatistics | None = None  # made for the first frame's size
        self._last = -1
        self._finished = False
        # (frame, reach) of each cut found, until no decision reads it.
        self._candidates: list[tuple[int, int]] = []
        self._decided = 0  # candidates before this frame are decided
        self._confirmed: list[int] = []  # decided and kept, not yet taken
        self._last_kept: tuple[int, int] | None = None  # (frame, reach)

    def feed(self, index: int, frame: av.VideoFrame) -> bool:
        """`frame`: yuv420p (video.py), the next one in order. Frames are read in batches of `BATCH`:
        `settled`, `luma` and the cuts to take come that far behind at most, and change only when
        this returns True."""
        if self._statistics is None:
            # Halved as often as the height stays at least detection_height (and at least once).
            halvings = max(1, int(np.log2(max(1, frame.height / self.config.detection_height))))
            self._statistics = FrameStatistics((frame.height, frame.width), halvings, self.BATCH)
        if index != self._last + 1 + self._statistics.count:
            raise ValueError(f"frame {index} fed after {self._last + self._statistics.count}: frames go in order")
        self._statistics.add(frame)
        if self._statistics.count < self.BATCH:
            return False
        self._decide()
        return True

    def _decide(self) -> None:
        """The detectors on the frames waiting, in order."""
        means, changes, hsv = self._statistics.compute()
        for offset, (mean, change) in enumerate(zip(means, changes, strict=True)):
            index = self._last + 1
            self.luma.append(mean)
            # Each statistic once per frame: the content score (both adaptive rules read it) and the mean.
            for rule, value in ((self.content, change), (self.adaptive, change), (self.fades, mean)):
                if rule is not None and (cut := rule.feed(index, value)) is not None:
                    self._candidates.append((cut, MERGE_FRAMES))
            for dissolves in self.dissolves:
                found = dissolves.feed(index, hsv[offset], change, mean)
                self._candidates.extend((cut, dissolves.step) for cut in found)
            self._last = index
        self._confirm()

    @property
    def settled(self) -> int:
        """Every cut at a frame before this one has been found and decided: none before it can come later."""
        if self._finished:
            return self._last + 1
        # A cut is decided once every cut that could be the same transition is found.
        return max(0, self._found() - self._max_reach)

    def _found(self) -> int:
        """Every detector has reported each cut it finds before this frame."""
        bound = self._last + 1
        for rule in (self.content, self.adaptive):
            if rule is not None:
                bound = min(bound, self._last - rule.window + 1)  # decides `window` frames late
        if self.fades is not None and self.fades.dark:
            # In the dark: the cut will go between the frame the picture went dark and the one it returns.
            bound = min(bound, self.fades.crossed)
        for dissolves in self.dissolves:
            bound = min(bound, dissolves.settled)
        return max(0, bound)

    def take_cuts(self) -> list[int]:
        """Cut frames (first frame of each new shot) confirmed since the last call, sorted."""
        cuts, self._confirmed = self._confirmed, []
        return cuts

    def finish(self) -> list[int]:
        """After the last frame: the cuts not yet taken (the library's detectors add none at the end:
        the last `window` frames are never a cut, nor is a fade out that does not return)."""
        if self._statistics is not None and self._statistics.count:
            self._decide()
        self._finished = True
        self._confirm()
        return self.take_cuts()

    def _confirm(self) -> None:
        decided = self.settled
        ready = sorted(c for c in self._candidates if self._decided <= c[0] < decided)
        for cut, reach in ready:
            if not 0 < cut <= self._last:
                continue
            # A finer detector placed this transition (all of them have reported this far).
            if any(r < reach and abs(c - cut) <= reach for c, r in self._candidates):
                continue
            # The same transition as the cut kept before (cuts of one reach: the earlier is kept).
            if self._last_kept is not None and cut - self._last_kept[0] <= max(reach, self._last_kept[1]):
                continue
            self._confirmed.append(cut)
            self._last_kept = (cut, reach)
        self._decided = max(self._decided, decided)
        # Decisions to come read the candidates within the largest reach of them.
        self._candidates = [c for c in self._candidates if c[0] >= self._decided - self._max_reach]
