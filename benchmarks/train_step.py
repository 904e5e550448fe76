"""Training-step speed per model config: samples/s, the step split into forward /
backward / optimizer (data is measured on its own, as the loader's throughput),
peak memory (on the CPU: the process's peak RSS so far), FLOPs per step (torch.utils.flop_counter)
and achieved TFLOP/s (plus MFU on a GPU with a known peak), each for the tuned
setting against a naive baseline (fp32, no compile, no checkpointing) measured in
the same run; the tuned step on cached latents (`vdm cache-latents`: no VAE encode);
and the data loader's samples/s against what a step consumes. The VAE here is the
tiny one for every config (a real SD VAE costs far more per step at `base` sizes).

Tuned: bf16 autocast, gradient checkpointing for `base`, torch.compile of the UNet
(GPU only: on the CPU the compile costs more than a short run saves). Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from components.sample_data.shards import write_shapes_shards
from model.data import ClipDataset, ClipSpec
from model.latents import vae_fingerprint
from model.stages import StageConfig, VideoDiffusion
from model.training import apply_strategy, optimizer_and_schedule

# Dense bf16 peak per GPU, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SIZES = {"tiny": (8, 32), "small": (8, 64), "base": (14, 320)}  # frames, side (SVD: 14 frames, 320x576)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(config: StageConfig, batches: list[dict], device: torch.device, tuned: bool, steps: int) -> dict:
    torch.manual_seed(0)
    model = VideoDiffusion.create(config).to(device)
    if tuned and config.unet == "base":
        model.unet.enable_gradient_checkpointing()
    if tuned and device.type == "cuda":
        model.denoiser.network.unet = torch.compile(model.unet)
    params = apply_strategy(model.unet, "full")
    optimizer, schedule = optimizer_and_schedule(params, config.optim)
    generator = torch.Generator()
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=tuned)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    split = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    flops = 0
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + 2)):
        generator.manual_seed(i)
        counting = FlopCounterMode(display=False) if i == 1 else None
        with counting if counting is not None else contextlib.nullcontext():
            sync()
            t0 = time.perf_counter()
            with autocast:
                loss = model.loss(batch, generator)
            sync()
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        schedule.step()
        sync()
        t3 = time.perf_counter()
        if counting is not None:
            flops = counting.get_total_flops()
        if i >= 2:  # the first steps warm up (allocations, compilation)
            split["forward"] += t1 - t0
            split["backward"] += t2 - t1
            split["optimizer"] += t3 - t2
    step_s = sum(split.values()) / steps
    report = {
        "samples_per_s": round(config.batch_size / step_s, 3),
        "step_ms": round(1000 * step_s, 2),
        "split_ms": {k: round(1000 * v / steps, 2) for k, v in split.items()},
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "flops_per_step": flops,
        "achieved_tflops": round(flops / step_s / 1e12, 4),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak:
        report["mfu"] = round(flops / step_s / 1e12 / peak, 4)
    return report


@torch.no_grad()
def cached_latents(config: StageConfig, batches: list[dict], device: torch.device) -> list[dict]:
    """The batches as `vdm cache-latents` stores them: the VAE posterior instead of frames."""
    codec = VideoDiffusion.create(config).codec.to(device)
    fingerprint = vae_fingerprint(codec)
    out = []
    for batch in batches:
        video = batch["video"]
        posterior = codec.vae.encode(video.flatten(0, 1)).latent_dist
        rest = {k: v for k, v in batch.items() if k != "video"}
        out.append(
            rest
            | {
                "latent_mean": posterior.mean.unflatten(0, video.shape[:2]),
                "latent_std": posterior.std.unflatten(0, video.shape[:2]),
                "vae": [fingerprint] * video.shape[0],
            }
        )
    return out


def loader_rate(shards: list[str], spec: ClipSpec, batch_size: int, workers: int, batches: int = 10) -> float:
    loader = DataLoader(ClipDataset(shards, spec), batch_size=batch_size, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch_size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small, base")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            frames, side = SIZES[name]
            spec = ClipSpec(num_frames=frames, fps=8.0, height=side, width=side)
            paths, _ = write_shapes_shards(
                Path(tmp) / name, shards=2, clips_per_shard=4, num_frames=frames * 3, height=side, width=side
            )
            shards = [str(p) for p in paths]
            config = StageConfig(
                stage="video", unet=name, clip=spec, batch_size=args.batch_size, allow_random_weights=True
            )
            loader = DataLoader(ClipDataset(shards, spec), batch_size=args.batch_size)
            batches = [
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in itertools.islice(loader, 2)
            ]
            naive = measure(config, batches, device, tuned=False, steps=args.steps)
            tuned = measure(config, batches, device, tuned=True, steps=args.steps)
            cached = measure(config, cached_latents(config, batches, device), device, tuned=True, steps=args.steps)
            data_rate = loader_rate(shards, spec, args.batch_size, args.workers)
            results[name] = {
                "frames": frames,
                "size": side,
                "batch_size": args.batch_size,
                "naive": naive,
                "tuned": tuned,
                "speedup": round(naive["step_ms"] / tuned["step_ms"], 3),
                "tuned_cached_latents": cached,
                "cached_latents_speedup": round(tuned["step_ms"] / cached["step_ms"], 3),
                "loader_samples_per_s": round(data_rate, 2),
                "loader_over_consumption": round(data_rate / tuned["samples_per_s"], 2),
            }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"benchmark": "train_step", "device": device_name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
