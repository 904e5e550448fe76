"""The training loop end to end on the tiny configs: Stage I -> II -> III, partial
training, and a resumed run that repeats the uninterrupted loss curve."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from components.sample_data.shards import write_image_shards, write_shapes_shards
from model.networks import is_temporal
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=4)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def stage_one(shards, tmp_path_factory):
    config = replace(named_config("tiny", "image"), max_steps=6, checkpoint_every=3)
    return train(config, shards, tmp_path_factory.mktemp("stage1"))


def test_three_stages_chain(stage_one, shards, tmp_path):
    assert stage_one.steps == 6 and all(torch.isfinite(torch.tensor(stage_one.losses)))
    assert (stage_one.final / "unet" / "config.json").exists()
    video = train(
        replace(named_config("tiny", "video"), max_steps=3), shards, tmp_path / "s2", init_from=stage_one.final
    )
    hq = train(replace(named_config("tiny", "hq"), max_steps=2), shards, tmp_path / "s3", init_from=video.final)
    assert video.steps == 3 and hq.steps == 2 and (hq.final / "unet" / "config.json").exists()
    assert named_config("tiny", "hq").p_mean_at_resolution > named_config("tiny", "video").p_mean_at_resolution


def test_saved_model_is_self_contained_and_samples_are_made_with_the_ema_weights(stage_one, shards, tmp_path):
    calls = []
    config = replace(
        named_config("tiny", "video"), max_steps=3, sample_every=2, sample_prompts=("a", "b"), sample_steps=4
    )
    result = train(
        config, shards, tmp_path, init_from=stage_one.final, on_samples=lambda step, v: calls.append((step, v))
    )
    assert [step for step, _ in calls] == [2, 3]  # every 2 steps and at the end
    assert all(len(videos) == 2 and videos[0].shape == (8, 3, 32, 32) for _, videos in calls)
    # The end-of-run samples come from the EMA weights the final folder holds.
    loaded = VideoDiffusion.load(result.final)
    assert sorted(p.name for p in result.final.iterdir()) == ["stage.json", "unet", "vae"]
    again = generate(loaded, "b", GenerationConfig(num_frames=8, height=32, width=32, steps=4, seed=1))
    torch.testing.assert_close(again, calls[-1][1][1], atol=1e-3, rtol=0)
    for a, b in zip(loaded.codec.vae.parameters(), result.model.codec.vae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stage_one_trains_on_an_image_webdataset(tmp_path):
    paths, _ = write_image_shards(tmp_path / "images", shards=2, images_per_shard=4)
    config = replace(named_config("tiny", "image"), data="images", max_steps=3, checkpoint_every=3)
    result = train(config, [str(p) for p in paths], tmp_path / "work")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    state = (tmp_path / "work" / "checkpoint-00000003" / "state.json").read_text()
    assert '"data_position": 12' in state  # 3 steps of 4 images
    with pytest.raises(ValueError, match="spatial"):
        replace(named_config("tiny", "video"), data="images")


def test_partial_training_moves_only_temporal_layers(stage_one, shards, tmp_path):
    config = replace(named_config("tiny", "video"), strategy="partial", max_steps=2, checkpoint_every=1)
    train(config, shards, tmp_path, init_from=stage_one.final)
    before = load_file(tmp_path / "checkpoint-00000001" / "model.safetensors")
    after = load_file(tmp_path / "checkpoint-00000002" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_temporal(k) for k in changed)


def test_killed_run_resumes_to_the_same_loss_curve(stage_one, shards, tmp_path):
    config = replace(named_config("tiny", "video"), max_steps=6, checkpoint_every=3)
    uninterrupted = train(config, shards, tmp_path / "a", init_from=stage_one.final).losses
    train(replace(config, max_steps=3), shards, tmp_path / "b", init_from=stage_one.final)  # "killed" after step 3
    resumed = train(
        config, shards, tmp_path / "b", init_from=stage_one.final, resume=tmp_path / "b" / "checkpoint-00000003"
    )
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(uninterrupted[3:], rel=1e-5)
