"""One training loop for every stage. Readable top to bottom: build, maybe resume,
then step: batch -> loss -> optimisation step -> log -> checkpoint. Object storage,
MLflow and process launching stay outside (components/training): the loop only
calls `on_log(step, metrics)`, `on_checkpoint(folder, step)` and
`on_samples(step, videos)` (the config's sample prompts — for image-to-video, the
first frames of the validation clips — generated with the EMA weights every
`sample_every` steps and at the end).

Validation loss: the training loss draws a noise level per clip, so its curve is mostly
noise-level noise (on the tiny stages it does not visibly fall). `val_loss` is the loss
on fixed clips at fixed noise levels with fixed noise, so two values differ only by the
weights: measured at the start, every `validate_every` steps and at the end, with the
EMA weights (the ones that ship and sample). Its clips are held out: `validation_clips`
clips spread over the shards (`validation_batch`), which the loop then never trains on.

Distributed: under torchrun (RANK/WORLD_SIZE set) each rank reads its own shards
and the UNet is wrapped in DDP (gloo on the CPU, NCCL on GPUs), or, with
`parallel: fsdp`, sharded with FSDP2 (`fully_shard` per UNet block, then the root):
weights, gradients and optimizer state split across ranks, for `base` on GPUs
whose memory one replica would fill. Checkpoints are unsharded either way.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, default_collate

from model.networks import unet_from_config
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


# The validation loss's noise levels: ln(sigma) at these many standard deviations from the
# training distribution's mean, so they span the levels training draws.
VALIDATION_LEVELS = (-2.0, -1.0, 0.0, 1.0, 2.0)
VALIDATION_SEED = 1_000_000_007  # the noise seed of level k is this + k, whatever the config's seed


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # this run's steps (after any resume)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> val_loss (rank 0; empty: no validation)
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
    reshard(model.unet)
    return videos


def reshard(unet: torch.nn.Module) -> None:
    """Free FSDP2's gathered weights (nothing to do without FSDP2). After a forward, FSDP2
    keeps the root's gathered weights for the backward that follows; after forwards with
    none (validation, samples) they would still hold the EMA weights in the next step."""
    from torch.distributed.fsdp import FSDPModule

    for module in unet.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
        step, positions = state["step"], state.get("data_positions")
        # Each rank's own position (ranks skip different numbers of held-out clips); on another world size, rank 0's.
        position = positions[rank] if positions and len(positions) == world_size else state["data_position"]
    validation = validation_batch(config, shards)
    held_out = frozenset(validation["key"]) if validation is not None else frozenset()
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
    # Kinds that sample from data (image-to-video, known frames) use these clips: held out, when there are some.
    first_batch = validation

    def validate() -> None:
        """Rank 0 measures (every rank under FSDP2: its forward passes are collectives) and logs."""
        if validation is not None and (rank == 0 or sharded):
            figures = validation_loss(model, ema, validation, device, autocast)
            if rank == 0:
                result.val_losses[step] = figures["val_loss"]
                if on_log:
                    on_log(step, figures)

    validate()
    validated = True
    sampled = bool(config.sample_every) and step % config.sample_every == 0
    model.train()
    clock = time.perf_counter()
    for batch, consumed in training_batches(loader, held_out):
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
        step, position = step + 1, position + consumed
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
        checkpoint = step % config.checkpoint_every == 0 or step == config.max_steps
        positions = _every_rank(position, world_size, device) if checkpoint else []  # a collective: every rank
        if (rank == 0 or sharded) and checkpoint:
            folder = save_checkpoint(
                workdir / f"checkpoint-{step:08d}" if rank == 0 else None,
                model.unet,
                optimizer,
                schedule,
                ema,
                {"step": step, "data_position": position, "data_positions": positions, "stage": config.stage},
            )
            if on_checkpoint and folder:
                on_checkpoint(folder, step)
        validated = bool(config.validate_every) and step % config.validate_every == 0
        if validated:
            validate()
        sampled = bool(config.sample_every) and step % config.sample_every == 0
        if sampled:
            _samples(model, ema, rank, sharded, step, on_samples, first_batch)
    if not validated:  # the end of the run, unless its last step just measured
        validate()
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


def validation_batch(config: StageConfig, shards: list[str]) -> dict | None:
    """The validation clips (None: no validation): `validation_clips` of them, taken in turn
    from the shards in their given order, each shard's first in its seeded order, then its
    second, ...: spread over the shards, so no rank's shards are all held out, and the same
    on every rank, on any world size and in a resumed run. Data with no more clips than
    that keeps one to train on (and a single clip: no validation)."""
    if not config.validation_clips:
        return None
    streams = [iter(config.task.dataset(config, [shard], seed=config.seed)) for shard in shards]
    clips: dict[str, dict] = {}
    while streams and len(clips) <= config.validation_clips:  # one more: is any clip left to train on?
        for stream in list(streams):
            try:
                clip = next(stream)
            except ValueError:  # nothing usable in this shard (e.g. no clip of a camera-LoRA class)
                streams.remove(stream)
                continue
            if clip["key"] in clips:  # the shard's stream came round again: it has no other clip
                streams.remove(stream)
                continue
            clips[clip["key"]] = clip
            if len(clips) > config.validation_clips:
                break
    held_out = list(clips.values())[: min(config.validation_clips, len(clips) - 1)]
    if not held_out:
        warnings.warn("the data has a single usable clip: no validation loss (nothing to hold out)", stacklevel=2)
        return None
    return default_collate(held_out)


def validation_sigmas(config: StageConfig) -> list[float]:
    """The validation loss's noise levels, log-spaced over the training distribution's range."""
    return [math.exp(config.p_mean_at_resolution + z * config.p_std) for z in VALIDATION_LEVELS]


@torch.no_grad()
def validation_loss(
    model: VideoDiffusion,
    ema: EMA | None,
    batch: dict,
    device: torch.device,
    autocast: torch.autocast | None = None,
) -> dict[str, float]:
    """The loss on `batch` at each of `validation_sigmas`, with noise (and every other draw:
    latent sample, conditioning noise) from a fixed seed per level, with the EMA weights and
    without conditioning dropout: the same weights give the same figures.
    `val_loss` is their mean; `val_loss/sigma_<level>` each level's."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    generator = torch.Generator()
    figures = {}
    model.eval()
    with ema.applied() if ema is not None else contextlib.nullcontext(), _unwrapped(model):
        for k, sigma in enumerate(validation_sigmas(model.config)):
            generator.manual_seed(VALIDATION_SEED + k)
            with autocast or contextlib.nullcontext():
                figures[f"val_loss/sigma_{sigma:.3g}"] = model.loss(batch, generator, sigma=sigma).item()
    model.train()
    reshard(model.unet)
    return {"val_loss": sum(figures.values()) / len(figures), **figures}


