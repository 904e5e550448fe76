"""Text boxes confirmed by the PP-OCRv4 recogniser (real offline weights): burned-in captions keep their text
ratio, strips of fine texture that the detector alone takes for text get none."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from components.curation.neural import NeuralConfig, TextDetector, crop_box, middle_of

HEIGHT, WIDTH = 180, 320
SKY = (150, 190, 230)
CAPTION = "THE QUICK BROWN FOX"


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> TextDetector:
    cache = tmp_path_factory.mktemp("models")
    return TextDetector(NeuralConfig(batch_size=8, device="cpu", cache_dir=str(cache)))


def _scene(rng: np.random.Generator) -> np.ndarray:
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = SKY
    for _ in range(6):
        centre = (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT - 40)))
        cv2.circle(image, centre, int(rng.integers(10, 40)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return cv2.GaussianBlur(image, (5, 5), 0)


def _captioned(rng: np.random.Generator) -> np.ndarray:
    """A scene with a large white caption on a dark bar along the bottom."""
    image = _scene(rng)
    cv2.rectangle(image, (0, 130), (WIDTH, HEIGHT), (20, 20, 20), -1)
    cv2.putText(image, CAPTION, (10, 158), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    return image


def _strips(rng: np.random.Generator, texture) -> np.ndarray:
    """Sky crossed by 8 px strips of `texture(rng, (8, WIDTH))` (RGB uint8): the height of a line of text."""
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = SKY
    for top in range(10, HEIGHT - 8, 24):
        image[top : top + 8] = texture(rng, (8, WIDTH))
    return image


def _noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """White noise: the finest texture there is (gravel, static)."""
    return np.repeat(rng.integers(0, 256, shape, dtype=np.uint8)[..., None], 3, axis=2)


def _foliage(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Band-pass noise in leaf greens: a hedge or tree line seen from afar."""
    noise = rng.normal(size=shape)
    band = cv2.GaussianBlur(noise, (0, 0), 0.7) - cv2.GaussianBlur(noise, (0, 0), 1.4)
    band /= band.std()
    return np.clip(np.stack([40 + 35 * band, 110 + 60 * band, 30 + 25 * band], axis=-1), 0, 255).astype(np.uint8)


def test_the_recogniser_reads_the_caption_and_keeps_its_ratio_while_texture_strips_lose_theirs(detector):
    rng = np.random.default_rng(0)
    frames = {
        "caption": _captioned(rng),
        "noise": _strips(rng, _noise),
        "foliage": _strips(rng, _foliage),
        "clean": _scene(rng),
    }
    detected = dict(zip(frames, detector.text_ratios(list(frames.values()), confirm=False), strict=True))
    confirmed = dict(zip(frames, detector.text_ratios(list(frames.values())), strict=True))

    # The caption bar's text line covers about a tenth of the frame; the recogniser confirms all of it.
    assert 0.06 < detected["caption"] < 0.25
    assert confirmed["caption"] == pytest.approx(detected["caption"])
    # Detection alone scores the texture strips as text, above the default filter's 0.05 ...
    assert detected["noise"] > 0.1 and detected["foliage"] > 0.08, detected
    # ... the recogniser reads nothing in them with confidence.
    assert confirmed["noise"] < 0.005 and confirmed["foliage"] < 0.005, confirmed
    for name in ("noise", "foliage"):
        image, polygons = detector.detect([frames[name]])[0]
        crops = [middle_of(crop_box(image, polygon), detector.config.ocr_confirm_aspect) for polygon in polygons]
        scores = [score for _, score in detector.read(crops)]
        assert max(scores) < detector.config.text_min_confidence - 0.1, (name, scores)
    assert detected["clean"] == confirmed["clean"] == 0.0

    image, polygons = detector.detect([frames["caption"]])[0]
    assert len(polygons) >= 1
    read = detector.read([crop_box(image, polygon) for polygon in polygons])
    words = " ".join(text for text, _ in sorted(read, key=lambda r: r[0]))
    assert set(re.findall(r"[A-Z]+", words)) == set(CAPTION.split()), read
    assert min(score for _, score in read) > 0.9
