"""One training loop for every stage. Readable top to bottom: build, maybe resume,
then step: batch -> loss -> optimisation step -> log -> checkpoint. Object storage,
MLflow and process launching stay outside (components/training): the loop only
calls `on_log(step, metrics)`, `on_checkpoint(folder, step)` and
`on_samples(step, videos)` (the config's sample prompts — for image-to-video, the
first frames of the first batch — generated with the EMA weights every
`sample_every` steps and at the end).

Distributed: under torchrun (RANK/WORLD_SIZE set) each rank reads its own shards
and the UNet is wrapped in DDP (gloo on the CPU, NCCL on GPUs), or, with
`parallel: fsdp`, sharded with FSDP2 (`fully_shard` per UNet block, then the root):
weights, gradients and optimizer state split across ranks, for `base` on GPUs
whose memory one replica would fill. Checkpoints are unsharded either way.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model.pipeline import GenerationConfig
from model.plan import PlanDoesNotFit, check_fits
from model.stages import StageConfig, VideoDiffusion
from model.training import (
    EMA,
    apply_strategy,
    fsdp_units,
    full_model_state,
    load_checkpoint,
    optimization_step,
    optimizer_and_schedule,
    save_checkpoint,
    seed_everything,
)

LogFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[Path, int], None]
SamplesFn = Callable[[int, list[torch.Tensor]], None]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # this run's steps (after any resume)
    final: Path | None = None  # rank 0's saved model
    model: VideoDiffusion | None = None  # the trained model (EMA weights), on every rank


def _distributed() -> tuple[int, int]:
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_distributed() -> None:
    """Ranks meet, then close the process group while the interpreter is still whole:
    gloo threads still alive at exit abort the process (a rank exiting 134 after success)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def _unwrapped(model: VideoDiffusion) -> Iterator[None]:
    """The denoiser on the bare UNet: one rank can sample without DDP's collectives."""
    network = model.denoiser.network
    wrapped, network.unet = network.unet, model.unet
    try:
        yield
    finally:
        network.unet = wrapped


def sample_videos(model: VideoDiffusion, ema: EMA, first_batch: dict) -> list[torch.Tensor]:
    """The kind's training samples (the config's prompts; image kinds animate the first
    batch's first frames), generated with the EMA weights; (T, 3, H, W) each."""
    config, task = model.config, model.task
    generation = GenerationConfig.for_clip(config.clip, steps=config.sample_steps, **task.generation_defaults(config))
    with ema.applied(), _unwrapped(model):
        videos = [
            task.sample(model, inputs, replace(generation, seed=i))
            for i, inputs in enumerate(task.training_samples(config, first_batch))
        ]
    model.train()
    return videos


