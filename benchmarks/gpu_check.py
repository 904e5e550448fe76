# ruff: noqa: E402 (the clock starts before the imports)
"""One GPU check, for any machine with a GPU: `make gpu-check` (at most 8 minutes on one
H100/H200; nothing downloaded: every model is built locally at full size with random
weights). Prints one JSON object and writes it to `benchmarks/results/gpu-check-<UTC>.json`.

Sections:
- `train_step`: a training step of `small` (UNet "small", 14 frames at 256x256) and of
  `svd` Stage II (UNet "base", SVD's spatio-temporal UNet, 14 frames at 320x576, batch 1)
  through our training code (`VideoDiffusion.loss` under bf16 autocast, then
  `model.training.optimization_step`: backward, clip, AdamW, EMA), gradient checkpointing
  on, torch.compile off (in this process) and on (in a child process, within what is left
  of the time budget). The VAE encode is not timed: the step reads cached latents as `vdm
  cache-latents` writes them; the text tower is an open_clip text tower of the UNet's width
  with one block (the configs' full towers add about 1% of a step's FLOPs or less). FLOPs per
  step are counted with FlopCounterMode: `flops_per_step` is forward + backward as without
  checkpointing (model FLOPs: MFU), `executed_flops_per_step` adds the recomputed forward
  (hardware FLOPs: HFU).
- `sampling`: image-to-video at 14 frames, 576x1024, 25 steps: our sampler (the i2v task's
  `sample`, as the service runs it: fp32 weights under bf16 autocast) against diffusers'
  `StableVideoDiffusionPipeline` (bf16 weights) loaded from our SVD-format export
  (`model.svd.export_svd`) of the same random model, from the same image and noise; both
  with the pipeline's Euler sampler. Seconds, peak memory, ours/stock, frame difference.
- `curation`: the neural annotators (OCR, CLIP + aesthetic head, CoCa captions) at their
  real sizes with random weights, frames/s each.
- `serving`: one image-to-video request through the service's `image_to_video` method,
  called in process (no HTTP, no registry download).
- `evaluation`: FVD's cost with a random Kinetics-400 I3D (model/i3d.py): feature clips/s
  at the standard input (16 frames at 224x224, the network alone), and `model.fvd.fvd` end
  to end on N generated against N reference clips of the sampling size (frame resampling,
  resize, features, the Fréchet distance).
- `device`: name, memory, versions, the bf16 dense peak used for MFU.

`--smoke` runs the same code at CPU sizes (tiny UNet, 4 frames at 32x32, 2 sampling steps,
compile skipped; the I3D at its one size, on 5 clips) in about 30 seconds; the test suite
runs it. Without a GPU the script runs the smoke sizes.

    python benchmarks/gpu_check.py [--smoke] [--results-dir DIR] [--budget-s 480] [--sections ...]
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # the budget counts the imports (torch, diffusers: seconds) too

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.networks import CONFIGS, restore_norm_eps
from model.stages import StageConfig, VideoDiffusion, named_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("train_step", "sampling", "curation", "serving", "evaluation")
TARGET_MFU = 0.40  # svd Stage II, bf16, H100/H200
TARGET_SAMPLING_RATIO = 0.6  # our sampler's seconds over the stock pipeline's
PEAK_TABLE = "H100 SXM 989, H100 PCIe 756, H200 989, A100 312, L40S 362 (dense bf16 TFLOP/s)"
SD21_VAE = {  # Stable Diffusion 2.1's VAE (SVD encodes with the same encoder)
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class TrainCase:
    config: str  # the named config (model/configs/<config>-video.yaml)
    frames: int
    height: int
    width: int
    batch_size: int


@dataclass(frozen=True)
class Scale:
    smoke: bool
    train: dict[str, TrainCase]
    warmup_steps: int
    timed_steps: int
    i2v_config: str
    frames: int  # sampling and serving
    height: int
    width: int
    sampling_steps: int
    sampling_warmup_steps: int  # a short run before the timed one (0: none)
    curation_frames: int
    curation_size: tuple[int, int]  # height, width
    eval_clips: int  # generated clips (and as many reference clips) per FVD
    eval_batch_size: int


FULL = Scale(
    smoke=False,
    train={"small": TrainCase("small", 14, 256, 256, 2), "svd": TrainCase("svd", 14, 320, 576, 1)},
    warmup_steps=3,
    timed_steps=5,
    i2v_config="svd",
    frames=14,
    height=576,
    width=1024,
    sampling_steps=25,
    sampling_warmup_steps=2,
    curation_frames=128,
    curation_size=(360, 640),
    eval_clips=256,
    eval_batch_size=32,
)
SMOKE = Scale(
    smoke=True,
    train={"tiny": TrainCase("tiny", 4, 32, 32, 1)},
    warmup_steps=1,
    timed_steps=2,
    i2v_config="tiny",
    frames=4,
    height=32,
    width=32,
    sampling_steps=2,
    sampling_warmup_steps=0,
    curation_frames=6,
    curation_size=(64, 96),
    eval_clips=2,  # the I3D runs at its one size: a clip takes a second or two on a CPU thread
    eval_batch_size=1,
)
TRAIN_TIMED = (
    "VideoDiffusion.loss (cached latents: no VAE encode; text: a one-block open_clip text tower of the UNet's "
    "width, computed each step; EDM loss through the UNet) under bf16 autocast (fp32 on the CPU), then "
    "model.training.optimization_step (backward, grad clip, AdamW, EMA); gradient checkpointing on; "
    "step_s: median of the timed steps after the warm-up ones"
)


# -- small helpers --------------------------------------------------------------------


def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated; on the CPU the process's peak RSS so far (monotonic)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def allocated_mb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """What training and serving run under: bf16 autocast on a GPU, plain fp32 on the CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def params_m(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def peak_bf16_tflops(name: str) -> tuple[float | None, str]:
    """Dense bf16 peak of the device, by name, and which table row it is."""
    upper = name.upper()
    if "H100" in upper and "PCIE" in upper:
        return 756.0, "H100 PCIe"
    if ("H100" in upper or "H200" in upper) and "NVL" in upper:
        return None, f"{name}: an NVL part is not in the table ({PEAK_TABLE}); MFU not computed"
    if "H100" in upper:
        return 989.0, "H100 SXM"
    if "H200" in upper:
        return 989.0, "H200"
    if "A100" in upper:
        return 312.0, "A100"
    if "L40S" in upper:
        return 362.0, "L40S"
    return None, f"{name}: not in the table ({PEAK_TABLE}); MFU not computed"


def with_fields(config: StageConfig, **values) -> StageConfig:
    """`config` with those of `values` that are StageConfig fields."""
    known = {f.name for f in fields(StageConfig)}
    return replace(config, **{k: v for k, v in values.items() if k in known})


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout (Python or native libraries) goes to stderr meanwhile:
    stdout carries the one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def guarded(name: str, device: torch.device, run: Callable[[], dict]) -> dict:
    """A section's report, or what went wrong (the other sections still run)."""
    start = now()
    try:
        report = run()
    except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
        report = {
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc().splitlines()[-12:],
        }
        print(f"gpu-check: section {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    free_memory(device)
    return report | {"section_s": round(now() - start, 2)}


# -- the parts every section builds ------------------------------------------------------


class Parts:
    """Folders shared by the sections (and the compile child): the random VAE, the text
    towers' open_clip configs, open_clip's cache."""

    def __init__(self, work: Path, smoke: bool):
        self.work, self.smoke = work, smoke
        self.cache = work / "cache"
        self.towers = work / "open_clip_configs"

    @property
    def vae(self) -> Path:
        """A random VAE folder: SD 2.1's architecture (8x downsampling), or the tiny one for smoke."""
        folder = self.work / "vae"
        if not (folder / "config.json").exists():
            from diffusers import AutoencoderKL

            from model.conditioning import LatentCodec

            torch.manual_seed(0)
            vae = LatentCodec.tiny().vae if self.smoke else AutoencoderKL(**SD21_VAE)
            vae.save_pretrained(folder, safe_serialization=True)
        return folder

    def text_tower(self, width: int) -> str:
        """An open_clip text tower `width` wide with one block before the last (TextEncoder uses
        the penultimate layer), registered under a name of its own."""
        import open_clip

        name = f"vdm-gpu-check-text-{width}"
        self.towers.mkdir(parents=True, exist_ok=True)
        path = self.towers / f"{name}.json"
        if not path.exists():
            heads = max(1, width // 64)
            text = {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": 2}
            vision = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
            path.write_text(json.dumps({"embed_dim": width, "vision_cfg": vision, "text_cfg": text}))
        if name not in open_clip.list_models():
            open_clip.add_model_config(self.towers)
        return name


# -- train_step ---------------------------------------------------------------------------


def train_model(case: TrainCase, parts: Parts, device: torch.device) -> VideoDiffusion:
    """The named config's Stage II model at the case's size, on cached latents, random weights."""
    base = named_config(case.config, "video")
    width = CONFIGS[base.unet].cross_attention_dim
    config = with_fields(
        base,
        clip=replace(base.clip, num_frames=case.frames, height=case.height, width=case.width),
        batch_size=case.batch_size,
        data="latents",
        text_model=parts.text_tower(width),
        text_weights=None,
        vae=str(parts.vae),
        allow_random_weights=True,
        gradient_checkpointing=True,
        num_workers=0,
        cache_dir=str(parts.cache),
    )
    torch.manual_seed(0)
    return VideoDiffusion.create(config).to(device)


def cached_batch(model: VideoDiffusion, device: torch.device) -> dict:
    """A batch as `vdm cache-latents` shards load (LatentDataset): VAE posteriors, not frames."""
    from model.latents import vae_fingerprint

    config, codec = model.config, model.codec
    b, f, clip = config.batch_size, codec.downsampling, config.clip
    shape = (b, clip.num_frames, codec.vae.config.latent_channels, clip.height // f, clip.width // f)
    generator = torch.Generator().manual_seed(0)
    return {
        "key": [f"clip-{i}" for i in range(b)],
        "latent_mean": torch.randn(shape, generator=generator).to(device),
        "latent_std": torch.full(shape, 0.1, device=device),
        "vae": [vae_fingerprint(codec)] * b,
        "fps": torch.full((b,), config.clip.fps, device=device),
        "motion": torch.ones(b, device=device),
        "caption": ["a red disc moving right over a grey floor"] * b,
    }


def train_steps(
    model: VideoDiffusion,
    batch: dict,
    device: torch.device,
    warmup: int,
    steps: int,
    compile_backend: str | None = None,
) -> dict:
    """The training loop's step (model/train.py), timed: `warmup` steps, then `steps` timed."""
    from model.training import EMA, apply_strategy, optimization_step, optimizer_and_schedule

    config = model.config
    model.train()
    params = apply_strategy(model.unet, config.strategy, model.task.adapter(config))
    optimizer, schedule = optimizer_and_schedule(params, config.optim)
    ema = EMA(params, config.optim.ema_decay)
    generator = torch.Generator()
    if compile_backend:
        model.denoiser.network.unet = torch.compile(model.unet, backend=compile_backend)
    free_memory(device)
    reset_peak(device)
    times, losses = [], []
    try:
        for step in range(warmup + steps):
            generator.manual_seed(config.seed * 1_000_003 + step)
            sync(device)
            start = now()
            with autocast(device):
                loss = model.loss(batch, generator)
            optimization_step(loss, params, optimizer, schedule, ema, config.optim.grad_clip)
            sync(device)
            times.append(now() - start)
            losses.append(loss.item())
    finally:
        model.denoiser.network.unet = model.unet
    step_s = statistics.median(times[warmup:])
    return {
        "samples_per_s": round(config.batch_size / step_s, 3),
        "step_s": round(step_s, 4),
        "timed_steps_s": [round(t, 4) for t in times[warmup:]],
        "warmup_s": round(sum(times[:warmup]), 2),  # with torch.compile: the compilation
        "peak_memory_mb": peak_memory_mb(device),
        "loss_finite": bool(np.isfinite(losses).all()),
    }


def set_checkpointing(unet: torch.nn.Module, on: bool, function: Callable | None = None) -> None:
    """The UNet's gradient checkpointing as the model sets it (model.networks' regions where
    it defines them, else diffusers' own), with `function` as the checkpoint (None: torch's)."""
    from model import networks

    if not hasattr(networks, "enable_checkpointing"):
        if on:
            unet.enable_gradient_checkpointing(function)
        else:
            unet.disable_gradient_checkpointing()
        return
    networks.disable_checkpointing(unet)
    if on:
        networks.enable_checkpointing(unet, function)


class CountingCheckpoint:
    """torch.utils.checkpoint (as diffusers calls it) that also counts the FLOPs of each
    checkpointed call's forward: what the backward pass computes again."""

    def __init__(self) -> None:
        self.flops = 0

    def __call__(self, function: Callable, *args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
        self.flops += inner.get_total_flops()
        return out


def count_flops(model: VideoDiffusion, batch: dict, device: torch.device, verify: bool) -> dict:
    """FLOPs of one step's forward + backward (FlopCounterMode; the optimizer's elementwise
    work has no FLOP formula and is not counted). `executed`: with checkpointing as it runs
    (recompute stops early once the saved tensors are back); `model`: the count with every
    checkpointed forward recomputed in full, less those forwards — what the step computes
    without checkpointing. `verify` also counts a step with checkpointing off (it must equal
    `model`); that step holds every activation, so only the smoke sizes do it."""
    unet = model.unet
    model.train()
    generator = torch.Generator()
    # The CPU's fused attention kernel has no FLOP formula; its math path (matmuls) does.
    kernels = (
        torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
        if device.type == "cpu"
        else contextlib.nullcontext()
    )

    def one_step() -> tuple[int, int]:
        generator.manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            with autocast(device):
                loss = model.loss(batch, generator)
            forward = counter.get_total_flops()
            loss.backward()
        unet.zero_grad(set_to_none=True)
        return forward, counter.get_total_flops()

    with kernels:
        with torch.no_grad(), autocast(device):  # the first call also encodes (and keeps) the empty prompt
            model.loss(batch, generator.manual_seed(0))
        forward, executed = one_step()
        recompute = CountingCheckpoint()
        set_checkpointing(unet, True, recompute)
        try:
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                _, with_full_recompute = one_step()
        finally:
            set_checkpointing(unet, True)  # the model's own checkpointing again
        flops = {
            "flops_per_step": with_full_recompute - recompute.flops,
            "executed_flops_per_step": executed,
            "forward_flops_per_step": forward,
            "checkpointed_forward_flops": recompute.flops,
        }
        if verify:
            set_checkpointing(unet, False)
            try:
                _, without = one_step()
            finally:
                set_checkpointing(unet, True)
            flops["check"] = {
                "flops_without_checkpointing": without,
                "equal": without == flops["flops_per_step"],
                "counted_twice_equal": one_step()[1] == executed,
            }
    return flops


def rates(flops: dict, measured: dict, peak: float | None) -> dict:
    """Achieved TFLOP/s, MFU (model FLOPs) and HFU (executed FLOPs) of a timed step."""
    step_s = measured["step_s"]
    model_tflops = flops["flops_per_step"] / step_s / 1e12
    executed_tflops = flops["executed_flops_per_step"] / step_s / 1e12
    return {
        "achieved_tflops": round(model_tflops, 3),
        "executed_tflops": round(executed_tflops, 3),
        "mfu": round(model_tflops / peak, 4) if peak else None,
        "hfu": round(executed_tflops / peak, 4) if peak else None,
    }


def train_case(name: str, scale: Scale, parts: Parts, device: torch.device, peak: float | None) -> dict:
    case = scale.train[name]
    start = now()
    model = train_model(case, parts, device)
    report = {
        "config": f"{case.config}-video",
        "unet": model.config.unet,
        "unet_params_m": params_m(model.unet),
        "frames": case.frames,
        "height": case.height,
        "width": case.width,
        "batch_size": case.batch_size,
        "build_s": round(now() - start, 1),
    }
    batch = cached_batch(model, device)
    report["latent_shape"] = list(batch["latent_mean"].shape[1:])
    flops = count_flops(model, batch, device, verify=scale.smoke)
    eager = train_steps(model, batch, device, scale.warmup_steps, scale.timed_steps)
    del model, batch
    return report | flops | {"eager": eager | rates(flops, eager, peak)}


def compiled_in_child(name: str, args: argparse.Namespace, parts: Parts, seconds: float) -> dict:
    """The compiled step, measured in a child process killed when the budget runs out
    (compilation cannot be interrupted in process). Its own process: a clean peak memory."""
    if seconds < 60:
        return {"skipped": f"{seconds:.0f} s of the budget left: too little to compile; run --sections train_step"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--train-child",
        name,
        "--compile-backend",
        args.compile_backend,
        "--work",
        str(parts.work),
    ] + (["--smoke"] if parts.smoke else [])
    child = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = child.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"skipped": f"did not finish in the {seconds:.0f} s left of the budget; run --sections train_step"}
    if child.returncode != 0:
        return {"error": f"child exited {child.returncode}", "stderr": err.strip().splitlines()[-12:]}
    return json.loads(out.strip().splitlines()[-1])


def train_child(args: argparse.Namespace) -> dict:
    """`--train-child NAME`: one compiled (or, for tests, plain) step measurement."""
    scale = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if scale.smoke else "cuda")
    if scale.smoke:
        torch.set_num_threads(1)  # see run_check
    parts = Parts(Path(args.work), scale.smoke)
    model = train_model(scale.train[args.train_child], parts, device)
    batch = cached_batch(model, device)
    backend = None if args.compile_backend == "none" else args.compile_backend
    return train_steps(model, batch, device, scale.warmup_steps, scale.timed_steps, backend) | {
        "compile_backend": args.compile_backend
    }


def train_section(scale: Scale, parts: Parts, device: torch.device, peak: float | None) -> dict:
    report: dict = {"timed": TRAIN_TIMED}
    for name in scale.train:
        measure = lambda name=name: train_case(name, scale, parts, device, peak)  # noqa: E731
        report[name] = guarded(f"train_step.{name}", device, measure)
    return report


def compiled_section(report: dict, scale: Scale, parts: Parts, args, deadline: float, peak: float | None) -> None:
    """torch.compile'd steps, the most telling first (svd Stage II), each while budget lasts."""
    for name in sorted(scale.train, key=lambda n: n != "svd"):
        entry = report.setdefault(name, {})
        if scale.smoke:
            entry["compiled"] = {
                "skipped": "CPU smoke: inductor compiles the tiny step in minutes on 2 cores (aot_eager: ~30 s); "
                "the GPU run measures it"
            }
            continue
        if "eager" not in entry:
            entry["compiled"] = {"skipped": "the eager step failed"}
            continue
        compiled = compiled_in_child(name, args, parts, deadline - now() - 5)
        if "step_s" in compiled:
            compiled |= rates(entry, compiled, peak)
            entry["compile_speedup"] = round(entry["eager"]["step_s"] / compiled["step_s"], 3)
        entry["compiled"] = compiled


# -- sampling and serving -----------------------------------------------------------------


def i2v_model(scale: Scale, parts: Parts) -> VideoDiffusion:
    """A random image-to-video model at the named config's architecture (SVD's for `svd`),
    on the CPU. Inflation starts the temporal layers as the identity (their last layers at
    zero) and the conditioning latent's input channels at zero: those weights are perturbed,
    so every path of the network counts."""
    base = named_config(scale.i2v_config, "i2v")
    config = with_fields(
        base,
        clip=replace(base.clip, num_frames=scale.frames, height=scale.height, width=scale.width),
        image_weights=None,
        vae=str(parts.vae),
        allow_random_weights=True,
        cache_dir=str(parts.cache),
    )
    torch.manual_seed(0)
    model = VideoDiffusion.create(config)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name == "conv_in.weight" or not p.any():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def conditioning_image(scale: Scale) -> np.ndarray:
    """A smooth RGB frame with a disc, (H, W, 3) uint8."""
    y, x = np.mgrid[0 : scale.height, 0 : scale.width] / max(scale.height, scale.width)
    disc = ((x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.02).astype(float)
    rgb = np.stack([0.2 + 0.6 * x + 0.2 * disc, 0.3 + 0.4 * y, 0.5 - 0.3 * disc], axis=-1)
    return (rgb.clip(0, 1) * 255).astype(np.uint8)


class UNetCalls:
    """Counts a UNet's forward calls and their batch sizes (guidance batched: 2 per call)."""

    def __init__(self, unet: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.batches.append(int(args[0].shape[0]))

    def report(self) -> dict:
        self.handle.remove()
        return {"unet_calls": len(self.batches), "unet_batch_sizes": sorted(set(self.batches))}


def timed(device: torch.device, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """(result, seconds, peak MB) of one run."""
    free_memory(device)
    reset_peak(device)
    sync(device)
    start = now()
    result = run()
    sync(device)
    return result, now() - start, peak_memory_mb(device)


def sampling_section(scale: Scale, parts: Parts, device: torch.device, model: VideoDiffusion) -> dict:
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from model import svd
    from model.conditioning import motion_bucket
    from model.pipeline import GenerationConfig

    start = now()
    folder = svd.export_svd(model, parts.work / "svd")
    export_s = now() - start
    generation = GenerationConfig.for_clip(model.config.clip, steps=scale.sampling_steps, sampler="euler", seed=0)
    rgb = conditioning_image(scale)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1

    # ours: the i2v task's sample path under the service's autocast, fp32 weights
    model.to(device)
    weights_ours = allocated_mb(device)

    def ours(steps: int) -> torch.Tensor:
        with autocast(device):
            return model.task.sample(model, model.task.Inputs(image=image), replace(generation, steps=steps)).float()

    if scale.sampling_warmup_steps:
        ours(scale.sampling_warmup_steps)
    calls = UNetCalls(model.unet)
    decodes = UNetCalls(model.codec.vae.decoder)
    frames_ours, ours_s, ours_peak = timed(device, lambda: ours(generation.steps))
    ours_calls, ours_decodes = calls.report(), decodes.report()
    processors = sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    model.to("cpu")
    free_memory(device)

    # stock: diffusers' pipeline on our export, bf16 weights (fp32 on the CPU)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = now()
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    restore_norm_eps(pipe.unet)  # the network ours runs: the compared part is the pipeline
    pipe.set_progress_bar_config(disable=True)
    load_s = now() - start
    weights_stock = allocated_mb(device)
    # The draws `animate` makes from its seed: the image's noise, then the latent noise. The
    # pipeline draws the image's noise from the same seed itself; the latent noise is handed
    # over (it would draw it in bf16, a different stream).
    generator = torch.Generator().manual_seed(generation.seed)
    torch.randn((1, 3, scale.height, scale.width), generator=generator)
    f, channels = model.codec.downsampling, model.codec.vae.config.latent_channels
    latents = torch.randn((1, scale.frames, channels, scale.height // f, scale.width // f), generator=generator)

    def stock(steps: int) -> torch.Tensor:
        out = pipe(
            Image.fromarray(rgb),
            height=scale.height,
            width=scale.width,
            num_frames=scale.frames,
            num_inference_steps=steps,
            min_guidance_scale=generation.guidance_min,
            max_guidance_scale=generation.guidance_max,
            fps=int(generation.fps) + 1,  # the pipeline conditions on fps - 1
            motion_bucket_id=int(motion_bucket(torch.tensor(generation.motion))),
            noise_aug_strength=generation.noise_aug_strength,
            generator=torch.Generator().manual_seed(generation.seed),
            latents=latents.to(dtype),
            output_type="pt",
        ).frames[0]
        return out.float() * 2 - 1  # [0, 1] -> [-1, 1]

    if scale.sampling_warmup_steps:
        stock(scale.sampling_warmup_steps)
    calls = UNetCalls(pipe.unet)
    decodes = UNetCalls(pipe.vae.decoder)
    frames_stock, stock_s, stock_peak = timed(device, lambda: stock(generation.steps))
    stock_calls, stock_decodes = calls.report(), decodes.report()
    pipe = None  # the GPU memory back before serving
    free_memory(device)

    difference = (frames_ours.cpu() - frames_stock.cpu()).abs()
    return {
        "task": "image-to-video",
        "model": f"{scale.i2v_config}-i2v architecture, random weights (zero-initialised ones perturbed)",
        "unet_params_m": params_m(model.unet),
        "frames": scale.frames,
        "height": scale.height,
        "width": scale.width,
        "steps": generation.steps,
        "sampler": "euler (the stock pipeline's; our default, heun, evaluates the UNet 2x per step)",
        "guidance": [generation.guidance_min, generation.guidance_max],
        "export_s": round(export_s, 1),
        "ours": {
            "called": "the i2v task's sample -> model.pipeline.animate, under the service's autocast (bf16 on a GPU)",
            "precision": "fp32 weights, bf16 autocast, fp32 latents" if device.type == "cuda" else "fp32",
            "seconds": round(ours_s, 3),
            "peak_memory_mb": ours_peak,
            "weights_mb": weights_ours,
            **ours_calls,
            "vae_decode_calls": ours_decodes["unet_calls"],
            "vae_decode_batch_sizes": ours_decodes["unet_batch_sizes"],
            "attention_processors": processors,
            "torch_compile": False,
        },
        "stock": {
            "called": "diffusers StableVideoDiffusionPipeline.from_pretrained(our export_svd folder)",
            "precision": f"{str(dtype).removeprefix('torch.')} weights and latents",
            "load_s": round(load_s, 1),
            "seconds": round(stock_s, 3),
            "peak_memory_mb": stock_peak,
            "weights_mb": weights_stock,
            **stock_calls,
            "vae_decode_calls": stock_decodes["unet_calls"],
            "vae_decode_batch_sizes": stock_decodes["unet_batch_sizes"],
        },
        "ratio_ours_over_stock": round(ours_s / stock_s, 3),
        "target_ratio_max": TARGET_SAMPLING_RATIO,
        "meets_target": ours_s / stock_s <= TARGET_SAMPLING_RATIO,
        "max_abs_frame_difference": round(float(difference.max()), 6),
        "mean_abs_frame_difference": round(float(difference.mean()), 6),
        "frames_std": round(float(frames_ours.std()), 4),
        "finite": bool(torch.isfinite(frames_ours).all() and torch.isfinite(frames_stock).all()),
        "compared": (
            "frames in [-1, 1] of both from the same image, the same image-noise draw (same CPU generator seed) "
            "and the same initial latent noise (ours' draw; the pipeline gets it as `latents`"
            + (", rounded to bf16" if device.type == "cuda" else "")
            + "), same Karras sigmas, Euler steps and per-frame guidance. "
            + (
                "On the GPU the two differ in precision (ours: fp32 weights under bf16 autocast, fp32 latents; "
                "stock: bf16 weights and latents), so the difference is bf16 rounding carried through 25 steps "
                "of a random network, not a sampler mismatch (the fp32 smoke run agrees to ~1e-6)."
                if device.type == "cuda"
                else "Both fp32 on the CPU: they agree to float rounding."
            )
        ),
    }


def serving_section(scale: Scale, parts: Parts, device: torch.device, model: VideoDiffusion) -> dict:
    from PIL import Image

    from model.pipeline import GenerationConfig
    from serving.config import ModelSpec
    from serving.models import LiveModels, ServedModel
    from serving.service import VideoGeneration

    model.to(device)
    spec = ModelSpec("gpu-check-i2v", "champion")
    live = LiveModels((spec,), parts.work / "serving-cache")
    live._by_name = {spec.name: ServedModel(spec.name, "1", spec.alias, None, {}, model)}  # as a refresh leaves it
    service = VideoGeneration.inner.__new__(VideoGeneration.inner)  # no loader thread, no registry
    service.models = live
    png = parts.work / "frame.png"
    Image.fromarray(conditioning_image(scale)).save(png)
    request = {
        "image": png,
        "num_frames": scale.frames,
        "height": scale.height,
        "width": scale.width,
        "num_steps": scale.sampling_steps,
        "seed": 0,
    }
    start = now()
    service.image_to_video(**request | {"num_steps": 1})  # first-call work: kernels, the mp4 encoder
    warmup_s = now() - start
    response, seconds, peak = timed(device, lambda: service.image_to_video(**request))
    model.to("cpu")
    report = {
        "called": (
            "serving.service.VideoGeneration.image_to_video in process: request validation, the image upload "
            "decoded, the i2v task's sample under the service's bf16 autocast, mp4 encode; no HTTP, no registry"
        ),
        "request": {k: v for k, v in request.items() if k != "image"},
        "sampler": f"{GenerationConfig.sampler} (GenerationConfig's default: requests cannot choose)",
        "status": response.status_code,
        "latency_s": round(seconds, 3),
        "warmup_request_s": round(warmup_s, 3),
        "peak_memory_mb": peak,
        "mp4_bytes": len(response.body),
    }
    if response.status_code != 200:
        report["error"] = response.body.decode(errors="replace")[:500]
    return report


# -- curation -----------------------------------------------------------------------------


def curation_section(scale: Scale, parts: Parts, device: torch.device) -> dict:
    import onnxruntime

    from components.curation.neural import ClipScorer, CocaCaptioner, NeuralConfig, TextDetector

    config = NeuralConfig(allow_random_weights=True, tiny_models=scale.smoke, cache_dir=str(parts.cache))
    rng = np.random.default_rng(0)
    height, width = scale.curation_size
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(scale.curation_frames)]
    warm = frames[: min(len(frames), config.batch_size)]
    on_gpu = device.type == "cuda"
    ocr_gpu = on_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    report: dict = {
        "frames": len(frames),
        "frame_size": [height, width],
        "weights": "random (open_clip models built without weights; PP-OCRv4's detector is the real one)",
        "batch_size": config.batch_size,
    }

    def measure(name: str, build: Callable[[], object], run: Callable[[object, list], object], extra: dict) -> None:
        start = now()
        annotator = build()
        build_s = now() - start
        run(annotator, warm)  # the first batch: kernels, allocations
        start = now()
        run(annotator, frames)
        seconds = now() - start
        report[name] = {
            "frames_per_s": round(len(frames) / seconds, 2),
            "seconds": round(seconds, 3),
            "build_s": round(build_s, 1),
        } | extra
        del annotator
        free_memory(device)

    measure(
        "ocr",
        lambda: TextDetector(config),
        lambda a, batch: a.text_ratios(batch),
        {"model": "PP-OCRv4 mobile det (onnxruntime)", "device": "cuda" if ocr_gpu else "cpu"},
    )
    clip_name = "vdm-tiny-clip" if scale.smoke else config.clip_model
    measure(
        "clip_aesthetic",
        lambda: ClipScorer(config),
        lambda a, batch: a.aesthetic(a.embed_images(batch)),
        {"model": f"{clip_name} + LAION aesthetic MLP", "device": device.type},
    )
    coca_name = "vdm-tiny-coca" if scale.smoke else config.coca_model
    measure(
        "coca_caption",
        lambda: CocaCaptioner(config),
        lambda a, batch: a.caption(batch),
        {"model": coca_name, "device": device.type, "max_tokens": config.caption_max_tokens},
    )
    return report


# -- evaluation ---------------------------------------------------------------------------


def evaluation_section(scale: Scale, device: torch.device) -> dict:
    from model.fvd import FEATURE_FRAMES, FEATURE_SIZE, fvd
    from model.i3d import InceptionI3d
    from model.openclip import fixed_seed

    with fixed_seed(0):
        i3d = InceptionI3d().to(device).eval()
    batch = scale.eval_batch_size
    shape = (batch, 3, FEATURE_FRAMES, FEATURE_SIZE, FEATURE_SIZE)
    standard = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)

    def forwards(count: int) -> None:
        with torch.inference_mode(), autocast(device):
            for _ in range(count):
                i3d(standard)

    if device.type == "cuda":
        forwards(1)  # first call: cuDNN's algorithm choice, allocations
    batches = 1 if scale.smoke else max(1, scale.eval_clips // batch)
    _, network_s, network_peak = timed(device, lambda: forwards(batches))

    def clips(seed: int) -> list[torch.Tensor]:
        """`eval_clips` clips of the sampling size in CPU memory, as an evaluation holds them
        (eight distinct ones repeated: the cost is the same, the memory is not)."""
        draw = torch.Generator().manual_seed(seed)
        shape = (scale.frames, 3, scale.height, scale.width)
        distinct = [torch.rand(shape, generator=draw) * 2 - 1 for _ in range(min(8, scale.eval_clips))]
        return [distinct[i % len(distinct)] for i in range(scale.eval_clips)]

    generated, reference = clips(1), clips(2)
    distance, fvd_s, fvd_peak = timed(device, lambda: fvd(i3d, generated, reference, batch_size=batch))
    return {
        "network": "Kinetics-400 I3D (model/i3d.py), random weights",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch_size": batch,
        "i3d_input": [FEATURE_FRAMES, FEATURE_SIZE, FEATURE_SIZE],
        "i3d_timed_clips": batches * batch,
        "i3d_clips_per_s": round(batches * batch / network_s, 2),
        "i3d_peak_memory_mb": network_peak,
        "fvd": {
            "called": "model.fvd.fvd(i3d, generated, reference): both sets' features, then the Fréchet distance",
            "clips": scale.eval_clips,
            "clip_size": [scale.frames, scale.height, scale.width],
            "seconds": round(fvd_s, 3),
            "clips_per_s": round(2 * scale.eval_clips / fvd_s, 2),
            "value": distance,
            "peak_memory_mb": fvd_peak,
        },
    }


# -- device and main ---------------------------------------------------------------------


def device_section(device: torch.device, smoke: bool) -> dict:
    import diffusers

    info = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "smoke": smoke,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak, row = peak_bf16_tflops(props.name)
        info |= {
            "name": props.name,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "gpu_count": torch.cuda.device_count(),
            "peak_bf16_dense_tflops": peak,
            "peak_source": row,
        }
    else:
        info |= {
            "name": platform.processor() or platform.machine(),
            "peak_bf16_dense_tflops": None,
            "peak_source": "CPU: no known peak, MFU not computed",
        }
    return info


def summary(report: dict, peak: float | None) -> dict:
    svd = report.get("train_step", {}).get("svd", {})
    mfus = [svd.get(v, {}).get("mfu") for v in ("eager", "compiled")]
    mfus = [m for m in mfus if m is not None]
    sampling = report.get("sampling", {})
    return {
        "svd_stage2_mfu_best": max(mfus) if mfus else None,
        "svd_stage2_mfu_target": TARGET_MFU,
        "meets_mfu_target": (max(mfus) >= TARGET_MFU) if mfus else None,
        "sampling_ratio_ours_over_stock": sampling.get("ratio_ours_over_stock"),
        "sampling_ratio_target": TARGET_SAMPLING_RATIO,
        "meets_sampling_target": sampling.get("meets_target"),
        "errors": errors(report),
    }


def errors(report: dict, prefix: str = "") -> list[str]:
    """Where the report holds an `error` (dotted paths)."""
    found = [prefix.rstrip(".")] if "error" in report else []
    for key, value in report.items():
        if isinstance(value, dict):
            found += errors(value, f"{prefix}{key}.")
    return found


def run_check(args: argparse.Namespace) -> dict:
    started = datetime.now(UTC)
    deadline = PROCESS_START + args.budget_s
    fell_back = not args.smoke and not torch.cuda.is_available()
    scale = SMOKE if args.smoke or fell_back else FULL
    device = torch.device("cpu" if scale.smoke else "cuda")
    if scale.smoke:
        # Tiny models gain nothing from threads, and on a shared CPU torch's OpenMP threads
        # spin against other processes: the same step then takes 100x longer.
        torch.set_num_threads(1)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    report: dict = {
        "check": "gpu-check",
        "smoke": scale.smoke,
        "started_utc": started.isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
    }
    if fell_back:
        report["fell_back_to_smoke"] = "no CUDA device: ran the --smoke sizes on the CPU"
    report["device"] = device_section(device, scale.smoke)
    peak = report["device"]["peak_bf16_dense_tflops"]
    with tempfile.TemporaryDirectory(prefix="vdm-gpu-check-") as tmp:
        parts = Parts(Path(tmp), scale.smoke)
        if "train_step" in sections:
            report["train_step"] = train_section(scale, parts, device, peak)
        i2v: dict[str, VideoDiffusion] = {}

        def model() -> VideoDiffusion:
            if "model" not in i2v:
                i2v["model"] = i2v_model(scale, parts)
            return i2v["model"]

        if "sampling" in sections:
            report["sampling"] = guarded("sampling", device, lambda: sampling_section(scale, parts, device, model()))
        if "serving" in sections:
            report["serving"] = guarded("serving", device, lambda: serving_section(scale, parts, device, model()))
        i2v.clear()
        free_memory(device)
        if "curation" in sections:
            report["curation"] = guarded("curation", device, lambda: curation_section(scale, parts, device))
        if "evaluation" in sections:
            report["evaluation"] = guarded("evaluation", device, lambda: evaluation_section(scale, device))
        if "train_step" in sections:
            compiled_section(report["train_step"], scale, parts, args, deadline, peak)
    report["summary"] = summary(report, peak)
    report["wall_s"] = round(now() - PROCESS_START, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU sizes (tiny models), about a minute")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON file is written")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the compiled steps run only within it")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled steps")
    parser.add_argument("--train-child", help=argparse.SUPPRESS)  # internal: one compiled step measurement
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        with stdout_to_stderr():
            result = train_child(args)
        print(json.dumps(result))
        return
    with stdout_to_stderr():
        report = run_check(args)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = args.results_dir / f"gpu-check{'-smoke' if report['smoke'] else ''}-{stamp}.json"
        report["results_file"] = str(path)
        path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if report["summary"]["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
