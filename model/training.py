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

from model.networks import is_temporal

Strategy = Literal["full", "partial", "spatial"]


def trainable(name: str, strategy: Strategy) -> bool:
    """`full`: every layer; `partial`: temporal layers only, spatial frozen (Video LDM);
    `spatial`: spatial layers only (VideoCrafter2's high-quality image finetune)."""
    if strategy == "full":
        return True
    return is_temporal(name) == (strategy == "partial")


def apply_strategy(model: torch.nn.Module, strategy: Strategy) -> list[torch.nn.Parameter]:
    """Freeze what the strategy does not train; returns the trainable parameters."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name, strategy))
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
    return float(norm)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- checkpoints ---------------------------------------------------------------------

WEIGHTS, EMA_WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
    state: dict,
) -> Path:
    """Everything a resumed run needs, in one folder (the caller publishes it atomically).
    `state` carries the step, the data position and anything else to restore."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    if ema is not None:
        save_file({str(i): t.contiguous() for i, t in enumerate(ema.shadow)}, folder / EMA_WEIGHTS)
    torch.save(
        {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": _rng_state()},
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
    model.load_state_dict(load_file(folder / WEIGHTS))
    if ema is not None:
        saved = load_file(folder / EMA_WEIGHTS)
        for i, shadow in enumerate(ema.shadow):
            shadow.copy_(saved[str(i)])
    extra = torch.load(folder / OPTIMIZER, weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    _set_rng_state(extra["rng"])
    return json.loads((folder / STATE).read_text())


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
