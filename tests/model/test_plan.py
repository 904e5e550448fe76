"""Memory plans (model/plan.py, `vdm plan`): parameter counts are the real networks', the
bytes follow the stated rules, counted activations scale as they must and agree with a
real CPU step's, and a run that cannot fit is refused with the table of settings."""

from __future__ import annotations

import math
import re

import pytest
import torch
from click.testing import CliRunner

from model.data import ClipSpec
from model.plan import (
    GIB,
    PlanDoesNotFit,
    SavedTensors,
    check_fits,
    count_activations,
    parameters,
    plan,
    settings_that_fit,
)
from model.stages import NAMED_CONFIGS, VideoDiffusion, named_config

# Parameter counts do not depend on the clip: the counting tests use a small one.
SMALL_CLIP = ClipSpec(num_frames=2, fps=7.0, height=64, width=64)
STAGE_II = ClipSpec(num_frames=14, fps=7.0, height=320, width=576)  # SVD's Stage II
STAGE_III = ClipSpec(num_frames=14, fps=7.0, height=576, width=1024)  # SVD's Stage III
GPU_80 = 80 * GIB


def base(kind: str, **fields):
    """A GPU-sized (SVD / SD 2.1 layout) config of `kind`, in memory."""
    config = named_config("tiny", kind)
    if kind == "camera-lora":
        config = config.with_fields(motion_class="pan")
    return config.with_fields(unet="base", **fields)


def stage_ii(**fields):
    return base("video", clip=STAGE_II, batch_size=1, gradient_checkpointing=True, parallel="fsdp").with_fields(
        **fields
    )


def meta_count(module_factory) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_factory().parameters())


# -- parameters ----------------------------------------------------------------------------


def test_unet_parameters_are_the_real_networks_built_on_meta():
    from diffusers import UNet2DConditionModel, UNetSpatioTemporalConditionModel

    # diffusers' default UNetSpatioTemporalConditionModel is SVD's (image-to-video: 8 input channels).
    svd = meta_count(UNetSpatioTemporalConditionModel)
    assert parameters(base("i2v", clip=SMALL_CLIP)).unet == svd
    assert abs(svd / 1e9 - 1.52) < 0.01
    sd21 = {
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "block_out_channels": [320, 640, 1280, 1280],
    }
    sd21_count = meta_count(lambda: UNet2DConditionModel(**sd21))
    assert parameters(base("image", clip=ClipSpec(num_frames=1, height=64, width=64))).unet == sd21_count
    assert abs(sd21_count / 1e6 - 866) < 1


def test_strategies_decide_what_trains():
    from model.camera_lora import TEMPORAL_ATTENTION
    from model.networks import CONFIGS, is_temporal, video_unet

    with torch.device("meta"):
        unet = video_unet(CONFIGS["base"])
    temporal = sum(p.numel() for name, p in unet.named_parameters() if is_temporal(name))
    total = sum(p.numel() for p in unet.parameters())
    full = parameters(base("video", clip=SMALL_CLIP))
    partial = parameters(base("video", clip=SMALL_CLIP, strategy="partial"))
    assert (full.unet, full.trainable) == (total, total)
    assert (partial.unet, partial.trainable) == (total, temporal)
    # LoRA: rank x (in + out) for q, k, v and out of each temporal attention, nothing else trains.
    config = base("camera-lora", clip=SMALL_CLIP)
    rank = config.options.lora_rank
    wrapped = [m for name, m in unet.named_modules() if re.fullmatch(TEMPORAL_ATTENTION, name)]
    lora = parameters(config)
    assert lora.trainable == sum(rank * (m.in_features + m.out_features) for m in wrapped) > 0
    assert lora.unet == total + lora.trainable


