"""Camera-motion LoRA (SVD): LoRA adapters in the temporal attention of a frozen video
model, one per motion class, each trained on the clips curation labelled with that
class's camera motions. A model folder holds the base UNet and every adapter apart
(model/camera_lora.py); sampling picks one by name and strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.camera_lora import MOTION_CLASSES, labels_of
from model.tasks.base import Evaluation, Metric
from model.tasks.text_to_video import TextToVideo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CameraLoraOptions:
    motion_class: str | None = None  # the class this run's adapter learns (`--motion-class`)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # While training, this share of the clips get a motion score drawn uniformly in
    # [0, motion_jitter_max] instead of theirs. The base already reads the class from the
    # score where the score tells it (a pan's is high, a held camera's 0), so an adapter
    # trained only at its class's score learns little of its own and does not move the
    # camera at another score (the default request's).
    motion_jitter: float = 0.0
    motion_jitter_max: float = 3.0

    def __post_init__(self):
        if self.motion_class is not None:
            labels_of(self.motion_class)  # a known class, or a clear error
        if not 0.0 <= self.motion_jitter <= 1.0 or self.motion_jitter_max < 0:
            raise ValueError("motion_jitter is a share of the clips (0 to 1), motion_jitter_max a score (>= 0)")


class CameraLora(TextToVideo):
    name = "camera-lora"
    title = "camera-motion LoRA: one adapter per motion class, added to the model's others"
    description = (
        "Camera-motion LoRA: a LoRA adapter in the temporal attention of the frozen model, trained on the clips "
        "curation labelled with the motion class's camera motion (pan: pan_left/pan_right, zoom_in, zoom_out, "
        "static). The result is the base model with its adapters (<final>/adapters/<class>/): --init-from a result "
        "to add another class; sample with an adapter by name and strength (`camera_motion`, "
        "`camera_motion_strength` in serving)."
    )
    finetune = True
    Options = CameraLoraOptions
    run_options = {"motion_class": "The camera motion this adapter learns."}
    registered_name = "vdm-camera-lora"
    metric = Metric(
        "camera_class_accuracy",
        "maximize",
        "share of videos sampled with each adapter whose estimated camera motion is the adapter's class",
    )

    def option_choices(self, option):
        return sorted(MOTION_CLASSES) if option == "motion_class" else None

    def check(self, config) -> None:
        if config.strategy != "lora":
            raise ValueError("a camera-motion LoRA trains LoRA adapters only (strategy: lora)")
        if config.data not in ("clips", "latents"):
            raise ValueError("a camera-motion LoRA trains on curated clips")

    def prepare_unet(self, unet, config, init_from):
        """The adapters `init_from` already has, and the config's class: its saved adapter
        (a finetune continues it, a loaded model samples it) or a new one."""
        from model import camera_lora

        options = config.options
        if options.motion_class is None:
            raise ValueError(f"a camera-motion LoRA learns one motion class: give one of {sorted(MOTION_CLASSES)}")
        loaded = camera_lora.load_adapters(unet, init_from) if init_from is not None else []
        if options.motion_class not in loaded:
            camera_lora.add_adapter(unet, options.motion_class, options.lora_rank, options.lora_alpha)
        camera_lora.use_adapter(unet, options.motion_class)
        return unet

    def adapter(self, config):
        return config.options.motion_class

    def dataset(self, config, shards, **split):
        from model.data import ClipDataset

        return ClipDataset(shards, config.clip, camera_motion=labels_of(config.options.motion_class), **split)

    def condition(self, model, batch, generator):
        return model.text_condition(batch | {"motion": self.training_motion(model, batch, generator)}, generator)

    @staticmethod
    def training_motion(model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The clips' motion scores, `motion_jitter` of them redrawn while training."""
        import torch

        from model.conditioning import dropped

        options = model.config.options
        motion = batch["motion"]
        if not (model.training and options.motion_jitter):
            return motion
        redraw = dropped(len(motion), options.motion_jitter, generator)  # the clips that lose theirs
        drawn = torch.rand(motion.shape, generator=generator) * options.motion_jitter_max
        return torch.where(redraw.to(motion.device), drawn.to(motion.device), motion.float())

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """Videos sampled with each adapter at its class's motion score in the held-out camera
        clips, read as a camera-motion class; the base model beside it (model/camera_motion.py:
        `evaluate_adapters`)."""
        from model.camera_motion import evaluate_adapters

        report = evaluate_adapters(model, shards, clips=clips, steps=steps)
        metrics = {
            self.metric.name: report["accuracy"],
            "camera_class_accuracy_base": report["base"]["accuracy"],
            **{f"camera_class_accuracy_{name}": share for name, share in report["per_class"].items()},
        }
        details = {k: report[k] for k in ("per_class", "classes", "abs_pan_px_per_frame", "abs_zoom_px_per_frame")}
        details |= {"settings": report["settings"], "base": report["base"]}
        return Evaluation(metrics, details, report["samples"])


TASKS = (CameraLora(),)