def train(
    config: StageConfig,
    shards: list[str],
    workdir: Path,
    *,
    init_from: str | Path | None = None,
    resume: Path | None = None,
    on_log: LogFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    on_samples: SamplesFn | None = None,
) -> TrainResult:
    rank, world_size = _distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # fail fast, before anything is allocated: the run's memory plan must fit (model/plan.py)
        _check_plan(config, world_size, torch.cuda.get_device_properties(device).total_memory)
    seed_everything(config.seed)  # the same initial weights on every rank
    model = VideoDiffusion.create(config, init_from).to(device)
    apply_strategy(model.unet, config.strategy, model.task.adapter(config))
    sharded = world_size > 1 and config.parallel == "fsdp"
    if sharded:
        shard(model.unet)
    elif world_size > 1:
        model.denoiser.network.unet = torch.nn.parallel.DistributedDataParallel(model.unet)
    params = [p for p in model.unet.parameters() if p.requires_grad]  # after sharding: the shards
    optimizer, schedule = optimizer_and_schedule(params, config.optim)
    ema = EMA(params, config.optim.ema_decay)
    generator = torch.Generator()

    step, position = 0, 0
    if resume is not None:
        state = load_checkpoint(resume, model.unet, optimizer, schedule, ema)
        step, position = state["step"], state["data_position"]
    split = {"seed": config.seed, "rank": rank, "world_size": world_size, "start": position}
    dataset = model.task.dataset(config, shards, **split)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    result = TrainResult(steps=step)
    first_batch = None  # kinds that sample from data (image-to-video, known frames) use its clips
    sampled = bool(config.sample_every) and step % config.sample_every == 0
    model.train()
    clock = time.perf_counter()
    for batch in loader:
        if first_batch is None and model.task.samples_from_data:
            first_batch = batch  # the loop moves a new dict to the device; this one stays as loaded
        if step >= config.max_steps:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # Every random draw of this step follows from (seed, rank, step): a resumed run repeats them.
        generator.manual_seed(config.seed * 1_000_003 + rank * 10_007 + step)
        with autocast:
            loss = model.loss(batch, generator)
        grad_norm = optimization_step(loss, params, optimizer, schedule, ema, config.optim.grad_clip)
        step, position = step + 1, position + len(batch["key"])
        result.losses.append(loss.item())
        if on_log and rank == 0 and (step % config.log_every == 0 or step == config.max_steps):
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            on_log(
                step,
                {
                    "loss": loss.item(),
                    "grad_norm": grad_norm,
                    "lr": schedule.get_last_lr()[0],
                    "samples_per_s": config.log_every * config.batch_size * world_size / elapsed,
                    "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0,
                },
            )
        if (rank == 0 or sharded) and (step % config.checkpoint_every == 0 or step == config.max_steps):
            folder = save_checkpoint(
                workdir / f"checkpoint-{step:08d}" if rank == 0 else None,
                model.unet,
                optimizer,
                schedule,
                ema,
                {"step": step, "data_position": position, "stage": config.stage},
            )
            if on_checkpoint and folder:
                on_checkpoint(folder, step)
        sampled = bool(config.sample_every) and step % config.sample_every == 0
        if sampled:
            _samples(model, ema, rank, sharded, step, on_samples, first_batch)
    if not sampled:  # the end of the run, unless its last step just sampled
        _samples(model, ema, rank, sharded, step, on_samples, first_batch)
    result.steps = step
    ema.copy_to(params)  # ship the averaged weights
    result.model = model
    if sharded:
        weights = full_model_state(model.unet)  # every rank gathers; rank 0 saves
        if rank == 0:
            result.final = model.save(workdir / "final", unet=unsharded(model.unet, weights))
    elif rank == 0:
        result.final = model.save(workdir / "final")
    return result


def _check_plan(config: StageConfig, world_size: int, gpu_memory: int) -> None:
    """Refuse a run whose plan cannot fit (PlanDoesNotFit: the table); a plan that cannot be
    computed at all (a kind the counting does not know) warns and lets the run try."""
    try:
        check_fits(config, world_size, gpu_memory)
    except PlanDoesNotFit:
        raise
    except Exception as e:  # noqa: BLE001 (the check is advice; the run itself is the truth)
        warnings.warn(
            f"no memory plan for this run ({type(e).__name__}: {e}); training without the check", stacklevel=2
        )


def _samples(
    model: VideoDiffusion,
    ema: EMA,
    rank: int,
    sharded: bool,
    step: int,
    on_samples: SamplesFn | None,
    first_batch: dict,
):
    """Rank 0 generates (every rank under FSDP2: its forward passes are collectives)."""
    if on_samples and (rank == 0 or sharded):
        videos = sample_videos(model, ema, first_batch)
        if rank == 0:
            on_samples(step, videos)


def shard(unet: torch.nn.Module) -> None:
    """FSDP2: each block gathers its weights just before it runs and frees them after."""
    from torch.distributed.fsdp import fully_shard

    for block in fsdp_units(unet):
        fully_shard(block)
    fully_shard(unet)


def unsharded(unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of a sharded UNet holding the gathered `weights`."""
    plain = type(unet).from_config(unet.config)  # FSDP2's class constructs the original class
    plain.load_state_dict(weights)
    return plain
