"""Cut detection where a single detector fails, on synthetic frames with known cuts fed straight to
CutDetector (no encoding), and its streaming confirmation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scenedetect import FrameTimecode, StatsManager
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from components.curation.config import CurationConfig, Cuts
from components.curation.cuts import AdaptiveRule, CutDetector, FadeRule, FrameStatistics, content_score
from components.curation.video import from_rgb, reduced_rgb

H, W, FPS = 180, 320, 30.0
FULL_RATE = ("content", "adaptive", "fades")


def _texture(rng: np.random.Generator, width: int, scale: int, tint: tuple[int, int, int], contrast: float):
    """Smooth colour noise with features about `scale` pixels across, around `tint`."""
    noise = rng.random((H // scale + 2, width // scale + 2, 3)).astype(np.float32)
    smooth = cv2.resize(noise, (width, H), interpolation=cv2.INTER_CUBIC)
    smooth = (smooth - smooth.mean()) / smooth.std()
    return np.clip(np.array(tint, np.float32) + contrast * smooth, 0, 255).astype(np.uint8)


def _pan(image: np.ndarray, speeds: list[int]) -> list[np.ndarray]:
    """A window moving right over `image` by speeds[i] pixels before frame i."""
    x = np.cumsum(speeds)
    assert x[-1] + W <= image.shape[1]
    return [image[:, s : s + W] for s in x]


def _fast_pan(rng, tint, frames: int, speed: int = 12) -> list[np.ndarray]:
    return _pan(_texture(rng, W + speed * frames, 16, tint, 25), [speed] * frames)


def _stripes(frames: int, tint: tuple[int, int, int], speed: float) -> list[np.ndarray]:
    """Diagonal stripes moving `speed` pixels a frame: every pixel changes every frame."""
    x = np.arange(W)[None, :] + 0.5 * np.arange(H)[:, None]
    wave = [0.4 + 0.9 * (0.5 + 0.5 * np.sin(2 * np.pi * (x + i * speed) / 24)) for i in range(frames)]
    return [np.clip(np.array(tint) * w[..., None], 0, 255).astype(np.uint8) for w in wave]


def _calm(rng, tint, frames: int) -> list[np.ndarray]:
    """A still shot of large shapes with a small square crossing it (2 px a frame)."""
    background = _texture(rng, W, 60, tint, 40)
    out = []
    for i in range(frames):
        frame = background.copy()
        x = (10 + 2 * i) % (W - 20)
        frame[80:100, x : x + 20] = 255 - np.array(tint, np.uint8)
        out.append(frame)
    return out


def _dissolve(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    n = len(a)
    return [
        (x * (1 - (i + 1) / (n + 1)) + y * ((i + 1) / (n + 1))).astype(np.uint8)
        for i, (x, y) in enumerate(zip(a, b, strict=True))
    ]


def _fade_through_black(a: list[np.ndarray], b: list[np.ndarray], black: int) -> list[np.ndarray]:
    out = [(f * (1 - (i + 1) / len(a))).astype(np.uint8) for i, f in enumerate(a)]
    out += [np.zeros_like(a[0])] * black
    return out + [(f * ((i + 1) / len(b))).astype(np.uint8) for i, f in enumerate(b)]


def _cuts(frames: list[np.ndarray], detectors: tuple[str, ...] | None = None) -> list[int]:
    config = Cuts() if detectors is None else Cuts(detectors=detectors)
    detector = CutDetector(FPS, config)
    for index, rgb in enumerate(frames):
        detector.feed(index, from_rgb(rgb))
    return detector.finish()


def test_a_hard_cut_out_of_a_fast_pan_is_found_where_the_adaptive_detector_misses_it():
    rng = np.random.default_rng(1)
    frames = _fast_pan(rng, (70, 130, 90), 45) + _fast_pan(rng, (170, 110, 70), 45)
    cuts = _cuts(frames)
    assert len(cuts) == 1 and abs(cuts[0] - 45) <= 2, cuts
    # Every frame of the pan changes almost as much as the cut, so the cut's ratio to its neighbours is low.
    assert _cuts(frames, ("adaptive",)) == []
    assert _cuts(frames, ("content",)) == cuts


def test_fast_pans_and_fast_changing_patterns_without_a_cut_give_no_cut():
    rng = np.random.default_rng(2)
    # A pan speeding up from 6 to 18 px a frame over a high-contrast texture: frame differences reach
    # the content threshold, but they rise smoothly.
    speeds = [6] * 20 + list(range(6, 19)) + [18] * 40
    pan = _pan(_texture(rng, W + sum(speeds), 16, (90, 120, 150), 35), speeds)
    stripes = _stripes(90, (60, 120, 200), speed=7)
    for frames in (pan, stripes):
        assert _cuts(frames) == []


def test_a_one_second_dissolve_is_found_only_by_the_reduced_rate_pass():
    rng = np.random.default_rng(3)
    a, b = _calm(rng, (70, 130, 90), 80), _calm(rng, (170, 110, 70), 120)
    start, length = 50, 30  # frames start.. start+length-1 blend a into b
    frames = a[:start] + _dissolve(a[start : start + length], b[:length]) + b[length:]
    cuts = _cuts(frames)
    assert len(cuts) == 1 and start <= cuts[0] <= start + length, cuts
    assert _cuts(frames, FULL_RATE) == []


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_dissolves_half_a_second_to_four_seconds_long_are_each_found_once_inside_them(seconds):
    rng = np.random.default_rng(6)
    length = int(seconds * FPS)
    a, b = _calm(rng, (70, 130, 90), 200 + length), _calm(rng, (170, 110, 70), 300 + length)
    start = 200  # frames start.. start+length-1 blend a into b
    frames = a[:start] + _dissolve(a[start : start + length], b[:length]) + b[length : length + 300]
    cuts = _cuts(frames)
    assert len(cuts) == 1 and start <= cuts[0] <= start + length, cuts
    # The 1 s rate alone finds only the short ones: each rate finds dissolves about as long as its step.
    one_rate = CutDetector(FPS, Cuts(dissolve_steps_s=(1.0,)))
    for index, rgb in enumerate(frames):
        one_rate.feed(index, from_rgb(rgb))
    assert one_rate.finish() == (cuts if seconds <= 1 else [])


def test_a_hard_cut_found_at_every_rate_is_one_cut():
    rng = np.random.default_rng(7)
    frames = _calm(rng, (70, 130, 90), 300) + _calm(rng, (170, 110, 70), 300)
    assert _cuts(frames) == [300]


def test_a_fade_through_black_is_found():
    rng = np.random.default_rng(4)
    a, b = _calm(rng, (70, 130, 90), 60), _calm(rng, (170, 110, 70), 60)
    frames = a[:40] + _fade_through_black(a[40:50], b[:10], black=10) + b[10:]
    dark = [i for i, f in enumerate(frames) if f.mean() < Cuts().dark_luma]  # trimmed from any clip
    cuts = _cuts(frames)
    # The fade detector cuts in the middle of the black; the content detectors where colour drops out of
    # and comes back into it: every cut is in the dark, so the fade splits the video into two clips.
    assert len(_cuts(frames, ("fades",))) == 1
    assert cuts and all(dark[0] <= c <= dark[-1] + 1 for c in cuts), (cuts, dark)
    assert all(cut in cuts for cut in _cuts(frames, ("fades",)))


def test_streaming_confirms_each_cut_once_behind_settled_and_matches_one_shot():
    rng = np.random.default_rng(5)
    calm = [_calm(rng, tint, 110) for tint in ((70, 130, 90), (170, 110, 70), (90, 90, 170), (150, 150, 60))]
    frames = (
        calm[0][:60]
        + _dissolve(calm[0][60:90], calm[1][:30])  # dissolve over 60..89
        + calm[1][30:110]  # hard cut at 170
        + _fast_pan(rng, (120, 60, 140), 40)  # hard cut out of the fast pan at 210
        + calm[2][:50]
        + _fade_through_black(calm[2][50:60], calm[3][:10], black=8)  # dark around 270..287
        + calm[3][10:60]
    )
    dark = [i for i, f in enumerate(frames) if f.mean() < Cuts().dark_luma]
    one_shot = _cuts(frames)
    assert 60 <= one_shot[0] <= 90 and one_shot[1:3] == [170, 210], one_shot
    assert one_shot[3:] and all(dark[0] <= c <= dark[-1] + 1 for c in one_shot[3:]), (one_shot, dark)

    detector = CutDetector(FPS, Cuts())
    streamed: list[int] = []
    settled = 0
    for index, rgb in enumerate(frames):
        detector.feed(index, from_rgb(rgb))
        assert settled <= detector.settled <= index + 1
        settled = detector.settled
        taken = detector.take_cuts()
        assert all(cut < settled for cut in taken) and taken == sorted(taken)
        assert not streamed or not taken or taken[0] > streamed[-1]
        streamed += taken
    # The slowest dissolve pass samples once a step and decides a sample two samples later; a cut then
    # waits a step more, until every finer detector has placed the same transition.
    slowest = max(Cuts().dissolve_steps_s) * FPS
    assert index + 1 - settled <= 4 * slowest
    streamed += detector.finish()
    assert streamed == one_shot
    assert len(detector.luma) == len(frames)
    assert [i for i, luma in enumerate(detector.luma) if luma < Cuts().dark_luma] == dark


def test_the_single_detector_setting_keeps_its_meaning():
    config = CurationConfig.model_validate({"cuts": {"detector": "adaptive"}})
    assert config.cuts.detectors == ("adaptive", "fades")
    assert Cuts().detectors == ("content", "adaptive", "fades", "dissolves")


def test_the_shared_content_score_is_pyscenedetects():
    rng = np.random.default_rng(6)
    frames = _calm(rng, (70, 130, 90), 5) + _fast_pan(rng, (120, 60, 140), 5)
    library = ContentDetector()
    library.stats_manager = StatsManager()
    previous = None
    for index, rgb in enumerate(frames):
        timecode = FrameTimecode(index, fps=FPS)
        library.process_frame(timecode, np.ascontiguousarray(rgb[..., ::-1]))
        ours = 0.0 if previous is None else content_score(rgb, previous)
        previous = rgb
        (expected,) = library.stats_manager.get_metrics(timecode, [ContentDetector.FRAME_SCORE_KEY])
        assert ours == pytest.approx(expected or 0.0, abs=1e-9)
    assert ours > 10
    # The detectors take the shared score through this hook.
    assert "_calculate_frame_score" in vars(ContentDetector)


@pytest.mark.parametrize(("shape", "halvings"), [((180, 320), 2), ((136, 320), 1), ((144, 176), 2), ((270, 480), 3)])
def test_frame_statistics_in_batches_are_those_of_each_frame_alone(shape, halvings):
    """Means, content scores and HSV pictures of frames read in batches (any batch boundary, a
    partial last batch) equal those of each frame reduced alone (`reduced_rgb`)."""
    rng = np.random.default_rng(5)
    frames = [cv2.resize(f, shape[::-1], interpolation=cv2.INTER_AREA) for f in _fast_pan(rng, (120, 60, 140), 21)]
    i420 = [from_rgb(f) for f in frames]
    smalls = [reduced_rgb(f, halvings) for f in i420]
    statistics = FrameStatistics(shape, halvings, batch=8)
    means, scores, pictures = [], [], []
    for start in range(0, len(i420), 8):
        for frame in i420[start : start + 8]:
            statistics.add(frame)
        m, c, hsv = statistics.compute()
        means += m
        scores += c
        pictures += [p.copy() for p in hsv]
    assert statistics.size == smalls[0].shape[:2]
    np.testing.assert_allclose(means, [s.mean() for s in smalls], rtol=1e-12)
    expected = [0.0] + [content_score(b, a) for a, b in zip(smalls, smalls[1:], strict=False)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert min(scores[1:]) > 1  # a fast pan: every frame changes
    for picture, small in zip(pictures, smalls, strict=True):
        np.testing.assert_array_equal(picture, cv2.cvtColor(small, cv2.COLOR_RGB2HSV))


class _GivenScores(AdaptiveDetector):
    """PySceneDetect's adaptive detector on frame scores given to it."""

    value = 0.0

    def _calculate_frame_score(self, timecode, frame_img) -> float:
        return self.value


