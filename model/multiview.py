"""Multi-view (SVD-MV): an image-to-video model finetuned on orbits around objects,
conditioned on the camera elevation. Given one view and the elevation it was taken
from, it generates the views of a full turn around the object (`num_frames` azimuths
evenly over 360 degrees, starting at the given view).

The model is the image-to-video one, only told the elevation in degrees where SVD's
micro-conditioning has the motion bucket (`model.tasks.multiview`): an orbit's motion is always one turn, and the
same slot exported to `StableVideoDiffusionPipeline` is its `motion_bucket_id`.
Training data (`data: orbits`): shards whose JSON carries `elevation` (degrees) and
`azimuths` (components/sample_data/orbits.py writes synthetic ones).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import torch

from model.data import ClipDataset
from model.pipeline import GenerationConfig, animate
from model.samplers import StepCallback
from model.stages import VideoDiffusion


class OrbitDataset(ClipDataset):
    """Orbit shards as whole turns: `spec.num_frames` views evenly spaced over each orbit's
    frames (all of them when the counts agree), with the orbit's `elevation`."""

    def _plan(self, epoch: int, raw: dict) -> tuple[dict, list[int], random.Random] | None:
        meta = json.loads(raw["json"])
        if "elevation" not in meta:
            raise ValueError(f"{raw['__key__']} is not an orbit: its metadata has no camera elevation")
        views = meta["end_frame"] - meta["start_frame"]
        if views % self.spec.num_frames:
            raise ValueError(
                f"{raw['__key__']}: {views} views do not subsample evenly to {self.spec.num_frames} over the turn"
            )
        stride = views // self.spec.num_frames
        return meta, list(range(0, views, stride)), random.Random(f"{self.seed}:{epoch}:{raw['__key__']}")

    def _decode(self, raw: dict, meta: dict, indices: list[int], rng: random.Random) -> dict:
        return super()._decode(raw, meta, indices, rng) | {"elevation": torch.tensor(float(meta["elevation"]))}


@torch.no_grad()
def orbit(
    model: VideoDiffusion,
    image: torch.Tensor,
    elevation: float,
    config: GenerationConfig,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """(T, 3, H, W) views in [-1, 1] of a turn around the object in `image` ((3, h, w) in
    [-1, 1], taken from `elevation` degrees), from the image's azimuth on."""
    if model.task.name != "multiview":
        raise ValueError(f"this is a {model.task.name!r} model; orbits come from a multi-view model")
    return animate(model, image, replace(config, elevation=float(elevation)), on_step)


def orbit_psnr(generated: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """PSNR (dB) of each generated view against the true render at the same azimuth,
    frames (T, 3, H, W) in [-1, 1]."""
    mse = (generated.float() - truth.float()).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return (10 * torch.log10(4 / mse)).tolist()


def orbit_l1(generated: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Mean absolute error of each view, in [-1, 1] units."""
    return (generated.float() - truth.float()).abs().flatten(1).mean(1).tolist()


def summarize_views(values: list[list[float]]) -> dict[str, float | list[float]]:
    """Mean over orbits and views, and per view (view 0 is the conditioning image's)."""
    per_view = np.asarray(values).mean(axis=0)
    return {"mean": float(per_view.mean()), "novel_views": float(per_view[1:].mean()), "per_view": per_view.tolist()}