def test_frozen_parts_are_what_the_code_builds():
    from model.conditioning import ImageEncoder, LatentCodec, TextEncoder
    from model.openclip import IMAGE_MODELS, TEXT_MODELS, register_tiny_models

    register_tiny_models(named_config("tiny", "video").cache_dir)
    text = TextEncoder(TEXT_MODELS["tiny"], None)
    vae = LatentCodec.tiny()
    assert parameters(named_config("tiny", "video")).frozen == (
        (f"text tower {TEXT_MODELS['tiny']}", sum(p.numel() for p in text.parameters())),
        ("VAE", sum(p.numel() for p in vae.parameters())),
    )
    image = ImageEncoder(IMAGE_MODELS["tiny"], None)
    towers = dict(parameters(named_config("tiny", "i2v")).frozen)
    assert towers[f"vision tower {IMAGE_MODELS['tiny']}"] == sum(p.numel() for p in image.parameters())
    assert dict(parameters(stage_ii()).frozen) == {"text tower ViT-H-14": 340_387_840, "VAE": 83_653_863}


# -- bytes ---------------------------------------------------------------------------------


def test_bytes_follow_the_rules():
    config = stage_ii()
    counts = parameters(config)
    frozen = sum(n for _, n in counts.frozen)
    one = plan(config, 1)
    assert one.parallel == "single" and one.ddp_buckets == one.fsdp_in_flight == 0
    assert one.weights == 4 * counts.unet + 4 * frozen
    assert (one.gradients, one.optimizer, one.ema) == (4 * counts.trainable, 8 * counts.trainable, 4 * counts.trainable)

    fsdp = plan(config, 8)  # the config's parallel: fsdp
    assert fsdp.parallel == "fsdp"
    assert fsdp.weights - 4 * frozen == math.ceil(4 * counts.unet / 8)  # the frozen towers are not sharded
    for name in ("gradients", "optimizer", "ema", "optimizer_step"):
        assert getattr(fsdp, name) == math.ceil(getattr(one, name) / 8), name
    assert fsdp.activations == one.activations  # per GPU: the same batch per GPU
    assert 0 < fsdp.fsdp_in_flight < one.weights

    ddp = plan(config, 8, parallel="ddp")
    assert ddp.parallel == "ddp" and ddp.weights == one.weights
    assert ddp.ddp_buckets == 4 * counts.trainable and ddp.fsdp_in_flight == 0
    static = ddp.weights + ddp.gradients + ddp.optimizer + ddp.ema + ddp.ddp_buckets
    assert ddp.total == static + max(ddp.activations, ddp.vae_encode, ddp.optimizer_step) + ddp.reserve
    assert fsdp.total < ddp.total

    text = "\n".join(fsdp.lines())
    assert "FSDP2 on 8 GPUs" in text and "1.52 B" in text and "activations: counted" in text


def test_activations_grow_linearly_with_batch_and_checkpointing_reduces_them():
    config = stage_ii()
    two, four = (count_activations(config, b, gradient_checkpointing=False).activations for b in (2, 4))
    assert 1.85 < four / two <= 2.0  # the bf16 weight casts are the only batch-independent part
    # plans count at batch 1 and 2 and extrapolate: exact for any batch
    assert plan(config, 8, batch_size=4, gradient_checkpointing=False).activations == four
    checkpointed = count_activations(config, 2, gradient_checkpointing=True).activations
    assert checkpointed < 0.8 * two


def test_activations_grow_linearly_with_frames():
    def per_sample(frames: int) -> int:
        """A sample's activations: the bf16 weight casts (batch-independent) left out."""
        config = base("i2v", clip=ClipSpec(frames, 7.0, 160, 288), gradient_checkpointing=False)
        one, two = (plan(config, 1, batch_size=b).activations for b in (1, 2))
        return two - one

    # Image-to-video attends to one image token. Text kinds also copy their 77 tokens to every
    # latent pixel for the temporal cross-attention (diffusers' TransformerSpatioTemporalModel),
    # a part that does not grow with frames: their activations are affine in frames.
    assert 1.9 < per_sample(14) / per_sample(7) <= 2.05


