"""Long-video prediction (Video LDM): 0, 1 or 2 leading frames of a clip are known; the
model continues them. `predict` generates a long video chunk by chunk, each chunk
knowing the last 2 frames of the one before."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.tasks.base import Evaluation, Metric
from model.tasks.known_frames import KnownFramesTask

if TYPE_CHECKING:
    import torch


class Prediction(KnownFramesTask):
    name = "prediction"
    title = "long-video prediction (Video LDM): continues 0, 1 or 2 context frames"
    description = (
        "Long-video prediction (Video LDM): the video UNet also takes 0, 1 or 2 leading context frames' latents "
        "and their mask, and learns to continue them; long videos are generated chunk by chunk. --init-from a "
        "trained video model."
    )
    endpoint = "extend"
    registered_name = "vdm-prediction"
    metric = Metric(
        "prediction_velocity_error",
        "minimize",
        "mean error (px/frame) of the continued object's velocity against the clip's",
    )

    def check(self, config) -> None:
        from model.masked import MAX_CONTEXT

        super().check(config)
        if config.clip.num_frames <= MAX_CONTEXT:
            raise ValueError(
                f"prediction trains on clips longer than its {MAX_CONTEXT} context frames, not {config.clip.num_frames}"
            )

    def known_mask(self, batch, num_frames, generator):
        from model.masked import prediction_mask

        return prediction_mask(batch, num_frames, generator)

    @dataclass(frozen=True)
    class Inputs:
        # (C, 3, H, W) in [-1, 1], C >= 0: the context (its last 2 frames are used)
        frames: torch.Tensor = field(metadata={"media": "video"})
        prompt: str = ""
        # The length of the video to make, the context's frames included (None: two chunks).
        video_frames: int | None = None

    def inputs_of(self, clip):
        from model.masked import MAX_CONTEXT

        video = clip["video"]
        return self.Inputs(frames=video[:MAX_CONTEXT], prompt=clip.get("caption", ""), video_frames=len(video))

    def sample(self, model, inputs, config, on_step=None):
        from model.masked import predict

        length = inputs.video_frames if inputs.video_frames is not None else 2 * config.num_frames
        return predict(model, inputs.frames, length, config, inputs.prompt, on_step)

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """The held-out clips' first 2 frames continued to the clip's length, the continued
        object's velocity against the clip's (model/masked_evaluation.py: `evaluate_prediction`)."""
        from model.masked_evaluation import evaluate_prediction

        report = evaluate_prediction(model, shards, clips=clips, steps=steps)
        metrics = {
            self.metric.name: report["velocity_error"],
            "prediction_next_position_error_px": report["next_position_error_px"],
        }
        details = {"context_frames": report["context"], "still_velocity_error": report["still_velocity_error"]}
        return Evaluation(metrics, details, report["samples"], report["clips"])


TASKS = (Prediction(),)