@pytest.mark.parametrize(("ratio", "min_score"), [(3.0, 15.0), (1.5, 40.0)])
def test_the_adaptive_rule_cuts_where_pyscenedetects_detector_does(ratio, min_score):
    rng = np.random.default_rng(11)
    scores = rng.gamma(2.0, 3.0, 900)
    scores[rng.choice(900, 40, replace=False)] += rng.uniform(10, 90, 40)  # cuts, some close together
    scores[400:430] = 0.0  # a still stretch: the ratio is 255 where the neighbours' mean is 0
    scores[415] = 50.0
    scores[600:700] += 45.0  # fast motion: high scores, none standing out
    library = _GivenScores(adaptive_threshold=ratio, min_content_val=min_score, min_scene_len=8)
    rule = AdaptiveRule(ratio, min_score, min_len=8)
    expected, got = [], []
    for index, score in enumerate(scores.tolist()):
        library.value = score
        expected += [t.frame_num for t in library.process_frame(FrameTimecode(index, fps=FPS), None)]
        if (cut := rule.feed(index, score)) is not None:
            got.append(cut)
    assert len(expected) >= 10 and 415 in expected
    assert got == expected


def test_the_fade_rule_cuts_where_pyscenedetects_detector_does():
    rng = np.random.default_rng(12)
    means = rng.uniform(20, 200, 1200)
    for start, length in [(0, 5), (100, 1), (104, 2), (300, 40), (500, 3), (505, 3), (900, 60)]:
        means[start : start + length] = rng.uniform(0, 11.9, length)  # dark: below the threshold 12
    means[700] = 12.0  # on the threshold: not dark
    library = ThresholdDetector(threshold=12.0, min_scene_len=8)
    rule = FadeRule(12.0, min_len=8)
    expected, got = [], []
    for index, mean in enumerate(means.tolist()):
        frame = np.full((2, 2, 3), mean)  # the library takes the frame's mean
        expected += [t.frame_num for t in library.process_frame(FrameTimecode(index, fps=FPS), frame)]
        if (cut := rule.feed(index, mean)) is not None:
            got.append(cut)
        assert rule.dark == (library.last_fade["type"] == "out")
    assert len(expected) >= 4 and got == expected