# -- counted against a real step ---------------------------------------------------------------


def _batch(config, batch: int) -> dict:
    c = config.clip
    return {
        "key": [f"clip-{i}" for i in range(batch)],
        "video": torch.rand(batch, c.num_frames, 3, c.height, c.width) * 2 - 1,
        "caption": ["a red disc moving right"] * batch,
        "fps": torch.full((batch,), c.fps),
        "motion": torch.full((batch,), 0.5),
    }


def _real_step(config, batch: int) -> tuple[VideoDiffusion, int]:
    """A real forward and backward of the tiny model on the CPU; the bytes autograd saved."""
    model = VideoDiffusion.create(config)
    model.train()
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved = SavedTensors(weights)
    with saved.hooks():
        loss = model.loss(_batch(config, batch), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    return model, saved.bytes


@pytest.mark.parametrize("kind", ["video", "i2v", "camera-lora", "prediction", "upsampler"])
def test_counted_activations_agree_with_a_real_cpu_step(kind):
    config = named_config("tiny", kind)
    if kind == "camera-lora":
        config = config.with_fields(motion_class="pan")
    _, real = _real_step(config, 2)
    counted = count_activations(config, 2, gradient_checkpointing=False, precision="fp32").activations
    assert 0.8 < counted / real < 1.25, (counted, real)


def _profiled_peak(step) -> int:
    """The peak of bytes the CPU allocator held while `step()` ran, from torch.profiler's record."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    now = peak = 0
    for event in events:
        now += event.nbytes()
        peak = max(peak, now)
    return peak


def test_counted_memory_agrees_with_the_real_peak_of_a_cpu_step():
    """A real forward and backward on the CPU: the allocator's peak against the plan's
    activations + gradients (fp32, no autocast, as on the CPU)."""
    config = named_config("tiny", "video")
    model = VideoDiffusion.create(config)
    model.train()
    batch = _batch(config, 4)
    peak = _profiled_peak(lambda: model.loss(batch, torch.Generator().manual_seed(0)).backward())
    counted = count_activations(config, 4, gradient_checkpointing=False, precision="fp32")
    planned = max(counted.activations + 4 * parameters(config).trainable, counted.vae_encode)
    assert 0.75 < planned / peak < 1.33, (planned, peak)


def test_counted_vae_encoding_agrees_with_the_real_peak():
    from model.conditioning import LatentCodec

    config = named_config("tiny", "video")
    codec = LatentCodec.tiny()
    video = _batch(config, 4)["video"]
    with torch.no_grad():
        peak = _profiled_peak(lambda: codec.encode(video, torch.Generator().manual_seed(0)))
    counted = count_activations(config, 4, gradient_checkpointing=False, precision="fp32").vae_encode
    assert 0.75 < counted / (peak + video.numel() * 4) < 1.33, (counted, peak)  # the plan counts the input too
    cached = config.with_fields(data="latents")
    assert count_activations(cached, 4, gradient_checkpointing=False).vae_encode == 0


# -- fail fast -----------------------------------------------------------------------------


def test_check_fits_refuses_what_cannot_fit_with_the_table():
    config = base("hq", clip=STAGE_III, batch_size=8, parallel="ddp", gradient_checkpointing=True)
    with pytest.raises(PlanDoesNotFit) as refused:
        check_fits(config, 1, GPU_80)
    assert isinstance(refused.value, ValueError)  # the training entrypoint's one `error:` line
    message = str(refused.value)
    assert message.startswith("this training run needs")
    assert "settings on a 80 GiB GPU" in message
    rows = [line for line in message.splitlines() if line.endswith((" yes", " no"))]
    assert len(rows) == 8  # one GPU: checkpointing off and on, batch 1, 2, 4, 8
    assert any(line.startswith("*") and line.endswith(" no") for line in rows)

    tiny = named_config("tiny", "video")
    assert check_fits(tiny, 1, GPU_80).total < 3 * GIB
    assert all(row.fits for row in settings_that_fit(tiny, 2, GPU_80))


def test_training_on_a_gpu_fails_fast_before_building_anything(monkeypatch, tmp_path):
    """model/train.py checks the plan first when the device is CUDA (simulated: a 1 GiB GPU)."""
    from types import SimpleNamespace

    from model import train as loop

    config = named_config("tiny", "video")
    # Counted here, where there is no CUDA (a faked one cannot run the fake forward passes); cached.
    settings_that_fit(config, 1, GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=GIB))

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the plan was checked")

    monkeypatch.setattr(loop.VideoDiffusion, "create", never)
    with pytest.raises(PlanDoesNotFit, match="the GPU has 1.0 GiB"):
        loop.train(config, [], tmp_path)


# -- vdm plan ------------------------------------------------------------------------------


def test_vdm_plan_prints_the_breakdown_and_the_table():
    from vdm.cli import main

    result = CliRunner().invoke(main, ["plan", "--config", "svd", "--stage", "video", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in ("FSDP2 on 8 GPUs", "parameters: UNet 1.52 B", "activations", "settings on a 80 GiB GPU"):
        assert expected in out, expected
    assert sum(line.endswith((" yes", " no")) for line in out.splitlines()) == 16  # ddp/fsdp x ckpt x 4 batches


def test_vdm_plan_reads_a_yaml_file_and_overrides_the_batch(tmp_path):
    from vdm.cli import main

    path = tmp_path / "mine.yaml"
    path.write_text("stage: video\nunet: tiny\nclip: {num_frames: 8, fps: 8.0, height: 32, width: 32}\n")
    args = ["plan", "--config", str(path), "--stage", "video", "--batch-size", "3", "--gpu-memory-gb", "24"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "batch 3 per GPU" in result.stdout and "settings on a 24 GiB GPU" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--stage", "nope"],
        ["--stage", "video", "--config", "nope"],
        ["--stage", "temporal-decoder"],
        ["--stage", "hq", "--config", str(NAMED_CONFIGS / "tiny-video.yaml")],
    ],
)
def test_vdm_plan_bad_config_or_stage_is_one_error_line(args):
    from vdm.cli import main

    result = CliRunner().invoke(main, ["plan", *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize(
    ("size", "kind", "gpus", "memory_gib"),
    [("svd", "hq", 8, 80), ("svd", "multiview", 8, 80), ("svd", "upsampler", 8, 80), ("small", "video", 1, 24)],
)
def test_the_shipped_real_size_configs_fit_the_gpus_they_are_for(size, kind, gpus, memory_gib):
    """The largest of each size: SVD's at 576x1024 (and 21 views at 576x576) on 80 GB GPUs,
    small on one 24 GB GPU. SVD's high-resolution stages fit only because each whole
    spatio-temporal transformer is checkpointed (model/networks.py: enable_checkpointing)."""
    needed = plan(named_config(size, kind), gpus)
    assert needed.fits(memory_gib * GIB), "\n".join(needed.lines())
    assert needed.total > memory_gib * GIB / 8  # a real figure, not an empty plan


def test_a_plan_that_cannot_be_computed_warns_and_lets_the_run_try(monkeypatch):
    """The check is advice: a counting failure (not a verdict) must not stop a GPU run."""
    from model import train as loop

    def broken(*args, **kwargs):
        raise RuntimeError("fake tensors unsupported here")

    monkeypatch.setattr(loop, "check_fits", broken)
    with pytest.warns(UserWarning, match="no memory plan for this run .RuntimeError: fake tensors"):
        loop._check_plan(named_config("tiny", "video"), 1, GIB)
    monkeypatch.setattr(loop, "check_fits", lambda *a: (_ for _ in ()).throw(PlanDoesNotFit("needs more")))
    with pytest.raises(PlanDoesNotFit, match="needs more"):
        loop._check_plan(named_config("tiny", "video"), 1, GIB)
