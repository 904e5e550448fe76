"""The motion metric on clips with known motion: it reads the true speed, calls a
straight path straight and shuffled frames erratic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.sample_data.render import moving_shapes
from model.evaluation import motion_stats, track


def _clip(seed: int, speed: float = 1.5) -> tuple[torch.Tensor, np.ndarray]:
    shapes = moving_shapes(12, 48, 64, num_shapes=1, max_speed=speed, radius_range=(5, 6), seed=seed)
    frames = torch.from_numpy(shapes.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    return frames, shapes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reads_the_true_speed_of_a_straight_track(seed):
    frames, shapes = _clip(seed)
    np.testing.assert_allclose(track(frames), shapes.positions[:, 0], atol=0.15)
    stats = motion_stats(frames)
    assert stats.speed_px_per_frame == pytest.approx(float(np.linalg.norm(shapes.velocities[0])), rel=0.05, abs=0.05)
    assert stats.straightness > 0.98 and stats.jerk_px < 0.15


def test_shuffled_frames_look_erratic():
    frames, shapes = _clip(4, speed=2.0)
    shuffled = frames[torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))]
    straight, erratic = motion_stats(frames), motion_stats(shuffled)
    assert erratic.straightness < 0.5 < straight.straightness
    assert erratic.jerk_px > 5 * straight.jerk_px


def test_a_static_clip_has_no_speed():
    frames, _ = _clip(5)
    still = frames[:1].repeat(8, 1, 1, 1)
    assert motion_stats(still).speed_px_per_frame < 1e-6


def test_evaluate_motion_compares_generated_clips_with_the_data(tmp_path):
    from dataclasses import replace

    from components.sample_data.shards import write_shapes_shards
    from model.evaluation import evaluate_motion
    from model.stages import named_config
    from model.train import train

    paths, truth = write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2, max_speed=1.0)
    shards = [str(p) for p in paths]
    model = train(replace(named_config("tiny", "video"), max_steps=1), shards, tmp_path / "run").model
    report = evaluate_motion(model, shards, clips=2, steps=2)
    assert set(report) == {"data", "generated", "samples", "clips", "prompts"} and len(report["samples"]) == 2
    # Each sample beside the data clip it stands for and its text (no prompts given: the clip's caption).
    assert [c.shape for c in report["clips"]] == [s.shape for s in report["samples"]] and len(report["prompts"]) == 2
    # Data clips are tracked at the model's resolution and fps: 3 source frames per sample, 32/64 of the size.
    speeds = [np.linalg.norm(np.array(t["velocities"][0])) for t in truth.values()]
    assert report["data"]["speed_px_per_frame"] == pytest.approx(3 * 0.5 * float(np.mean(speeds)), rel=0.5)
    assert report["data"]["straightness"] > 0.9
