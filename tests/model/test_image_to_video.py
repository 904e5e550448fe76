"""Image-to-video (SVD): the model a video model widens into, its conditioning, the
generation calls that refuse the other kind of model, and a short finetune on static
discs (known truth: every frame is the conditioning frame) after which the model
predicts the first frame from its conditioning frame, not before."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from components.sample_data.shards import write_shapes_shards
from model.conditioning import LatentCodec, added_time_ids
from model.data import ClipDataset, ClipSpec
from model.pipeline import GenerationConfig, animate, generate
from model.stages import VideoDiffusion, named_config
from model.train import train

CONFIG = named_config("tiny", "i2v")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    return VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("video") / "final")


@pytest.fixture(scope="module")
def i2v(video_folder):
    return VideoDiffusion.create(CONFIG, init_from=video_folder)


def test_an_i2v_model_starts_as_the_video_model_it_widens(i2v, video_folder):
    video = VideoDiffusion.load(video_folder)
    assert i2v.task.conditioning == "image" and i2v.text is None and i2v.image.width == 64
    weight = i2v.unet.conv_in.weight
    assert weight.shape[1] == 8 and weight[:, 4:].abs().sum() == 0
    torch.testing.assert_close(weight[:, :4], video.unet.conv_in.weight)
    # The new input channels are zero: until training, the conditioning latent changes nothing.
    torch.manual_seed(0)
    frames = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = i2v.image_condition(frames, torch.full((2,), 0.02), torch.Generator().manual_seed(0))
    assert cond["image"].shape == (2, 1, 64) and cond["image_latent"].shape == (2, 4, 8, 8)
    x, sigma = torch.randn(2, 4, 4, 8, 8), torch.tensor([1.0, 5.0])
    ids = added_time_ids(torch.full((2,), 8.0), torch.ones(2), torch.full((2,), 0.02))
    with torch.no_grad():
        a = i2v.denoiser(x, sigma, **cond, added=ids)
        b = i2v.denoiser(x, sigma, image=cond["image"], image_latent=torch.randn(2, 4, 8, 8), added=ids)
    torch.testing.assert_close(a, b)


def test_training_conditions_on_the_first_frame_with_noise_it_is_told(i2v):
    batch = {
        "video": torch.rand(3, 8, 3, 32, 32) * 2 - 1,
        "fps": torch.full((3,), 8.0),
        "motion": torch.tensor([0.0, 1.0, 2.0]),
    }
    i2v.train()
    cond = i2v.task.condition(i2v, batch, torch.Generator().manual_seed(0))
    i2v.eval()
    strength = cond["added"][:, 2]
    assert ((strength > 0.01) & (strength < 0.3)).all()  # about exp(-3), lognormal
    # Condition dropout (for guidance) zeroes embedding and latent together.
    kept = cond["image"].flatten(1).abs().sum(1) > 0
    assert kept.tolist() == [True, True, False]  # this seed drops the third
    assert cond["image_latent"][~kept].abs().sum() == 0
    torch.testing.assert_close(cond["image"][kept], i2v.image(batch["video"][kept, 0]))
    clean = i2v.codec.condition_latent(batch["video"][kept, 0])
    difference = (cond["image_latent"][kept] - clean).abs().mean()
    assert 0 < difference < 0.5 * clean.abs().mean()  # noise-augmented, mildly
    loss = i2v.loss(batch | {"caption": [""] * 3, "key": ["a", "b", "c"]}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_animate_resizes_the_image_and_is_seeded(i2v):
    config = GenerationConfig(num_frames=4, height=32, width=32, steps=2)
    image = torch.rand(3, 48, 40) * 2 - 1
    a, b = animate(i2v, image, config), animate(i2v, image, config)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, animate(i2v, image, replace(config, seed=1)))


def test_generation_refuses_the_other_kind_of_model(i2v, video_folder):
    with pytest.raises(ValueError, match="image-to-video model"):
        generate(i2v, "a disc", GenerationConfig(steps=1))
    with pytest.raises(ValueError, match="text-to-video model"):
        animate(VideoDiffusion.load(video_folder), torch.zeros(3, 32, 32), GenerationConfig(steps=1))
    with pytest.raises(ValueError, match="image-to-video trains a video model on clips"):
        replace(CONFIG, data="latents")


def _deterministic_vae(folder, frames: torch.Tensor):
    """The tiny random VAE made deterministic (posterior log-variance at its floor) and scaled
    to latents of std 0.5 (sigma_data): its latents are fixed random features of the frame,
    so the latent error is the truth to measure without a trained decoder."""
    vae = LatentCodec.tiny().vae
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30.0
        std = vae.encode(frames).latent_dist.mean.std()
    vae.register_to_config(scaling_factor=float(0.5 / std))
    vae.save_pretrained(folder)
    return folder


@torch.no_grad()
def _first_frame_errors(model: VideoDiffusion, videos: torch.Tensor, sigma: float = 3.0) -> tuple[float, float]:
    """MSE of the denoised first frame's latent at a high noise level (where only the
    conditioning knows where the disc is), conditioned on each clip's own first frame and
    on another clip's."""
    model.eval()
    x0 = model.codec.encode(videos)
    n = len(videos)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ids = added_time_ids(torch.full((n,), 8.0), torch.zeros(n), torch.full((n,), 0.02))
    errors = []
    for shift in (0, 1):  # own frame, the next clip's
        cond = model.image_condition(videos[:, 0].roll(shift, 0), torch.full((n,), 0.02), torch.Generator())
        denoised = model.denoiser(noisy, torch.full((n,), sigma), **cond, added=ids)
        errors.append(float((denoised[:, 0] - x0[:, 0]).pow(2).mean()))
    return errors[0], errors[1]


def test_a_short_finetune_predicts_the_first_frame_from_the_conditioning_frame(tmp_path):
    paths, _ = write_shapes_shards(
        tmp_path / "shards", shards=2, clips_per_shard=8, num_frames=8, fps=8.0, height=32, width=32, max_speed=0.0
    )
    shards = [str(p) for p in paths]
    spec = ClipSpec(num_frames=1, fps=8.0, height=32, width=32)  # the first frame is what is measured
    videos = torch.stack([c["video"] for c in itertools.islice(ClipDataset(shards, spec, random_crop=False), 8)])
    config = replace(
        CONFIG,
        clip=spec,
        vae=str(_deterministic_vae(tmp_path / "vae", videos.flatten(0, 1))),
        p_mean=0.5,
        cond_dropout=0.0,
        batch_size=8,
        max_steps=80,
        checkpoint_every=80,
        optim=replace(CONFIG.optim, lr=5e-3, warmup_steps=2),
    )
    own, other = _first_frame_errors(VideoDiffusion.create(config), videos)
    assert own == pytest.approx(other, rel=0.01)  # before: the conditioning frame makes no difference
    result = train(config, shards, tmp_path / "work")
    own, other = _first_frame_errors(result.model, videos)
    assert own < 0.85 * other, (own, other)
    assert result.val_losses[80] < result.val_losses[0]  # on clips it did not train on
