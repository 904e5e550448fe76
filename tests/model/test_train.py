"""The training loop end to end on the tiny configs: Stage I -> II -> III, partial
training, a resumed run that repeats the uninterrupted loss curve, and the validation
loss on held-out clips."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from components.sample_data.shards import write_image_shards, write_shapes_shards
from model.networks import is_temporal
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train, training_batches, validation_batch, validation_loss, validation_sigmas


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
    hq_config = replace(named_config("tiny", "hq"), max_steps=2)
    hq = train(hq_config, shards, tmp_path / "s3", init_from=video.final)
    assert video.steps == 3 and hq.steps == 2 and (hq.final / "unet" / "config.json").exists()
    assert named_config("tiny", "hq").p_mean_at_resolution > named_config("tiny", "video").p_mean_at_resolution
    # The validation loss, at the start, every validate_every steps and at the end, falls in every stage.
    assert [list(result.val_losses) for result in (stage_one, video, hq)] == [[0, 6], [0, 3], [0, 2]]
    for result in (stage_one, video, hq):
        assert result.val_losses[result.steps] < result.val_losses[0], result.val_losses
    # Measured with the EMA weights, which the final model holds: the same weights give the same figure.
    held_out = validation_batch(hq_config, shards)
    again = [validation_loss(hq.model, None, held_out, torch.device("cpu"))["val_loss"] for _ in range(2)]
    assert again == [pytest.approx(hq.val_losses[2], abs=1e-6)] * 2


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
    # The reloaded network is the trained one, norm epsilons too (diffusers' own load: 9e-5 off).
    torch.testing.assert_close(again, calls[-1][1][1], atol=1e-6, rtol=0)
    for a, b in zip(loaded.codec.vae.parameters(), result.model.codec.vae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stage_one_trains_on_an_image_webdataset(tmp_path):
    paths, _ = write_image_shards(tmp_path / "images", shards=2, images_per_shard=4)
    config = replace(named_config("tiny", "image"), data="images", max_steps=3, checkpoint_every=3)
    result = train(config, [str(p) for p in paths], tmp_path / "work")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    state = (tmp_path / "work" / "checkpoint-00000003" / "state.json").read_text()
    # 3 steps of 4 images from 2 epochs of 8, each also reading the 2 held out for the validation loss
    assert '"data_position": 16' in state
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
    first = train(config, shards, tmp_path / "a", init_from=stage_one.final)
    uninterrupted = first.losses
    train(replace(config, max_steps=3), shards, tmp_path / "b", init_from=stage_one.final)  # "killed" after step 3
    resumed = train(
        config, shards, tmp_path / "b", init_from=stage_one.final, resume=tmp_path / "b" / "checkpoint-00000003"
    )
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(uninterrupted[3:], rel=1e-5)
    assert resumed.val_losses[6] == pytest.approx(first.val_losses[6], rel=1e-5)  # the same weights at the end


def test_training_never_sees_the_held_out_clips_and_the_data_position_counts_them():
    from torch.utils.data import DataLoader

    clips = [{"key": f"k{i}", "x": torch.tensor(i)} for i in range(6)] * 2  # two epochs of six clips
    batches = list(training_batches(DataLoader(clips, batch_size=2), frozenset({"k1", "k4"})))
    assert [list(b["key"]) for b, _ in batches] == [["k0", "k2"], ["k3", "k5"]] * 2
    assert [b["x"].tolist() for b, _ in batches] == [[0, 2], [3, 5]] * 2
    assert [consumed for _, consumed in batches] == [3, 3, 3, 3]  # 12 clips read, held-out ones included
    with pytest.raises(ValueError, match="every clip this rank reads is held out"):
        list(training_batches(DataLoader(clips * 3, batch_size=2), frozenset(f"k{i}" for i in range(6))))


def test_validation_clips_are_spread_over_the_shards_and_small_data_keeps_one_to_train_on(shards, tmp_path):
    config = named_config("tiny", "video")
    held_out = validation_batch(config, shards)["key"]
    assert [key.rsplit("-", 2)[1] for key in held_out] == ["0000", "0001"]  # one clip of each shard
    one_shard = [str(p) for p in write_shapes_shards(tmp_path / "a", shards=1, clips_per_shard=2)[0]]
    assert len(validation_batch(config, one_shard)["key"]) == 1
    one_clip = [str(p) for p in write_shapes_shards(tmp_path / "b", shards=1, clips_per_shard=1)[0]]
    with pytest.warns(UserWarning, match="single usable clip"):
        assert validation_batch(config, one_clip) is None


def test_validation_figures_are_logged_at_fixed_noise_levels(stage_one, shards, tmp_path):
    config = replace(named_config("tiny", "video"), max_steps=2)
    logged = []
    train(config, shards, tmp_path, init_from=stage_one.final, on_log=lambda step, m: logged.append((step, m)))
    validations = [(step, m) for step, m in logged if "val_loss" in m]
    assert [step for step, _ in validations] == [0, 2]
    levels = validation_sigmas(config)  # log-spaced around the training distribution's median
    assert levels == sorted(levels) and levels[2] == pytest.approx(math.exp(config.p_mean_at_resolution))
    for _, figures in validations:
        assert set(figures) == {"val_loss", *(f"val_loss/sigma_{s:.3g}" for s in levels)}
        assert figures["val_loss"] == pytest.approx(sum(v for k, v in figures.items() if k != "val_loss") / 5)
