"""Each finetune kind's own evaluation (`Task.evaluate`): the measurement on synthetic data
with known truth scores the truth near its known value and clearly better than a wrong
answer (the key frames held, the motion frozen or reversed, the views shuffled, the
camera classes swapped, the video data's colours), and each kind's `evaluate` runs end to
end on an untrained tiny model, its gate metric present and in its range."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from components.sample_data.orbits import orbit_azimuths, random_object, render_orbit, write_orbit_shards
from components.sample_data.palette import write_palette_image_shards
from components.sample_data.render import moving_shapes
from components.sample_data.shards import write_camera_shards, write_shapes_shards
from model.camera_lora import MOTION_CLASSES
from model.camera_motion import class_accuracy, class_clips
from model.data import ClipDataset, ClipSpec, ImageDataset
from model.masked_evaluation import interpolation_report, prediction_report
from model.multiview import view_retrieval
from model.spatial import evaluate_palette
from model.stages import VideoDiffusion, named_config
from model.tasks import KINDS


def _frames(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def _linear_clips(num_frames: int, seeds=(1, 3, 5)) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Discs at constant velocity, each at least 0.6 px a frame (the keys 4 frames apart
    far enough apart to give fractions)."""
    clips, velocities = [], []
    for seed in seeds:
        clip = moving_shapes(num_frames, 32, 32, num_shapes=1, max_speed=1.5, radius_range=(4, 5), seed=seed)
        assert np.linalg.norm(clip.velocities[0]) >= 0.6, seed
        clips.append(_frames(clip.frames))
        velocities.append(clip.velocities[0])
    return clips, velocities


# -- the measurements, on known truth -----------------------------------------------------


def test_interpolation_scores_the_true_in_betweens_near_zero_and_held_or_reversed_ones_at_their_fractions():
    clips, _ = _linear_clips(9)
    exact = interpolation_report(clips, clips)
    assert exact["fraction_error"] < 0.05 and exact["position_error_px"] < 0.3
    assert exact["measured_clips"] == 3
    assert exact["data"]["fraction_error"] == pytest.approx(exact["fraction_error"])
    held, reversed_ = [], []
    for clip in clips:  # each key repeated: fractions 0, 0, 0 for 1/4, 2/4, 3/4
        h, r = clip.clone(), clip.clone()
        h[1:4], h[5:8] = clip[0], clip[4]
        r[1:4], r[5:8] = clip[[3, 2, 1]], clip[[7, 6, 5]]  # 3/4, 2/4, 1/4: off by 1/2, 0, 1/2
        held.append(h)
        reversed_.append(r)
    assert interpolation_report(clips, held)["fraction_error"] == pytest.approx(0.5, abs=0.05)
    assert interpolation_report(clips, reversed_)["fraction_error"] == pytest.approx(1 / 3, abs=0.05)
    # Keys that do not move give no fraction: NaN, counted as unmeasured.
    still = [clips[0][[0] * 9]]
    report = interpolation_report(still, still)
    assert math.isnan(report["fraction_error"]) and report["measured_clips"] == 0
    with pytest.raises(ValueError, match="generated videos"):
        interpolation_report(clips, clips[:2])


def test_prediction_scores_the_true_continuation_near_zero_and_a_frozen_or_reversed_one_by_the_speed():
    clips, velocities = _linear_clips(8)
    speed = float(np.mean([np.linalg.norm(v) for v in velocities]))
    exact = prediction_report(clips, clips, context=2)
    assert exact["velocity_error"] < 0.05 and exact["next_position_error_px"] < 0.3
    assert exact["still_velocity_error"] == pytest.approx(speed, abs=0.05)
    frozen = [clip[[0, 1, 1, 1, 1, 1, 1, 1]] for clip in clips]  # the context, then its last frame held
    assert prediction_report(clips, frozen, context=2)["velocity_error"] == pytest.approx(speed, abs=0.05)
    reversed_ = [clip.flip(0) for clip in clips]  # moving back at the same speed: 2 |v| off
    assert prediction_report(clips, reversed_, context=2)["velocity_error"] == pytest.approx(2 * speed, abs=0.1)
    # Longer continuations are measured over the clip's length.
    longer = [torch.cat([clip, clip[-1:].expand(4, -1, -1, -1)]) for clip in clips]
    assert prediction_report(clips, longer, context=2)["velocity_error"] < 0.05
    with pytest.raises(ValueError, match="continuation"):
        prediction_report(clips, [clip[:5] for clip in clips], context=2)


