"""Frame interpolation (Video LDM, x4): every 4th frame of a clip is known (the key
frames); the model fills the three between each pair. `interpolate` turns T frames into
4T - 3 at 4x the frame rate (twice: 16T - 15)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.tasks.base import Evaluation, Metric
from model.tasks.known_frames import KnownFramesTask

if TYPE_CHECKING:
    import torch


class Interpolation(KnownFramesTask):
    name = "interpolation"
    title = "frame interpolation (Video LDM): three frames between each pair of key frames"
    description = (
        "Frame interpolation (Video LDM, x4): the video UNet also takes the key frames' latents (every 4th frame) "
        "and their mask, concatenated channel-wise, and learns the three frames between each pair. --init-from a "
        "trained video model."
    )
    endpoint = "interpolate"
    registered_name = "vdm-interpolation"
    metric = Metric(
        "interpolation_position_error",
        "minimize",
        "mean |fraction - j/4| of the in-between objects' positions between the keys' (0 is exact)",
    )

    def check(self, config) -> None:
        from model.masked import KEY_EVERY

        super().check(config)
        frames = config.clip.num_frames
        if frames < KEY_EVERY + 1 or (frames - 1) % KEY_EVERY:
            raise ValueError(f"interpolation trains on clips of 4k + 1 frames (keys every {KEY_EVERY}), not {frames}")

    def known_mask(self, batch, num_frames, generator):
        from model.masked import interpolation_mask

        return interpolation_mask(batch, num_frames)

    @dataclass(frozen=True)
    class Inputs:
        frames: torch.Tensor = field(metadata={"media": "video"})  # (T, 3, H, W) in [-1, 1], T >= 2: the keys
        prompt: str = ""

    def inputs_of(self, clip):
        from model.masked import KEY_EVERY

        return self.Inputs(frames=clip["video"][::KEY_EVERY], prompt=clip.get("caption", ""))

    def sample(self, model, inputs, config, on_step=None):
        from model.masked import interpolate

        return interpolate(model, inputs.frames, config, inputs.prompt, on_step)

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """The held-out clips' keys (every 4th frame) interpolated, the in-between objects'
        positions against the keys' (model/masked_evaluation.py: `evaluate_interpolation`)."""
        from model.masked_evaluation import evaluate_interpolation

        report = evaluate_interpolation(model, shards, clips=clips, steps=steps)
        metrics = {
            self.metric.name: report["fraction_error"],
            "interpolation_position_error_px": report["position_error_px"],
        }
        details = {"measured_clips": report["measured_clips"], "data": report["data"]}
        return Evaluation(metrics, details, report["samples"], report["clips"])


TASKS = (Interpolation(),)
