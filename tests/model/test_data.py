"""The clip loader: requested frames, fps and size; deterministic; resumable; split by rank."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from components.sample_data.shards import write_image_shards, write_shapes_shards
from model.data import ClipDataset, ClipSpec, ImageDataset

SOURCE_FPS = 24.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    paths, truth = write_shapes_shards(
        folder, shards=4, clips_per_shard=5, num_frames=24, fps=SOURCE_FPS, height=48, width=64, max_speed=1.5
    )
    return [str(p) for p in paths], truth


def keys(dataset, n: int, workers: int = 0) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [item["key"] for item in itertools.islice(loader, n)]


def centroid(frame: torch.Tensor) -> np.ndarray:
    weight = (frame.mean(0) + 1).clamp(min=0).numpy()  # bright disc on black
    weight = np.where(weight > 0.5 * weight.max(), weight, 0)
    ys, xs = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_clips_have_the_requested_frames_fps_and_size(shards):
    paths, truth = shards
    spec = ClipSpec(num_frames=4, fps=8.0, height=48, width=64)  # stride 3 source frames
    item = next(iter(ClipDataset(paths, spec, random_crop=False)))
    assert item["video"].shape == (4, 3, 48, 64)
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["fps"].item() == 8.0
    # The disc moves 3 source frames' worth between sampled frames.
    velocity = np.array(truth[item["key"]]["velocities"][0])
    steps = np.diff(np.stack([centroid(f) for f in item["video"]]), axis=0)
    np.testing.assert_allclose(steps, np.tile(3 * velocity, (3, 1)), atol=0.35)
    # The curated score is the speed per source frame; the model is told it per drawn frame.
    assert item["motion"].item() == pytest.approx(3 * np.linalg.norm(velocity), rel=1e-5)


def test_resize_and_crop_to_a_smaller_stage_resolution(shards):
    paths, _ = shards
    item = next(iter(ClipDataset(paths, ClipSpec(num_frames=2, fps=24.0, height=32, width=32))))
    assert item["video"].shape == (2, 3, 32, 32)


def test_clips_too_short_for_the_stage_are_an_error_not_a_hang(shards):
    paths, _ = shards
    long_clip = ClipSpec(num_frames=8, fps=4.0)  # needs 43 source frames; the clips have 24
    with pytest.raises(ValueError, match="long enough"):
        next(iter(ClipDataset(paths, long_clip)))


def test_same_seed_same_stream_other_seed_other_order(shards):
    paths, _ = shards
    spec = ClipSpec(num_frames=2, fps=12.0, height=32, width=32)
    a = list(itertools.islice(iter(ClipDataset(paths, spec, seed=3, shuffle_buffer=4)), 12))
    b = list(itertools.islice(iter(ClipDataset(paths, spec, seed=3, shuffle_buffer=4)), 12))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))
    assert keys(ClipDataset(paths, spec, seed=4, shuffle_buffer=4), 12) != [x["key"] for x in a]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_order(shards, workers):
    paths, _ = shards
    spec = ClipSpec(num_frames=2, fps=12.0, height=32, width=32)
    full = keys(ClipDataset(paths, spec, seed=1, shuffle_buffer=3), 45, workers)  # past one epoch (20 clips)
    resumed = keys(ClipDataset(paths, spec, seed=1, shuffle_buffer=3, start=17), 28, workers)
    assert resumed == full[17:45]
    assert len(set(full[:20])) == 20  # an epoch visits every clip once


def test_ranks_read_disjoint_shards(shards):
    paths, _ = shards
    spec = ClipSpec(num_frames=2, fps=12.0, height=32, width=32)
    rank0 = set(keys(ClipDataset(paths, spec, rank=0, world_size=2, shuffle_buffer=1), 10))
    rank1 = set(keys(ClipDataset(paths, spec, rank=1, world_size=2, shuffle_buffer=1), 10))
    assert rank0.isdisjoint(rank1) and len(rank0 | rank1) == 20


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    paths, truth = write_image_shards(tmp_path_factory.mktemp("images"), shards=3, images_per_shard=4, size=64)
    return [str(p) for p in paths], truth


def test_image_shards_give_one_frame_items_at_the_stage_size_with_the_disc_in_place(image_shards):
    paths, truth = image_shards
    items = list(itertools.islice(iter(ImageDataset(paths, 32, 32, random_crop=False)), 12))
    assert sorted(item["key"] for item in items) == sorted(truth)  # an epoch visits every image once
    for item in items:
        assert item["video"].shape == (1, 3, 32, 32) and item["caption"] == "a disc on black"
        expected = np.array(truth[item["key"]]["position"]) / 2  # 64 -> 32 px
        assert np.abs(centroid(item["video"][0]) - expected).max() < 1.0


def test_image_loader_resumes_in_the_same_order(image_shards):
    paths, _ = image_shards
    full = keys(ImageDataset(paths, 32, 32, seed=3, shuffle_buffer=3), 20, 2)
    assert keys(ImageDataset(paths, 32, 32, seed=3, shuffle_buffer=3, start=7), 13, 2) == full[7:20]


def test_shards_written_before_the_record_class_still_load(shards, tmp_path):
    """`<key>.json` as the synthetic writers wrote it before model/records.py (every score, 0.0
    for the unmeasured ones) reads as a ClipRecord: the loader's contract did not change."""
    import json

    paths, _ = shards
    sample = next(iter(wds.WebDataset(paths[0], shardshuffle=False)))
    legacy = json.loads(sample["json"])
    legacy["scores"] |= {"text_ratio": 0.0, "aesthetic": 0.0, "clip_sim": 0.0}
    path = tmp_path / "legacy-000000.tar"
    with wds.TarWriter(str(path), mtime=0) as tar:
        tar.write({"__key__": sample["__key__"], "mp4": sample["mp4"], "json": json.dumps(legacy).encode()})
    item = next(iter(ClipDataset([str(path)], ClipSpec(num_frames=2, fps=12.0, height=32, width=32))))
    assert item["key"] == sample["__key__"] and item["caption"] == legacy["caption"]
    assert item["motion"].item() == pytest.approx(legacy["scores"]["motion"] * SOURCE_FPS / 12.0)