def test_view_retrieval_finds_the_true_orbit_and_not_a_still_or_shuffled_one():
    rng = np.random.default_rng(0)
    truth = [
        _frames(render_orbit(random_object(rng), elevation, orbit_azimuths(8, rng.uniform(0, 360)), 32).frames)
        for elevation in (10.0, 30.0, 50.0)
    ]
    exact = view_retrieval(truth, truth)
    assert exact["view_retrieval"] == 1.0 and exact["chance"] == 1 / 8
    assert exact["per_view"] == [1.0] * 7 and exact["novel_l1"] == 0 and exact["turn_margin"] > 0
    still = view_retrieval([t[:1].expand_as(t) for t in truth], truth)  # a model that does not turn
    assert still["view_retrieval"] == 0.0 and still["turn_margin"] < 0
    shuffled = [t[[0, 2, 3, 4, 5, 6, 7, 1]] for t in truth]  # every novel view one azimuth ahead
    assert view_retrieval(shuffled, truth)["view_retrieval"] == 0.0
    # Slightly off views (noise) still retrieve their own azimuth.
    noisy = [t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in truth]
    assert view_retrieval(noisy, truth)["view_retrieval"] == 1.0
    with pytest.raises(ValueError, match="views"):
        view_retrieval([truth[0][:4]], [truth[0]])


def test_class_accuracy_reads_camera_clips_as_their_class_and_not_swapped_ones(tmp_path):
    paths, _ = write_camera_shards(tmp_path / "camera", clips_per_label=2, shards=1)
    shards = [str(p) for p in paths]
    spec = named_config("tiny", "camera-lora").clip
    videos = {name: [item["video"] for item in class_clips(shards, spec, name, 2)] for name in MOTION_CLASSES}
    assert {name: len(v) for name, v in videos.items()} == dict.fromkeys(MOTION_CLASSES, 2)
    exact = class_accuracy(videos)
    assert exact["accuracy"] == 1.0 and exact["per_class"] == dict.fromkeys(MOTION_CLASSES, 1.0)
    names = list(MOTION_CLASSES)
    swapped = {name: videos[names[(i + 1) % len(names)]] for i, name in enumerate(names)}  # each another class's
    assert class_accuracy(swapped)["accuracy"] == 0.0
    held = {name: videos["static"] for name in names}  # a camera that never moves: only static is right
    report = class_accuracy(held)
    assert report["accuracy"] == pytest.approx(1 / len(names)) and report["per_class"]["static"] == 1.0
    assert report["classes"]["pan"] == {"static": 2}
    # Shards without a class's clips give none of it.
    pans, _ = write_camera_shards(tmp_path / "pans", labels=("pan_left",), clips_per_label=1, shards=1)
    assert class_clips([str(p) for p in pans], spec, "zoom_in", 2) == []


def test_the_saturation_gap_is_zero_for_the_image_set_and_large_for_the_video_data(tmp_path):
    images, _ = write_palette_image_shards(tmp_path / "images", shards=1, images_per_shard=3, size=32)
    clips, _ = write_shapes_shards(tmp_path / "clips", shards=1, clips_per_shard=3, num_frames=8, fps=8.0)
    images, clips = [str(p) for p in images], [str(p) for p in clips]
    model = SimpleNamespace(config=SimpleNamespace(clip=ClipSpec(8, 8.0, 32, 32)))
    as_images = [i["video"] for i in ImageDataset(images, 32, 32, random_crop=False, epochs=1)]
    as_clips = [c["video"] for c in ClipDataset(clips, ClipSpec(8, 8.0, 32, 32), random_crop=False, epochs=1)]
    right = evaluate_palette(model, clips, images, as_images, clips=3)
    assert right["saturation_gap"] < 0.02 and right["image_set_saturation"] > 0.97
    wrong = evaluate_palette(model, clips, images, as_clips, clips=3)  # generated in the video data's colours
    assert wrong["saturation_gap"] > 0.5
    assert wrong["generated_saturation"] == pytest.approx(wrong["video_data_saturation"])
    with pytest.raises(ValueError, match="image set"):
        evaluate_palette(model, clips, [], as_images, clips=3)


# -- each kind's evaluate, end to end on an untrained tiny model --------------------------


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    return VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("video") / "final")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shapes"), shards=1, clips_per_shard=2, height=32, width=32)
    return [str(p) for p in paths]


