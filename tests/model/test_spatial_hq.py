"""Image-only spatial finetune (VideoCrafter2): the config, images run through the video
UNet with its temporal branches off, the saturated image set against the video data (the
proxy's known truth), and a short finetune that fits the image set better than the video
model did (held-out denoising error at one noise level, the cheap stand-in for the
sampled proxy of benchmarks/spatial_hq_evidence) while every temporal weight stays
bit-identical."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from components.sample_data.palette import write_palette_image_shards
from components.sample_data.shards import write_shapes_shards
from model.conditioning import added_time_ids
from model.data import ClipDataset, ClipSpec, ImageDataset
from model.networks import is_temporal
from model.spatial import foreground_saturation, images_only
from model.stages import VideoDiffusion, named_config
from model.train import train

CONFIG = named_config("tiny", "spatial-hq")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A video model whose temporal layers compute something (an inflated one starts as the
    identity), so that leaving them untouched is a claim that can fail."""
    torch.manual_seed(0)  # the same base whatever ran before
    model = VideoDiffusion.create(named_config("tiny", "video"))
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if is_temporal(name):
                param.add_(0.05 * torch.randn_like(param))
    return model.save(tmp_path_factory.mktemp("video") / "final")


def test_the_config_trains_spatial_layers_on_images_only():
    assert CONFIG.data == "images" and CONFIG.strategy == "spatial" and CONFIG.video
    assert CONFIG.clip.num_frames == 8  # what the finetuned model generates: video
    for wrong in ({"strategy": "full"}, {"strategy": "partial"}, {"data": "clips"}):
        with pytest.raises(ValueError, match="spatial layers only"):
            replace(CONFIG, **wrong)


@torch.no_grad()
def _denoise(model: VideoDiffusion, x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The denoiser's prediction, unconditioned, for an image (fps and motion 0, as the image loader gives)."""
    n = x.shape[0]
    ids = added_time_ids(torch.zeros(n), torch.zeros(n), torch.zeros(n))
    return model.denoiser(x, torch.full((n,), sigma), text=model.text([""]).expand(n, -1, -1), added=ids)


def test_images_run_with_the_temporal_branches_off(video_folder):
    model = VideoDiffusion.load(video_folder)
    x = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with images_only(model.unet):
        before = _denoise(model, x)
    as_video = _denoise(model, x)
    assert not torch.allclose(before, as_video)  # one frame through the temporal branches differs
    with torch.no_grad():  # change every temporal layer, except the micro-conditioning that feeds the spatial ones
        for name, param in model.unet.named_parameters():
            if is_temporal(name) and "add_embedding" not in name:
                param.add_(torch.randn_like(param))
    with images_only(model.unet):
        torch.testing.assert_close(_denoise(model, x), before, rtol=0, atol=0)
    assert not torch.allclose(_denoise(model, x), as_video)  # the hooks are gone afterwards


def test_the_image_set_is_saturated_and_the_video_data_is_not(tmp_path):
    images, truth = write_palette_image_shards(tmp_path / "images", shards=1, images_per_shard=6)
    clips, _ = write_shapes_shards(tmp_path / "clips", shards=1, clips_per_shard=6, num_frames=8, fps=8.0)
    for color in (t["color"] for t in truth.values()):
        assert max(color) == 255 and min(color) == 0  # full saturation and value
    image_items = itertools.islice(ImageDataset([str(p) for p in images], 32, 32, random_crop=False), 6)
    clip_items = itertools.islice(ClipDataset([str(p) for p in clips], ClipSpec(8, 8.0, 32, 32)), 6)
    image_saturation = [foreground_saturation(item["video"]) for item in image_items]
    clip_saturation = [foreground_saturation(item["video"]) for item in clip_items]
    assert min(image_saturation) > 0.97, image_saturation
    assert max(clip_saturation) < 0.6, clip_saturation  # channels uniform in 96..255: about 0.3
    assert foreground_saturation(torch.zeros(1, 3, 8, 8)) == 0  # black: nothing in the foreground
    with pytest.raises(ValueError, match=r"no image \(jpg, jpeg, png, webp\) in these shards"):
        next(iter(ImageDataset([str(p) for p in clips], 32, 32)))  # video shards given as the image set


@torch.no_grad()
def _image_set_error(model: VideoDiffusion, images: torch.Tensor, sigma: float = 1.0) -> float:
    """MSE of the denoised latents of held-out images of the set at one noise level
    (images as one-frame clips, temporal branches off, as training sees them)."""
    model.eval()
    x0 = model.codec.encode(images, torch.Generator().manual_seed(0))
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with images_only(model.unet):
        return float((_denoise(model, noisy, sigma) - x0).pow(2).mean())


def test_a_short_finetune_fits_the_image_set_and_leaves_temporal_weights_bit_identical(tmp_path, video_folder):
    shards = [str(p) for p in write_palette_image_shards(tmp_path / "images", shards=2, images_per_shard=8)[0]]
    held_out = write_palette_image_shards(tmp_path / "held-out", shards=1, images_per_shard=8, seed=1)[0]
    size = 16  # 4x4 latents: the mechanism at a quarter of the cost
    images = torch.stack(
        [item["video"] for item in ImageDataset([str(p) for p in held_out], size, size, random_crop=False, epochs=1)]
    )
    config = replace(
        CONFIG,
        clip=replace(CONFIG.clip, height=size, width=size),
        cond_dropout=0.0,
        max_steps=40,
        checkpoint_every=40,
        optim=replace(CONFIG.optim, lr=2e-3, warmup_steps=2),
    )
    base = VideoDiffusion.create(config, init_from=video_folder)
    before = _image_set_error(base, images)
    finetuned = train(config, shards, tmp_path / "work", init_from=video_folder).model
    after = _image_set_error(finetuned, images)
    assert after < 0.9 * before, (before, after)

    trained = dict(finetuned.unet.named_parameters())
    changed = []
    for name, param in base.unet.named_parameters():
        if is_temporal(name):
            assert torch.equal(trained[name], param), name  # bit for bit
        elif not torch.equal(trained[name], param):
            changed.append(name)
    spatial = [name for name, _ in base.unet.named_parameters() if not is_temporal(name)]
    assert len(changed) > 0.9 * len(spatial)  # the spatial layers trained
