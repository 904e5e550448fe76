"""The StableVideoDiffusionPipeline round trip: our image-to-video model exported to that
format samples the same frames in diffusers' own pipeline as in ours (same seed, same
noise levels), an SVD-format folder loads into our model and samples what the pipeline
samples, and the open_clip vision tower and transformers' CLIP agree on embeddings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image
from tiny_svd import write_tiny_svd_folder

from model import svd
from model.conditioning import motion_bucket
from model.networks import restore_norm_eps
from model.pipeline import GenerationConfig, animate
from model.stages import VideoDiffusion, named_config

CONFIG = named_config("tiny", "i2v")
# The Euler sampler is the pipeline's; guidance rises across the frames in both.
GENERATION = GenerationConfig(
    num_frames=4, height=32, width=32, steps=6, sampler="euler", guidance_min=1.0, guidance_max=2.5, seed=3
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An image-to-video model whose every weight matters (the new input channels and the
    zeroed temporal layers perturbed), saved and loaded as training leaves it."""
    torch.manual_seed(0)
    fresh = VideoDiffusion.create(CONFIG)
    with torch.no_grad():
        for p in fresh.unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return VideoDiffusion.load(fresh.save(tmp_path_factory.mktemp("i2v") / "model"))


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory):
    return write_tiny_svd_folder(tmp_path_factory.mktemp("svd") / "svd")


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1


def _pipeline_frames(folder, rgb: np.ndarray, config: GenerationConfig, recorded_eps: bool = False) -> torch.Tensor:
    pipeline = StableVideoDiffusionPipeline.from_pretrained(folder)
    if recorded_eps:
        restore_norm_eps(pipeline.unet)
    pipeline.set_progress_bar_config(disable=True)
    frames = pipeline(
        Image.fromarray(rgb),
        height=config.height,
        width=config.width,
        num_frames=config.num_frames,
        num_inference_steps=config.steps,
        min_guidance_scale=config.guidance_min,
        max_guidance_scale=config.guidance_max,
        fps=int(config.fps) + 1,  # the pipeline conditions on fps - 1
        motion_bucket_id=int(motion_bucket(torch.tensor(config.motion))),
        noise_aug_strength=config.noise_aug_strength,
        generator=torch.Generator().manual_seed(config.seed),
        output_type="pt",
    ).frames[0]
    return frames * 2 - 1  # [0, 1] -> [-1, 1]


def test_open_clip_vision_tower_maps_onto_transformers_clip(model):
    hf = svd.hf_vision_tower(model.image.visual)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        theirs, ours = hf(pixels).image_embeds, model.image.visual(pixels)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    name, weights = svd.open_clip_vision_tower(hf)
    assert name == "vdm-tiny-clip-224"
    for key, value in model.image.visual.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_exported_model_samples_the_same_frames_in_diffusers_pipeline(model, image, tmp_path):
    folder = svd.export_svd(model, tmp_path / "svd")
    ours = animate(model, _tensor(image), GENERATION)
    theirs = _pipeline_frames(folder, image, GENERATION, recorded_eps=True)
    assert ours.shape == theirs.shape == (4, 3, 32, 32) and ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
    # diffusers' own load builds the norms whose epsilons inflation changed with its own
    plain = _pipeline_frames(folder, image, GENERATION)
    assert 1e-5 < (plain - ours).abs().max() < 1e-3
    # and the folder comes back as the model it was
    again = VideoDiffusion.create(CONFIG, init_from=folder)
    torch.testing.assert_close(animate(again, _tensor(image), GENERATION), ours, atol=2e-5, rtol=0)


def test_an_svd_folder_loads_and_samples_what_the_pipeline_samples(svd_folder, image, tmp_path):
    model = VideoDiffusion.create(CONFIG, init_from=svd_folder)
    assert type(model.codec.vae).__name__ == "AutoencoderKLTemporalDecoder" and model.unet.config.in_channels == 8
    # SVD's own noise levels (0.002..700 in its units, half that in ours); its scheduler's
    # initial noise is sqrt(700^2 + 1), a relative 1e-6 from ours.
    config = replace(GENERATION, sigma_min=0.001, sigma_max=350.0)
    ours = animate(model, _tensor(image), config)
    theirs = _pipeline_frames(svd_folder, image, config)
    assert ours.std() > 0.01
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
    # saved as one of our folders, it is a self-contained image-to-video model
    saved = VideoDiffusion.load(model.save(tmp_path / "ours"))
    assert saved.task.conditioning == "image" and saved.config.image_model == "vdm-tiny-clip-224"
    torch.testing.assert_close(animate(saved, _tensor(image), config), ours, atol=1e-5, rtol=0)


def test_only_image_models_export_and_only_as_image_models_import(svd_folder, tmp_path):
    text = VideoDiffusion.create(named_config("tiny", "video"))
    with pytest.raises(ValueError, match="only image-to-video"):
        svd.export_svd(text, tmp_path / "x")
    with pytest.raises(ValueError, match="image-to-video models only"):
        VideoDiffusion.create(named_config("tiny", "video"), init_from=svd_folder)