def _check(evaluation, kind: str, low: float, high: float):
    metric = KINDS[kind].metric.name
    assert metric in evaluation.metrics
    value = evaluation.metrics[metric]
    assert low <= value <= high, (metric, value)
    assert all(isinstance(v, float) for v in evaluation.metrics.values()), evaluation.metrics
    assert evaluation.samples and all(s.dim() == 4 and s.shape[1] == 3 for s in evaluation.samples)
    return value


def test_interpolation_evaluates_its_in_between_positions(video_folder, shapes):
    model = VideoDiffusion.create(named_config("tiny", "interpolation"), init_from=video_folder)
    evaluation = model.task.evaluate(model, shapes, clips=2, steps=1)
    assert evaluation.details["measured_clips"] == 2  # both clips' keys move far enough apart
    _check(evaluation, "interpolation", 0, 10)  # fractions of a random model: anywhere on the line and off it
    assert evaluation.metrics["interpolation_position_error_px"] >= 0
    assert len(evaluation.samples) == 2 and evaluation.samples[0].shape == (9, 3, 32, 32)
    assert evaluation.details["data"]["fraction_error"] < 0.1  # the held-out clips' own in-betweens


def test_prediction_evaluates_the_continued_velocity(video_folder, shapes):
    model = VideoDiffusion.create(named_config("tiny", "prediction"), init_from=video_folder)
    evaluation = model.task.evaluate(model, shapes, clips=2, steps=1)
    _check(evaluation, "prediction", 0, 64)
    assert evaluation.samples[0].shape == (8, 3, 32, 32) and evaluation.details["context_frames"] == 2


def test_multiview_evaluates_view_retrieval(video_folder, tmp_path):
    i2v = VideoDiffusion.create(named_config("tiny", "i2v"), init_from=video_folder).save(tmp_path / "i2v")
    model = VideoDiffusion.create(named_config("tiny", "multiview"), init_from=i2v)
    paths, _ = write_orbit_shards(tmp_path / "orbits", shards=1, orbits_per_shard=2)
    evaluation = model.task.evaluate(model, [str(p) for p in paths], clips=2, steps=1)
    _check(evaluation, "multiview", 0, 1)
    assert evaluation.details["chance"] == 1 / 8 and evaluation.details["first_view_repeated"]["view_retrieval"] == 0


def test_camera_lora_evaluates_each_adapters_class_accuracy(video_folder, tmp_path):
    config = named_config("tiny", "camera-lora")
    pan = VideoDiffusion.create(config.with_fields(motion_class="pan"), init_from=video_folder).save(tmp_path / "pan")
    model = VideoDiffusion.create(config.with_fields(motion_class="zoom_in"), init_from=pan)
    # Held-out clips of pans and static cameras only: the zoom_in adapter samples at the default score.
    paths, _ = write_camera_shards(
        tmp_path / "camera", labels=("pan_left", "pan_right", "static"), clips_per_label=1, shards=1
    )
    evaluation = model.task.evaluate(model, [str(p) for p in paths], clips=2, steps=1)
    value = _check(evaluation, "camera-lora", 0, 1)
    per_class = evaluation.details["per_class"]
    assert sorted(per_class) == ["pan", "zoom_in"] and value == pytest.approx(np.mean(list(per_class.values())))
    assert 0 <= evaluation.metrics["camera_class_accuracy_base"] <= 1
    settings = evaluation.details["settings"]
    assert settings["pan"]["data_clips"] == 2 and settings["pan"]["motion_score"] == pytest.approx(4.0, abs=1e-3)
    assert settings["zoom_in"]["data_clips"] == 0 and settings["zoom_in"]["motion_score"] == 1.0
    assert len(evaluation.samples) == 2


def test_spatial_hq_evaluates_the_saturation_gap_with_the_motion_guard(video_folder, shapes, tmp_path):
    model = VideoDiffusion.create(named_config("tiny", "spatial-hq"), init_from=video_folder)
    images, _ = write_palette_image_shards(tmp_path / "images", shards=1, images_per_shard=2, size=32)
    evaluation = model.task.evaluate(model, shapes, clips=2, steps=1, reference=[str(p) for p in images])
    _check(evaluation, "spatial-hq", 0, 1)
    assert "motion_speed_error" in evaluation.metrics and evaluation.metrics["image_set_saturation"] > 0.97
    assert evaluation.details["image_quality"]["saturation_gap"] == evaluation.metrics["saturation_gap"]
    with pytest.raises(ValueError, match="image set"):
        model.task.evaluate(model, shapes, clips=2, steps=1)
