"""Image-to-video (SVD): the model a video model widens into, its conditioning, and the
generation calls that refuse the other kind of model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.conditioning import added_time_ids
from model.pipeline import GenerationConfig, animate, generate
from model.stages import VideoDiffusion, named_config

CONFIG = named_config("tiny", "i2v")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    return VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("video") / "final")


@pytest.fixture(scope="module")
def i2v(video_folder):
    return VideoDiffusion.create(CONFIG, init_from=video_folder)


def test_an_i2v_model_starts_as_the_video_model_it_widens(i2v, video_folder):
    video = VideoDiffusion.load(video_folder)
    assert i2v.config.conditioning == "image" and i2v.text is None and i2v.image.width == 64
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
    cond = i2v.conditioning(batch, torch.Generator().manual_seed(0))
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
