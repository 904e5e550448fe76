"""Generation from trained tiny models: shapes, ranges, determinism, guidance."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from components.sample_data.shards import write_shapes_shards
from model.pipeline import GenerationConfig, generate, to_uint8
from model.stages import VideoDiffusion, named_config
from model.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=2)
    shards = [str(p) for p in paths]
    work = tmp_path_factory.mktemp("train")
    image = train(replace(named_config("tiny", "image"), max_steps=2), shards, work / "s1")
    video = train(replace(named_config("tiny", "video"), max_steps=2), shards, work / "s2", init_from=image.final)
    return {"image": VideoDiffusion.load(image.final), "video": VideoDiffusion.load(video.final)}


@pytest.mark.parametrize("stage", ["image", "video"])
def test_generation_shape_range_and_determinism(trained, stage):
    config = GenerationConfig(num_frames=4, height=32, width=32, steps=4)
    a = generate(trained[stage], "a disc moving right", config)
    b = generate(trained[stage], "a disc moving right", config)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, generate(trained[stage], "a disc moving right", replace(config, seed=1)))
    assert to_uint8(a).shape == (4, 32, 32, 3) and to_uint8(a).dtype == torch.uint8


def test_guidance_changes_the_result(trained):
    config = GenerationConfig(num_frames=4, steps=4, guidance_min=1.0, guidance_max=1.0)
    unguided = generate(trained["video"], "a disc", config)
    strongly = generate(trained["video"], "a disc", replace(config, guidance_max=7.0))
    assert not torch.allclose(unguided, strongly)


def test_saved_models_reload_with_their_stage(trained, tmp_path):
    video = trained["video"]
    folder = video.save(tmp_path / "again")
    reloaded = VideoDiffusion.load(folder)
    assert reloaded.config == video.config
    config = GenerationConfig(num_frames=2, steps=2)
    torch.testing.assert_close(generate(reloaded, "x", config), generate(video, "x", config))


def test_guidance_in_one_batch_is_guidance_of_two_calls(trained):
    """Sampling evaluates the conditional and unconditional inputs in one batch; that is
    the same guidance as two separate denoiser calls."""
    from model.samplers import batched_pair, frame_guidance, guided, guided_pair

    model = trained["video"].eval()
    torch.manual_seed(0)
    x, sigma = torch.randn(1, 4, 4, 8, 8), torch.tensor([1.5])
    added = torch.tensor([[8.0, 64.0, 0.0]])
    cond = {"text": model.text(["a disc"]), "added": added}
    uncond = {"text": model.text([""]), "added": added}
    scale = frame_guidance(4, 1.0, 3.0)
    with torch.no_grad():
        two_calls = guided(
            lambda x, s: model.denoiser(x, s, **cond), lambda x, s: model.denoiser(x, s, **uncond), scale
        )
        one_batch = guided_pair(batched_pair(model.denoiser, cond, uncond), scale)
        torch.testing.assert_close(one_batch(x, sigma), two_calls(x, sigma), atol=1e-5, rtol=1e-5)
