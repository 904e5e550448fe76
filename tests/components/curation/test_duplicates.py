"""Near-duplicate clips by perceptual hash, on synthetic clips whose copies are known."""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict

import av
import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from components.common.media import write_video
from components.curation.config import CurationConfig, with_random_weights
from components.curation.curate import curate
from components.curation.duplicates import DEFAULT_MAX_DISTANCE, DuplicateIndex, hamming, phash
from components.sample_data.synth import SynthConfig, _Catalogue

HEIGHT, WIDTH = 180, 320
PALETTE = np.random.default_rng(99).integers(0, 256, (6, 3))


def _scene(seed: int, frames: int = 3, step: int = 12) -> np.ndarray:
    """(frames, H, W, 3) RGB: blurred circles and boxes of one shared palette on a background, each drifting
    by `step` px a frame in its own direction. The seed picks the shapes and their motion."""
    rng = np.random.default_rng(seed)
    shapes = [
        (
            bool(rng.random() < 0.5),
            rng.integers(0, [WIDTH, HEIGHT]),
            int(rng.integers(10, 60)),
            rng.integers(10, [100, 80]),
            rng.normal(size=2),
            tuple(int(c) for c in PALETTE[rng.integers(1, len(PALETTE))]),
        )
        for _ in range(12)
    ]
    out = np.empty((frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(frames):
        image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        image[:] = PALETTE[0]
        for is_circle, (x, y), radius, (w, h), direction, colour in shapes:
            dx, dy = (direction / np.linalg.norm(direction) * step * t).round().astype(int)
            if is_circle:
                cv2.circle(image, (int(x + dx), int(y + dy)), radius, colour, -1)
            else:
                cv2.rectangle(image, (int(x + dx), int(y + dy)), (int(x + dx + w), int(y + dy + h)), colour, -1)
        out[t] = cv2.GaussianBlur(image, (5, 5), 0)
    return out


def _reencoded(frames: np.ndarray, crf: int) -> np.ndarray:
    """Through H.264 at `crf` and back."""
    buffer = io.BytesIO()
    write_video(buffer, frames, 30.0, crf=crf)
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _rescaled(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def _cropped(frames: np.ndarray, share: float) -> np.ndarray:
    """`share` of each side cut off, scaled back to the full size."""
    top, left = round(HEIGHT * share), round(WIDTH * share)
    return _rescaled(frames[:, top : HEIGHT - top, left : WIDTH - left], WIDTH, HEIGHT)


def _hashes(frames: np.ndarray) -> tuple[str, ...]:
    return tuple(phash(frame) for frame in frames)


COPIES = {
    "reencoded": lambda f: _reencoded(f, crf=40),
    "half_size": lambda f: _rescaled(f, WIDTH // 2, HEIGHT // 2),
    "upscaled_1080p": lambda f: _rescaled(f, 1920, 1080),
    "cropped_2pct": lambda f: _cropped(f, 0.02),
    "brighter": lambda f: np.clip(f.astype(np.int16) + 40, 0, 255).astype(np.uint8),
    "lower_contrast": lambda f: (f * 0.7 + 30).astype(np.uint8),
}


def test_phash_is_16_hex_digits_and_hamming_counts_bits():
    frame = _scene(1)[0]
    assert len(phash(frame)) == 16 and int(phash(frame), 16) >= 0
    assert phash(frame) == phash(frame.copy())
    assert hamming("0000000000000000", "000000000000000f") == 4
    assert hamming("ffffffffffffffff", "0000000000000000") == 64
    # A flat frame has no structure: every frequency is zero, only the mean (DC) bit is set.
    assert phash(np.full((HEIGHT, WIDTH, 3), 77, np.uint8)) == "8000000000000000"


def test_copies_hash_close_and_other_content_far():
    original = _scene(1)
    for name, copy in COPIES.items():
        distances = [hamming(a, b) for a, b in zip(_hashes(original), _hashes(copy(original)), strict=True)]
        assert max(distances) <= 6, (name, distances)
    others = {
        # Same palette, other shapes and motion.
        **{f"scene{seed}": _scene(seed) for seed in range(2, 12)},
        # The same scene, shifted a quarter of the frame.
        "shifted": np.roll(original, WIDTH // 4, axis=2),
    }
    for name, other in others.items():
        distances = [hamming(a, b) for a, b in zip(_hashes(original), _hashes(other), strict=True)]
        assert min(distances) >= 2 * DEFAULT_MAX_DISTANCE, (name, distances)


def test_index_drops_every_copy_for_the_best_original_and_keeps_other_content():
    index = DuplicateIndex()
    originals = {seed: _scene(seed) for seed in (1, 2)}
    expected = {}
    for seed, frames in originals.items():
        index.add(f"orig{seed}", _hashes(frames), quality=5.0)
        for name, copy in COPIES.items():
            index.add(f"{name}{seed}", _hashes(copy(frames)), quality=4.0)
            expected[f"{name}{seed}"] = f"orig{seed}"
    # A copy of better quality than its original is the one kept.
    index.add("best_copy3", _hashes(_reencoded(_scene(3), crf=30)), quality=9.0)
    index.add("orig3", _hashes(_scene(3)), quality=5.0)
    expected["orig3"] = "best_copy3"
    # Not copies: same palette, other shapes/motion; the same scene shifted far; same first frame, other motion.
    for seed in range(4, 8):
        index.add(f"other{seed}", _hashes(_scene(seed)), quality=1.0)
    index.add("shifted1", _hashes(np.roll(originals[1], WIDTH // 4, axis=2)), quality=1.0)
    index.add("faster1", _hashes(_scene(1, step=40)), quality=1.0)
    assert len(index) == 2 + 2 * len(COPIES) + 2 + 4 + 2
    assert index.duplicates() == expected


def test_kept_clip_is_chosen_by_quality_then_key_whatever_the_order_of_adding():
    base = _hashes(_scene(1))
    clips = [("b", base, 1.0), ("a", base, 1.0), ("c", base, float("nan")), ("d", base, 0.5)]
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        index = DuplicateIndex()
        for i in order:
            index.add(*clips[i])
        results.append(index.duplicates())
    assert results == [{"b": "a", "c": "a", "d": "a"}] * 3


def test_a_dropped_clip_names_a_kept_clip_it_is_near_not_a_chain():
    # a ~ b and b ~ c, but a is far from c: b goes for a, c stays (its only near copy was dropped).
    a = "0000000000000000"
    b = "00000000000000ff"  # 8 bits from a
    c = "000000000000ffff"  # 8 bits from b, 16 from a
    index = DuplicateIndex(max_distance=8)
    index.add("a", (a, a, a), 3.0)
    index.add("b", (b, b, b), 2.0)
    index.add("c", (c, c, c), 1.0)
    assert index.duplicates() == {"b": "a"}
    # One frame too far makes two clips different, however close the other frames are.
    index = DuplicateIndex(max_distance=8)
    index.add("a", (a, a, a), 3.0)
    index.add("b", (a, a, c), 2.0)
    assert index.duplicates() == {}


def test_ten_thousand_clips_in_under_two_seconds_from_bucket_collisions_not_all_pairs():
    count = 10_000
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, (count, 3), dtype=np.uint64)
    expected = {}
    for i in range(0, count, 100):  # every 100th clip copied with up to max_distance bits flipped per frame
        for frame in range(3):
            flips = rng.choice(64, int(rng.integers(0, DEFAULT_MAX_DISTANCE + 1)), replace=False)
            hashes[i + 1, frame] = hashes[i, frame] ^ np.uint64(sum(1 << int(bit) for bit in flips))
        expected[f"clip{i + 1:05d}"] = f"clip{i:05d}"
    index = DuplicateIndex()
    for i, row in enumerate(hashes):
        index.add(f"clip{i:05d}", tuple(f"{int(h):016x}" for h in row), quality=float(i % 100 == 0))
    start = time.perf_counter()
    assert index.duplicates() == expected
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    # Only bucket collisions were checked bit by bit: a tiny share of the 50 million pairs.
    assert index.candidates < count * (count - 1) // 2 // 1000, index.candidates


def test_dedup_config_bounds_the_distance():
    assert CurationConfig().dedup.max_distance == DEFAULT_MAX_DISTANCE and CurationConfig().dedup.enabled
    assert CurationConfig.from_yaml("dedup: {max_distance: 10}").dedup.max_distance == 10
    with pytest.raises(ValidationError):
        CurationConfig.from_yaml("dedup: {max_distance: 40}")
    with pytest.raises(ValueError, match="max_distance"):
        DuplicateIndex(max_distance=32)


ORIGINAL_AND_COPY = ("original.mp4", "reupload.mp4")


def test_curate_drops_a_reuploaded_videos_clips_as_duplicates_of_the_originals(store, settings, prefix, tmp_path):
    """Through annotate (hashes from real decoded key frames) and finalize: a smaller, harder-compressed
    re-upload of a three-shot video loses one clip of each pair; an unrelated video keeps its clip."""
    catalogue = _Catalogue(SynthConfig(seed=3))
    shots, _ = catalogue.cuts()
    other, _ = catalogue.objects()
    folder = tmp_path / "raw"
    folder.mkdir()
    write_video(folder / "original.mp4", shots, 24.0)
    write_video(folder / "reupload.mp4", _rescaled(shots, 240, 136), 24.0, crf=32)
    write_video(folder / "other.mp4", other, 24.0)
    config = with_random_weights(CurationConfig(filters=()))
    result = curate(str(folder), f"{prefix}/out", config, store, workers=1, settings=settings)

    rows = [json.loads(line) for line in store.get_bytes(f"{prefix}/out/manifest.jsonl").decode().splitlines()]
    by_video = defaultdict(list)
    for row in rows:
        assert len(row["phash"]) == 3 and all(len(h) == 16 for h in row["phash"])
        by_video[row["video"].rsplit("/", 1)[-1]].append(row)
    original, reupload = (sorted(by_video[name], key=lambda r: r["start_frame"]) for name in ORIGINAL_AND_COPY)
    assert len(original) == len(reupload) == 3
    for a, b in zip(original, reupload, strict=True):
        kept, dropped = (a, b) if a["kept"] else (b, a)
        assert kept["kept"] and kept["drop_reasons"] == [] and kept.get("duplicate_of") is None
        assert not dropped["kept"] and dropped["drop_reasons"] == ["duplicate"]
        assert dropped["duplicate_of"] == kept["key"]
        # The better of the two is kept (ties: the smaller key).
        assert (kept["scores"]["aesthetic"], dropped["key"]) >= (dropped["scores"]["aesthetic"], kept["key"])
    assert [(r["kept"], r.get("duplicate_of")) for r in by_video["other.mp4"]] == [(True, None)]
    assert result.card["drops_per_filter"]["duplicate"] == 3
