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

import random
from dataclasses import replace

import numpy as np
import torch

from model.data import ClipDataset
from model.pipeline import GenerationConfig, animate
from model.records import ClipRecord, OrbitRecord
from model.samplers import StepCallback
from model.stages import VideoDiffusion


class OrbitDataset(ClipDataset):
    """Orbit shards as whole turns: `spec.num_frames` views evenly spaced over each orbit's
    frames (all of them when the counts agree), with the orbit's `elevation`."""

    def _plan(self, epoch: int, raw: dict) -> tuple[OrbitRecord, list[int], random.Random] | None:
        record = ClipRecord.from_json(raw["json"])  # an OrbitRecord when it has the camera's elevation
        if not isinstance(record, OrbitRecord):
            raise ValueError(f"{raw['__key__']} is not an orbit: its metadata has no camera elevation")
        views = record.frames
        if views % self.spec.num_frames:
            raise ValueError(
                f"{raw['__key__']}: {views} views do not subsample evenly to {self.spec.num_frames} over the turn"
            )
        stride = views // self.spec.num_frames
        return record, list(range(0, views, stride)), random.Random(f"{self.seed}:{epoch}:{raw['__key__']}")

    def _decode(self, raw: dict, record: OrbitRecord, indices: list[int], rng: random.Random) -> dict:
        return super()._decode(raw, record, indices, rng) | {"elevation": torch.tensor(float(record.elevation))}


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


def view_distances(generated: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(T, T): mean absolute difference of generated view i from true view j, views
    (T, 3, H, W) in [-1, 1] (on the orbits' black background, the objects' pixels)."""
    return (generated.float()[:, None] - truth.float()[None]).abs().flatten(2).mean(2)


def view_retrieval(generated: list[torch.Tensor], truth: list[torch.Tensor]) -> dict:
    """Whether generated orbits turn to the right views: for each novel view (1..T-1; view 0
    is the conditioning image) whether its nearest true view of the orbit is the one at its
    own azimuth. `view_retrieval`: the share that is (chance 1/T; the first view repeated
    scores 0, a model that does not turn cannot win it), `per_view` the share per view,
    `turn_margin` the mean of (L1 to true view 0 - L1 to the true view at its azimuth),
    above 0 when the views are nearer where they should be than where they started, and
    `novel_l1` the mean L1 of the novel views to their true views."""
    if len(generated) != len(truth) or not generated:
        raise ValueError(f"{len(generated)} generated orbits for {len(truth)} true ones")
    hits, margins, l1 = [], [], []
    for made, true in zip(generated, truth, strict=True):
        if made.shape != true.shape or len(true) < 2:
            raise ValueError(f"an orbit of {tuple(made.shape)} views against one of {tuple(true.shape)}")
        d = view_distances(made, true)
        hits.append((d.argmin(dim=1) == torch.arange(len(d))).float()[1:].numpy())
        margins.append((d[:, 0] - d.diagonal())[1:].numpy())
        l1.append(d.diagonal()[1:].numpy())
    per_view = np.mean(hits, axis=0)
    return {
        "view_retrieval": float(per_view.mean()),
        "per_view": per_view.tolist(),
        "chance": 1 / len(truth[0]),
        "turn_margin": float(np.mean(margins)),
        "novel_l1": float(np.mean(l1)),
    }


def evaluate_orbits(model: VideoDiffusion, shards: list[str], *, clips: int, steps: int) -> dict:
    """A multi-view model on the first `clips` held-out orbits of `shards` (`model.config.clip`
    views each): each orbit's first view turned into an orbit at the orbit's elevation (seed
    = its index) and compared view by view with the orbit (`view_retrieval`), beside the
    first view repeated (what a model that does not turn scores); `samples` are the orbits."""
    import itertools

    spec = model.config.clip
    items = list(itertools.islice(iter(OrbitDataset(shards, spec, random_crop=False, heldout=True)), clips))
    truth = [item["video"] for item in items]
    config = GenerationConfig.for_clip(spec, steps=steps)
    generated = [
        orbit(model, item["video"][0], float(item["elevation"]), replace(config, seed=i)).float().cpu()
        for i, item in enumerate(items)  # float32 on the CPU, where the metrics run
    ]
    still = view_retrieval([t[:1].expand_as(t) for t in truth], truth)
    return view_retrieval(generated, truth) | {
        "first_view_repeated": {k: still[k] for k in ("view_retrieval", "turn_margin", "novel_l1")},
        "psnr_db": summarize_views([orbit_psnr(g, t) for g, t in zip(generated, truth, strict=True)]),
        "elevations": [float(item["elevation"]) for item in items],
        "samples": generated,
    }