def test_a_camera_motion_filter_outside_the_vocabulary_is_refused(shards):
    paths, _ = shards
    with pytest.raises(ValueError, match="unknown camera motion 'pan-left'"):
        ClipDataset(paths, ClipSpec(), camera_motion=("pan-left",))
    # A known label no clip has: nothing usable (the shapes clips are all static).
    with pytest.raises(ValueError, match="labelled zoom_in"):
        next(iter(ClipDataset(paths, ClipSpec(num_frames=2, fps=12.0), camera_motion=("zoom_in",), epochs=1)))


def _as_heldout(paths: list[str], folder) -> list[str]:
    """Copies of the shards with every sample's JSON in the held-out split, as curation's `heldout/` has them."""
    import json

    folder.mkdir()
    copies = []
    for path in paths:
        copy = folder / path.rsplit("/", 1)[1]
        with wds.TarWriter(str(copy), mtime=0) as tar:
            for sample in wds.WebDataset(path, shardshuffle=False):
                meta = json.loads(sample["json"]) | {"split": "heldout"}
                tar.write(
                    {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                    | {"json": json.dumps(meta).encode()}
                )
        copies.append(str(copy))
    return copies


def test_training_loaders_refuse_heldout_clips_and_evaluation_reads_them(shards, image_shards, tmp_path):
    spec = ClipSpec(num_frames=2, fps=12.0, height=32, width=32)
    heldout = _as_heldout(shards[0][:2], tmp_path / "heldout")
    with pytest.raises(ValueError, match=r"clip 'shapes-\S+' belongs to the held-out split, which training never"):
        next(iter(ClipDataset(heldout, spec)))
    with pytest.raises(ValueError, match="train on the curated output's shards/, not its heldout/"):
        next(iter(ClipDataset(heldout, spec, start=3)))  # also when resuming past them
    read = list(ClipDataset(heldout, spec, heldout=True, epochs=1))
    originals = list(ClipDataset(shards[0][:2], spec, epochs=1))  # the same clips as training data
    assert [item["key"] for item in read] == [item["key"] for item in originals] and len(read) == 10
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(read, originals, strict=True))
    # Both splits together: the evaluation's keyword reads them all.
    both = ClipDataset([*heldout, *shards[0][2:]], spec, heldout=True, epochs=1)
    assert len(list(both)) == 20
    images = _as_heldout(image_shards[0][:1], tmp_path / "images")
    with pytest.raises(ValueError, match="belongs to the held-out split"):
        next(iter(ImageDataset(images, 32, 32)))
    assert len(list(ImageDataset(images, 32, 32, heldout=True, epochs=1))) == 4


# -- several frame rates (fps micro-conditioning) -------------------------------------------


def rate_items(paths: list[str], spec: ClipSpec, n: int, **kwargs) -> list[dict]:
    return list(itertools.islice(iter(ClipDataset(paths, spec, random_crop=False, **kwargs)), n))


def test_several_rates_draw_whole_strides_at_their_real_rate_and_motion_per_drawn_frame(shards):
    paths, truth = shards
    # 24 fps source: 4 -> stride 6, 7 -> stride 3 (8 fps, not 7), 12 -> 2, 24 -> 1.
    spec = ClipSpec(num_frames=4, fps=12.0, fps_choices=(4.0, 7.0, 12.0, 24.0), height=48, width=64)
    items = rate_items(paths, spec, 40)  # two epochs of 20 clips
    assert {item["fps"].item() for item in items} == {4.0, 8.0, 12.0, 24.0}  # real rates: 24 / stride
    for item in items:
        stride = round(SOURCE_FPS / item["fps"].item())
        assert item["fps"].item() == SOURCE_FPS / stride
        velocity = np.array(truth[item["key"]]["velocities"][0])  # px per source frame
        steps = np.diff(np.stack([centroid(f) for f in item["video"]]), axis=0)
        np.testing.assert_allclose(steps, np.tile(stride * velocity, (3, 1)), atol=0.4)
        # The curated score is the speed per source frame; the loader passes it per drawn frame.
        assert item["motion"].item() == pytest.approx(stride * np.linalg.norm(velocity), rel=1e-5)


