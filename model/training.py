"""The pieces of the training loop that do not depend on the stage: which parameters
train (VideoCrafter2's strategies), AdamW with linear warmup, EMA weights, one
optimisation step with clipping, and checkpoints (safetensors weights + optimizer
+ position) that make a resumed run continue the same curve."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from model.camera_lora import is_adapter_weight
from model.networks import is_temporal

Strategy = Literal["full", "partial", "spatial", "lora"]


def fsdp_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's blocks, each sharded as one FSDP2 unit (the root holds the rest)."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def trainable(name: str, strategy: Strategy, adapter: str | None = None) -> bool:
    """`full`: every layer; `partial`: temporal layers only, spatial frozen (Video LDM);
    `spatial`: spatial layers only (VideoCrafter2's high-quality image finetune);
    `lora`: the LoRA matrices of `adapter` only (camera-motion LoRA), every base weight frozen."""
    if strategy == "full":
        return True
    if strategy == "lora":
        return adapter is not None and is_adapter_weight(name, adapter)
    return is_temporal(name) == (strategy == "partial")


def apply_strategy(model: torch.nn.Module, strategy: Strategy, adapter: str | None = None) -> list[torch.nn.Parameter]:
    """Freeze what the strategy does not train; returns the trainable parameters."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name, strategy, adapter))
        if param.requires_grad:
            params.append(param)
    return params


class EMA:
    """Exponential moving average of the trainable weights (the weights we sample with)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.999):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        for target, value in zip(params, self.shadow, strict=True):
            target.copy_(value)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place for the duration (to sample mid-training), then
        the training weights back."""
        with torch.no_grad():
            training = [p.detach().clone() for p in self.params]
            self.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, training, strict=True):
                    param.copy_(value)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999


def optimizer_and_schedule(
    params: list[torch.nn.Parameter], config: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = max(1, config.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, schedule


def optimization_step(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
    grad_clip: float,
) -> float:
    """Backward, clip, step, schedule, EMA; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    schedule.step()
    if ema is not None:
        ema.update()
    return float(full_tensor(norm))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- checkpoints ---------------------------------------------------------------------

WEIGHTS, EMA_WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights, also of an FSDP2 model (collective; under FSDP2 only rank 0 gets them)."""
    return get_model_state_dict(model, options=FULL)


def save_checkpoint(
    folder: Path | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
    state: dict,
) -> Path | None:
    """Everything a resumed run needs, in one folder (the caller publishes it atomically).
    `state` carries the step, the data position and anything else to restore. Weights
    and optimizer state are saved unsharded, so a run can resume on another world size
    or with DDP instead of FSDP2. Under FSDP2 every rank calls this (the gathers are
    collectives) and only the one given a `folder` writes."""
    weights = full_model_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    shadow = [full_tensor(t) for t in ema.shadow] if ema is not None else None
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, folder / WEIGHTS)
    if shadow is not None:
        save_file({str(i): t.contiguous() for i, t in enumerate(shadow)}, folder / EMA_WEIGHTS)
    torch.save(
        {"optimizer": optimizer_state, "schedule": schedule.state_dict(), "rng": _rng_state()},
        folder / OPTIMIZER,
    )
    (folder / STATE).write_text(json.dumps(state, indent=1))
    return folder


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
) -> dict:
    set_model_state_dict(model, load_file(folder / WEIGHTS), options=StateDictOptions(full_state_dict=True))
    if ema is not None:
        saved = load_file(folder / EMA_WEIGHTS)
        with torch.no_grad():
            for i, shadow in enumerate(ema.shadow):
                value = saved[str(i)].to(shadow.dtype)
                if isinstance(shadow, DTensor):  # this rank's shard of the saved full tensor
                    value = distribute_tensor(value.to(shadow.device), shadow.device_mesh, shadow.placements)
                shadow.copy_(value)
    # weights_only: tensors and plain values only, so a checkpoint from the bucket cannot run code.
    extra = torch.load(folder / OPTIMIZER, weights_only=True)
    set_optimizer_state_dict(model, optimizer, extra["optimizer"], options=StateDictOptions(full_state_dict=True))
    schedule.load_state_dict(extra["schedule"])
    _set_rng_state(extra["rng"])
    return json.loads((folder / STATE).read_text())


def _rng_state() -> dict:
    """The generators' states as tensors and plain values (what `weights_only` loads)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position}
    numpy_state |= {"has_gauss": has_gauss, "gauss": gauss}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["gauss"]))
    torch.set_rng_state(state["torch"])