def training_batches(loader: Iterable[dict], held_out: frozenset[str]) -> Iterator[tuple[dict, int]]:
    """The loader's batches without the held-out clips, refilled to the loader's batch size
    from the next batch; with each, how many clips the loader gave up to its last one
    (held-out ones included), which the data position counts so a resumed run continues
    where this one stopped."""
    size, waiting, consumed, skipped_in_a_row = loader.batch_size, [], 0, 0
    for batch in loader:
        keys = list(batch["key"])
        if not waiting and held_out.isdisjoint(keys):  # the usual case: the batch as loaded
            yield batch, consumed + len(keys)
            consumed, skipped_in_a_row = 0, 0
            continue
        for i, key in enumerate(keys):
            consumed += 1
            if key in held_out:
                skipped_in_a_row += 1
                # Each epoch shows every held-out clip once: more in a row means nothing else is left.
                if skipped_in_a_row > 2 * len(held_out):
                    raise ValueError(
                        "every clip this rank reads is held out for the validation loss: give more data "
                        "or set validation_clips: 0"
                    )
                continue
            skipped_in_a_row = 0
            waiting.append({k: v[i] for k, v in batch.items()})
            if len(waiting) == size:
                yield default_collate(waiting), consumed
                waiting, consumed = [], 0


def _every_rank(value: int, world_size: int, device: torch.device) -> list[int]:
    """`value` of every rank, in rank order (a collective under torchrun)."""
    if world_size == 1:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


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
    plain = unet_from_config(type(unet), unet.config)  # FSDP2's class constructs the original class
    plain.load_state_dict(weights)
    return plain