def test_held_out_clips_are_read_at_the_one_rate_evaluation_generates_at(shards, tmp_path):
    paths, truth = shards
    spec = ClipSpec(num_frames=4, fps=12.0, fps_choices=(4.0, 12.0, 24.0), height=48, width=64)
    items = rate_items(_as_heldout(paths[:2], tmp_path / "heldout"), spec, 10, heldout=True)
    assert len(items) == 10 and {item["fps"].item() for item in items} == {12.0}
    for item in items:  # stride 2 at 24 fps; motion per drawn frame, as the model was told in training
        velocity = np.array(truth[item["key"]]["velocities"][0])
        assert item["motion"].item() == pytest.approx(2 * np.linalg.norm(velocity), rel=1e-5)
        steps = np.diff(np.stack([centroid(f) for f in item["video"]]), axis=0)
        np.testing.assert_allclose(steps, np.tile(2 * velocity, (3, 1)), atol=0.4)


def test_only_rates_a_clip_is_long_enough_for_are_drawn(shards):
    paths, _ = shards
    # 8 frames at 2 fps need 85 source frames (stride 12): the 24-frame clips only fit 8 and 12 fps.
    spec = ClipSpec(num_frames=8, fps=8.0, fps_choices=(2.0, 8.0, 12.0), height=32, width=32)
    assert {item["fps"].item() for item in rate_items(paths, spec, 20)} == {8.0, 12.0}
    too_slow = ClipSpec(num_frames=8, fps=2.0, fps_choices=(1.0, 2.0), height=32, width=32)
    with pytest.raises(ValueError, match="long enough"):
        next(iter(ClipDataset(paths, too_slow)))


def test_one_rate_given_as_a_choice_reads_exactly_as_the_single_fps(shards):
    paths, _ = shards
    today = ClipSpec(num_frames=3, fps=7.0, height=32, width=32)  # stride 24/7: rounded, as before
    one_choice = ClipSpec(num_frames=3, fps=7.0, fps_choices=(7.0,), height=32, width=32)
    a, b = rate_items(paths, today, 10, seed=5), rate_items(paths, one_choice, 10, seed=5)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
        assert x["fps"].item() == y["fps"].item() == 7.0 and x["motion"].item() == y["motion"].item()
    # Today's indices: a uniform start, then start + i * 24/7 rounded, from the sample's seeded rng.
    dataset = ClipDataset(paths, one_choice, seed=5)
    raw = next(iter(wds.WebDataset(paths[0], shardshuffle=False)))
    _, indices, _ = dataset._plan(0, raw)
    start = random.Random(f"5:0:{raw['__key__']}").uniform(0, 23 - 2 * 24 / 7)
    assert indices == [int(round(start + i * 24 / 7)) for i in range(3)]


def test_rate_draws_are_seeded_and_resume_exactly(shards):
    paths, _ = shards
    spec = ClipSpec(num_frames=2, fps=8.0, fps_choices=(4.0, 8.0, 12.0, 24.0), height=32, width=32)

    def drawn(n: int, workers: int = 0, **kwargs) -> list[tuple[str, float]]:
        loader = DataLoader(ClipDataset(paths, spec, shuffle_buffer=3, **kwargs), batch_size=None, num_workers=workers)
        return [(item["key"], item["fps"].item()) for item in itertools.islice(loader, n)]

    full = drawn(45, seed=1)
    assert full == drawn(45, seed=1)
    assert [fps for _, fps in full] != [fps for _, fps in drawn(45, seed=2)]
    for workers in (0, 2):
        assert drawn(28, workers, seed=1, start=17) == drawn(45, workers, seed=1)[17:45]
    # Each clip is drawn at its own rate per epoch: some clips change rate between epochs.
    first, second = dict(full[:20]), dict(full[20:40])
    assert any(first[key] != second[key] for key in first)


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        ({"fps": 7.0, "fps_choices": [4, 8]}, r"clip.fps 7 is not one of clip.fps_choices \[4.0, 8.0\]"),
        ({"fps_choices": []}, r"clip.fps_choices \[\]: one or more frame rates above 0"),
        ({"fps": 8.0, "fps_choices": [8, -4]}, r"clip.fps_choices \[8.0, -4.0\]: one or more frame rates above 0"),
    ],
)
def test_bad_rate_choices_are_refused_naming_the_field(clip, message):
    with pytest.raises(ValueError, match=message):
        ClipSpec(**clip)


def test_rate_choices_from_yaml_are_a_tuple_and_survive_the_model_config(tmp_path):
    from model.stages import StageConfig, named_config

    config = named_config("tiny", "video")
    raw = config.to_dict() | {"clip": {"num_frames": 8, "fps": 8, "fps_choices": [4, 8, 12]}}
    loaded = StageConfig.from_dict(raw)
    assert loaded.clip.fps_choices == (4.0, 8.0, 12.0) and loaded.clip.several_rates
    assert StageConfig.from_dict(loaded.to_dict()).clip == loaded.clip
    assert loaded.clip.single_rate() == ClipSpec(num_frames=8, fps=8.0)
