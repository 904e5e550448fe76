"""Multi-view (SVD-MV): image-to-video finetuned on orbits around objects, told the
camera elevation (degrees) in the motion bucket's place. Given one view and its
elevation it generates a full turn around the object (`orbit`). Data: orbit shards
whose JSON carries `elevation` and `azimuths` (`vdm data orbits` writes synthetic ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.tasks.base import Evaluation, Metric
from model.tasks.image_to_video import ImageToVideo

if TYPE_CHECKING:
    import torch


class MultiView(ImageToVideo):
    name = "multiview"
    title = "multi-view (SVD-MV): an orbit around the object of a view, given its camera elevation"
    description = (
        "Multi-view (SVD-MV): image-to-video finetuned on orbits (shards whose JSON has the camera `elevation`, "
        "e.g. `vdm data orbits`); generates a turn around the object in a view, given the view's "
        "elevation (in SVD's motion-bucket slot). --init-from an image-to-video model, an SVD folder or a "
        "video model (widened first)."
    )
    endpoint = "multiview"
    starts_from = "vdm-image-to-video"
    training_data = evaluation_data = "s3://vdm/orbits/"
    registered_name = "vdm-multiview"
    metric = Metric(
        "view_retrieval",
        "maximize",
        "share of generated views whose nearest true view (over the orbit) is the one at their azimuth",
    )

    def check(self, config) -> None:
        if config.data != "orbits":
            raise ValueError("multi-view trains on orbits (data: orbits)")

    def time_ids(self, fps, noise_strength, batch):
        from model.conditioning import camera_time_ids

        elevation = batch.get("elevation")
        if elevation is None:
            raise ValueError("a multi-view model is conditioned on the camera elevation: give one")
        return camera_time_ids(fps, elevation, noise_strength)

    def dataset(self, config, shards, **split):
        from model.multiview import OrbitDataset

        return OrbitDataset(shards, config.clip, **split)

    @dataclass(frozen=True)
    class Inputs:
        image: torch.Tensor = field(metadata={"media": "image"})  # (3, H, W) in [-1, 1]: one view of the object
        elevation: float  # the camera elevation it was taken from, degrees

    def inputs_of(self, clip):
        return self.Inputs(image=clip["video"][0], elevation=float(clip["elevation"]))

    def sample(self, model, inputs, config, on_step=None):
        from model.multiview import orbit

        return orbit(model, inputs.image, inputs.elevation, config, on_step)

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """Held-out orbits' first views turned into orbits at their elevation, each generated
        view retrieved among the orbit's true views (model/multiview.py: `evaluate_orbits`)."""
        from model.multiview import evaluate_orbits

        report = evaluate_orbits(model, shards, clips=clips, steps=steps)
        metrics = {
            self.metric.name: report["view_retrieval"],
            "view_turn_margin": report["turn_margin"],
            "view_novel_l1": report["novel_l1"],
            "view_novel_psnr_db": report["psnr_db"]["novel_views"],
        }
        keys = ("chance", "per_view", "first_view_repeated", "psnr_db", "elevations")
        return Evaluation(metrics, {k: report[k] for k in keys}, report["samples"])


TASKS = (MultiView(),)
