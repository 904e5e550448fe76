"""Masked conditioning on known frames (frame interpolation and long-video prediction,
Video LDM): the model a video model widens into, the masks training draws, the
generation calls, the motion metrics on ground-truth linear motion, and a short finetune
of each kind after which the known frames help predict the unknown ones, not before."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_image_to_video import _deterministic_vae  # the same measurable-latents VAE

from components.sample_data.render import moving_shapes
from components.sample_data.shards import write_shapes_shards
from model.conditioning import added_time_ids
from model.data import ClipDataset, ClipSpec
from model.masked import (
    frame_latents,
    interpolate,
    interpolation_mask,
    masked_condition,
    predict,
    prediction_mask,
    training_condition,
)
from model.masked_evaluation import interpolation_errors, velocity_error
from model.networks import CONFIGS, video_unet
from model.pipeline import GenerationConfig, animate, generate
from model.stages import VideoDiffusion, named_config
from model.train import train
from model.training import apply_strategy

INTERPOLATION = named_config("tiny", "interpolation")
PREDICTION = named_config("tiny", "prediction")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    return VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("video") / "final")


@pytest.fixture(scope="module")
def interpolation(video_folder):
    return VideoDiffusion.create(INTERPOLATION, init_from=video_folder)


@pytest.fixture(scope="module")
def prediction(video_folder):
    return VideoDiffusion.create(PREDICTION, init_from=video_folder)


def test_a_masked_model_starts_as_the_video_model_it_widens(interpolation, prediction, video_folder):
    video = VideoDiffusion.load(video_folder)
    for model in (interpolation, prediction):
        assert model.text is not None and model.image is None  # text conditioning stays
        weight = model.unet.conv_in.weight
        assert weight.shape[1] == 4 + 4 + 1 and weight[:, 4:].abs().sum() == 0
        torch.testing.assert_close(weight[:, :4], video.unet.conv_in.weight)
    # Zero-initialised: the known frames change nothing yet, and the output is the base model's.
    x, sigma = torch.randn(2, 5, 4, 8, 8), torch.tensor([1.0, 5.0])
    text = interpolation.text(["a disc", ""])
    ids = added_time_ids(torch.full((2,), 12.0), torch.ones(2), torch.zeros(2))
    known = masked_condition(torch.randn(2, 5, 4, 8, 8), interpolation_mask(2, 5))
    with torch.no_grad():
        given = interpolation.denoiser(x, sigma, text=text, added=ids, **known)
        without = interpolation.denoiser(x, sigma, text=text, added=ids)
        base = video.denoiser(x, sigma, text=text, added=ids)
    torch.testing.assert_close(given, without)
    torch.testing.assert_close(given, base)


def test_what_trains_and_what_is_frozen(interpolation):
    trainable = apply_strategy(interpolation.unet, interpolation.config.strategy)
    assert len(trainable) == len(list(interpolation.unet.parameters()))  # conv_in's new channels included
    assert not any(p.requires_grad for p in interpolation.text.parameters())
    assert not any(p.requires_grad for p in interpolation.codec.parameters())
    with pytest.raises(ValueError, match="strategy full"):
        replace(INTERPOLATION, strategy="partial")


def test_masks_know_the_key_frames_or_up_to_two_leading_frames():
    assert interpolation_mask(2, 9).tolist() == [[1, 0, 0, 0, 1, 0, 0, 0, 1]] * 2
    leading = prediction_mask(300, 6, torch.Generator().manual_seed(0))
    counts = leading.sum(1)
    assert set(counts.tolist()) == {0.0, 1.0, 2.0}
    assert (leading == (torch.arange(6)[None] < counts[:, None]).float()).all()  # a prefix of the clip
    assert abs(float((counts == 0).float().mean()) - 1 / 3) < 0.1  # uniform over 0, 1, 2

    latents = torch.randn(64, 9, 4, 8, 8)
    cond = training_condition(latents, interpolation_mask(*latents.shape[:2]), 0.25, torch.Generator().manual_seed(0))
    assert cond["known"].shape == latents.shape and cond["mask"].shape == (64, 9, 1, 8, 8)
    kept = cond["mask"].flatten(1).amax(1) > 0
    assert 0.1 < float((~kept).float().mean()) < 0.4  # condition dropout: no frame known
    torch.testing.assert_close(cond["known"][kept][:, ::4], latents[kept][:, ::4])
    assert cond["known"][kept][:, 1:4].abs().sum() == 0 and cond["known"][~kept].abs().sum() == 0


def test_configs_refuse_what_the_mechanism_cannot_train():
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        replace(INTERPOLATION, clip=ClipSpec(num_frames=8, fps=12.0, height=32, width=32))
    with pytest.raises(ValueError, match="longer than its 2 context frames"):
        replace(PREDICTION, clip=ClipSpec(num_frames=2, fps=8.0, height=32, width=32))
    with pytest.raises(ValueError, match="strategy full"):
        replace(PREDICTION, strategy="partial")


def test_interpolate_keeps_the_keys_and_fills_three_frames_between_each_pair(interpolation):
    config = GenerationConfig.for_clip(interpolation.config.clip, steps=1, sampler="euler")
    keys = torch.rand(4, 3, 32, 32) * 2 - 1
    video = interpolate(interpolation, keys, config)
    assert video.shape == (13, 3, 32, 32)  # 4T - 3: three new frames per pair, none after the last key
    reconstructed = interpolation.codec.decode(frame_latents(interpolation.codec, keys)[None])[0]
    assert (video[::4] - reconstructed).abs().max() < 0.05  # the keys come back (as the VAE decodes them)
    steps = []  # on_step(i) after each sampler step of each window (one step here)
    torch.testing.assert_close(video, interpolate(interpolation, keys, config, on_step=steps.append))  # seeded
    assert steps and set(steps) == {0}
    with pytest.raises(ValueError, match="at least 2 frames"):
        interpolate(interpolation, keys[:1], config)


def test_predict_continues_the_context_chunk_by_chunk(prediction, interpolation):
    config = replace(GenerationConfig.for_clip(prediction.config.clip, steps=1, sampler="euler"), num_frames=4)
    context = torch.rand(2, 3, 32, 32) * 2 - 1
    steps = []
    video = predict(prediction, context, 9, config, on_step=steps.append)  # chunks of 4 feeding back 2, cut to 9
    assert steps == [0] * 4  # a sampler step per chunk: 4 + 2 + 2 + 2 frames
    assert video.shape == (9, 3, 32, 32)
    assert predict(prediction, context[:0], 5, config).shape == (5, 3, 32, 32)  # no context: text-to-video
    assert generate(prediction, "a disc", config).shape == (4, 3, 32, 32)  # no known frames at all
    with pytest.raises(ValueError, match="this is a 'interpolation' model, not a 'prediction' one"):
        predict(interpolation, context, 9, config)
    with pytest.raises(ValueError, match="text-to-video model"):
        animate(prediction, context[0], config)


def test_the_metrics_measure_linear_motion():
    clip = moving_shapes(9, 32, 32, num_shapes=1, max_speed=1.5, radius_range=(4, 5), seed=3)
    frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    velocity = clip.velocities[0]
    assert np.linalg.norm(velocity * 4) >= 2.0  # far enough between keys to give fractions
    exact = interpolation_errors(frames)
    assert exact["fraction_error"] < 0.05 and exact["position_error_px"] < 0.3
    held = frames.clone()
    held[1:4], held[5:8] = frames[0], frames[4]  # each key repeated: fractions 0 instead of 1/4, 2/4, 3/4
    assert interpolation_errors(held)["fraction_error"] == pytest.approx(0.5, abs=0.05)
    assert velocity_error(frames, velocity) < 0.05
    assert velocity_error(frames[[0] * 9], velocity) == pytest.approx(np.linalg.norm(velocity), abs=0.05)


@torch.no_grad()
def _unknown_frame_errors(model: VideoDiffusion, videos: torch.Tensor, sigma: float = 3.0) -> tuple[float, float]:
    """MSE of the denoised latents of the frames the model is not given, at a high noise
    level (where only the known frames say where the disc is), given the known frames
    (keys, or 2 leading context frames) and given none."""
    model.eval()
    x0 = model.codec.encode(videos)
    n, frames = x0.shape[:2]
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ids = added_time_ids(torch.full((n,), model.config.clip.fps), torch.zeros(n), torch.zeros(n))
    text = model.text([""] * n)
    if model.task.name == "interpolation":
        mask = interpolation_mask(n, frames)
    else:
        mask = (torch.arange(frames)[None] < 2).float().expand(n, -1)
    unknown = ~mask[0].bool()
    errors = []
    for known in (masked_condition(x0, mask), {}):
        denoised = model.denoiser(noisy, torch.full((n,), sigma), text=text, added=ids, **known)
        errors.append(float((denoised[:, unknown] - x0[:, unknown]).pow(2).mean()))
    return errors[0], errors[1]


# Static discs: where a disc is in the unknown frames only the known frames can say (at this
# noise level), and the known frames reach the unknown ones only through the temporal layers,
# which take about 120 steps to learn it (30 steps: no difference yet).
@pytest.mark.parametrize("kind, frames", [("interpolation", 5), ("prediction", 4)], ids=["interpolation", "prediction"])
def test_a_short_finetune_predicts_the_unknown_frames_from_the_known_ones(tmp_path, kind, frames):
    paths, _ = write_shapes_shards(
        tmp_path / "shards", shards=2, clips_per_shard=8, num_frames=12, fps=12.0, height=32, width=32, max_speed=0.0
    )
    shards = [str(p) for p in paths]
    spec = ClipSpec(num_frames=frames, fps=12.0, height=32, width=32)
    videos = torch.stack([c["video"] for c in itertools.islice(ClipDataset(shards, spec, random_crop=False), 8)])
    tiny = named_config("tiny", kind)
    config = replace(
        tiny,
        clip=spec,
        vae=str(_deterministic_vae(tmp_path / "vae", videos.flatten(0, 1))),
        p_mean=0.5,
        cond_dropout=0.3,  # also learn the prediction without known frames: the fair comparison
        batch_size=4,
        max_steps=120,
        checkpoint_every=120,
        optim=replace(tiny.optim, lr=5e-3, warmup_steps=2),
    )
    # The known frames reach the other frames only through the temporal layers: start from a
    # video model whose temporal layers mix frames (as a trained one's do; diffusers' own
    # initialisation), not from the inflated model, whose temporal layers are the identity.
    video = named_config("tiny", "video")
    torch.manual_seed(0)
    base = VideoDiffusion(replace(video, vae=config.vae), video_unet(CONFIGS["tiny"])).save(tmp_path / "base")
    given, without = _unknown_frame_errors(VideoDiffusion.create(config, init_from=base), videos)
    assert given == pytest.approx(without, rel=1e-4)  # before: the known frames make no difference
    finetuned = train(config, shards, tmp_path / "work", init_from=base).model
    given, without = _unknown_frame_errors(finetuned, videos)
    print(f"{kind}: unknown-frame error given the known frames {given:.4f}, given none {without:.4f}")
    assert given < 0.85 * without, (given, without)


def test_context_guidance_from_one_batch_is_the_two_pass_guidance(interpolation):
    """Both predictions of context guidance come from one network call per step; the result is
    the classic two-call guidance D_u + w (D_c - D_u), the known frames put back exactly."""
    from model.masked import sample_known
    from model.samplers import SAMPLERS, guided, karras_sigmas

    torch.manual_seed(0)
    known = torch.randn(1, 9, 4, 4, 4)
    mask = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0, 1]])  # keys every 4th frame
    text = interpolation.text([""])
    config = replace(GenerationConfig.for_clip(interpolation.config.clip, steps=3), context_guidance=2.0)
    calls = []
    network = interpolation.denoiser
    hook = network.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        batched = sample_known(interpolation, known, mask, text, config, torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert calls and set(calls) == {2}  # one call per evaluation, conditional and unconditional together

    cond = masked_condition(known, mask)
    none = {k: torch.zeros_like(v) for k, v in cond.items()}
    ids = added_time_ids(torch.tensor([config.fps]), torch.tensor([config.motion]), torch.zeros(1))
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max)
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]

    def given(condition):
        return lambda x, sigma: network(x, sigma, text=text, added=ids, **condition)

    reference = SAMPLERS[config.sampler](guided(given(cond), given(none), 2.0), noise, sigmas)
    reference = torch.where(cond["mask"].bool(), known, reference)
    torch.testing.assert_close(batched, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(batched[:, [0, 4, 8]], known[:, [0, 4, 8]])
