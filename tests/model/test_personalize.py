"""Personalized text-to-video (model/personalize.py) on tiny models: the temporal transfer is
exact (spatial weights the DreamBooth model's, temporal ones the video model's), the prior
preservation loss is part of the objective, realignment trains the temporal layers alone on
stills long enough for every rate, and mismatched models or inputs are refused."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from model.data import ClipSpec, rate_strides, strided_indices
from model.networks import UNetConfig, is_temporal, video_key, video_unet
from model.personalize import (
    PersonalizeConfig,
    check_subject_images,
    dreambooth,
    dreambooth_loss,
    generate_class_images,
    personalized_model,
    realign_config,
    subject_stills,
    transfer_temporal_layers,
)
from model.stages import VideoDiffusion, named_config


@pytest.fixture(scope="module")
def image_model() -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion.create(named_config("tiny", "image"))


@pytest.fixture(scope="module")
def video_model() -> VideoDiffusion:
    """A video model whose every weight differs from an inflated image model's (as after training)."""
    torch.manual_seed(1)
    model = VideoDiffusion.create(named_config("tiny", "video"))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _subject(n: int = 3) -> torch.Tensor:
    """Checkered images in one colour."""
    checks = ((torch.arange(32)[:, None] // 8 + torch.arange(32)[None] // 8) % 2).float()
    image = torch.stack([checks, 0.2 * checks, 1 - checks]) * 2 - 1
    return image.expand(n, -1, -1, -1).clone()


def test_after_the_transfer_spatial_weights_are_the_image_models_and_temporal_ones_the_video_models(
    image_model, video_model
):
    tuned = image_model.unet
    personal = transfer_temporal_layers(tuned, video_model.unet).state_dict()
    video = video_model.unet.state_dict()
    spatial = {video_key(k): v for k, v in tuned.state_dict().items()}
    temporal = [k for k in video if is_temporal(k)]
    assert temporal and set(personal) == set(video) == set(spatial) | set(temporal)
    for name in temporal:
        assert torch.equal(personal[name], video[name]), name
    for name, value in spatial.items():
        assert torch.equal(personal[name], value), name
        assert not torch.equal(video[name], value), name  # the two sources really differ here


def test_the_personalized_model_is_a_text_to_video_model_generating_from_the_transferred_weights(
    image_model, video_model, tmp_path
):
    from model.pipeline import GenerationConfig, generate

    personal = personalized_model(image_model, video_model)
    assert personal.config == video_model.config and personal.task.endpoint == "text_to_video"
    loaded = VideoDiffusion.load(personal.save(tmp_path / "final"))
    assert loaded.task.name == "video"
    saved = loaded.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in personal.unet.state_dict().items())
    settings = GenerationConfig(num_frames=2, steps=2)
    frames = generate(loaded, "a sks disc", settings)
    assert frames.shape == (2, 3, 32, 32)
    assert not torch.allclose(frames, generate(video_model, "a sks disc", settings), atol=1e-3)


def test_a_video_model_of_another_spatial_layout_is_refused(image_model):
    other = video_unet(UNetConfig(block_out_channels=(32, 32), attention_heads=(2, 2), layers_per_block=1,
                                  cross_attention_dim=64))  # fmt: skip
    with pytest.raises(ValueError, match=r"spatial architecture does not match.*channels \(32, 32\)"):
        transfer_temporal_layers(image_model.unet, other)


def test_a_video_model_with_another_vae_or_of_another_kind_is_refused(image_model, video_model):
    from model.conditioning import LatentCodec

    codec = LatentCodec.tiny()
    with torch.no_grad():
        next(codec.vae.parameters()).add_(1.0)
    other_vae = VideoDiffusion(video_model.config, video_model.unet, codec=codec)
    with pytest.raises(ValueError, match="VAE is not the image model's"):
        personalized_model(image_model, other_vae)
    with pytest.raises(ValueError, match="image model: a Stage I"):
        personalized_model(video_model, video_model)
    with pytest.raises(ValueError, match="video model: a text-to-video model"):
        personalized_model(image_model, image_model)


def test_the_prior_preservation_loss_is_weighted_into_the_objective(image_model):
    subject, classes = _subject(2), -_subject(2)

    def loss(weight: float):
        config = PersonalizeConfig("sks", "disc", prior_loss_weight=weight)
        return dreambooth_loss(image_model, subject, classes, config, torch.Generator().manual_seed(0))

    without, weighted = loss(0.0), loss(0.5)
    assert torch.equal(without.subject, weighted.subject) and weighted.prior > 0
    assert torch.allclose(weighted.total, without.total + 0.5 * weighted.prior)
    assert not torch.allclose(weighted.total, without.total)


def test_dreambooth_trains_a_copy_on_the_base_models_class_images(image_model):
    before = {k: v.clone() for k, v in image_model.unet.state_dict().items()}
    config = PersonalizeConfig("sks", "disc", max_steps=2, class_images=3, class_sample_steps=2)
    result = dreambooth(image_model, _subject(3), config)
    assert len(result.losses) == len(result.prior_losses) == 2
    assert result.class_images.shape == (3, 3, 32, 32)
    assert torch.equal(result.class_images, generate_class_images(image_model, config))  # the base's prior
    assert all(torch.equal(v, before[k]) for k, v in image_model.unet.state_dict().items())  # base untouched
    assert any(not torch.equal(v, before[k]) for k, v in result.model.unet.state_dict().items())

    no_prior = dreambooth(image_model, _subject(3), PersonalizeConfig("sks", "disc", max_steps=1, prior_loss_weight=0))
    assert len(no_prior.class_images) == 0 and no_prior.prior_losses == []


def test_dreambooth_lora_changes_only_attention_projections_by_a_low_rank_delta(image_model):
    base = image_model.unet.state_dict()
    config = PersonalizeConfig("sks", "disc", max_steps=3, class_images=2, class_sample_steps=2, lora_rank=2)
    result = dreambooth(image_model, _subject(3), config)
    tuned = result.model.unet.state_dict()
    assert set(tuned) == set(base)  # the LoRA modules are merged and gone: a plain UNet
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    projections = {k for k in base if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    assert changed and changed <= projections  # nothing else moved (not even the projections' biases)
    for key in changed:  # each change is B A, of rank at most 2
        assert torch.linalg.matrix_rank((tuned[key] - base[key]).double(), atol=1e-6) <= 2
    full = dreambooth(image_model, _subject(3), PersonalizeConfig("sks", "disc", max_steps=3, prior_loss_weight=0))
    assert not all(torch.equal(v, base[k]) for k, v in full.model.unet.state_dict().items() if k not in projections)
    with pytest.raises(ValueError, match="LoRA rank: at least 1"):
        PersonalizeConfig("sks", "disc", lora_rank=0)


@pytest.mark.parametrize(
    ("token", "noun", "message"),
    [("", "disc", "token: give"), ("sks xyz", "disc", "token: one word"), ("sks", " ", "class noun")],
)
def test_a_missing_or_bad_token_is_refused(token, noun, message):
    with pytest.raises(ValueError, match=message):
        PersonalizeConfig(token, noun)


@pytest.mark.parametrize("count", [0, 2, 9])
def test_a_few_subject_images_only(count):
    with pytest.raises(ValueError, match=f"images: {count} subject image"):
        check_subject_images(count)
    check_subject_images(3)
    check_subject_images(8)


def test_realignment_trains_the_video_models_temporal_layers_alone_without_ema_or_held_out_clips(video_model):
    video = video_model.config.with_fields(optim=dataclasses.replace(video_model.config.optim, warmup_steps=100))
    config = realign_config(video, 250, seed=3)
    assert (config.strategy, config.max_steps, config.validation_clips, config.seed) == ("partial", 250, 0, 3)
    assert config.sample_every is None
    assert config.optim.ema_decay == 0.0 and config.optim.warmup_steps == 10
    assert config.optim.lr == video.optim.lr and config.clip == video.clip and config.stage == video.stage
    with pytest.raises(ValueError, match="realign steps and realign stills: at least 0"):
        PersonalizeConfig("sks", "disc", realign_steps=-1)


def test_subject_stills_are_long_enough_for_every_training_rate():
    subject = _subject(3)
    one_rate = ClipSpec(num_frames=8, fps=8.0, height=32, width=32)
    clips, fps = subject_stills(subject, one_rate)
    assert clips.shape == (3, 8, 3, 32, 32) and fps == 8.0
    assert all(torch.equal(clips[i, t], subject[i]) for i in range(3) for t in range(8))
    rates = dataclasses.replace(one_rate, fps_choices=(2.0, 4.0, 8.0))
    clips, fps = subject_stills(subject, rates)
    assert fps == 8.0 and clips.shape[1] == 29  # 7 gaps at stride 4 (8 fps source, 2 fps drawn), and the first
    assert strided_indices(clips.shape[1], fps, rates, random.Random(0)) is not None
    assert max(rate_strides(fps, rates)) * 7 == clips.shape[1] - 1
