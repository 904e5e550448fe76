"""Image-to-video (SVD): a video model that animates a conditioning frame.

The UNet takes the noisy frames with the conditioning frame's noise-augmented latent
concatenated channel-wise (its input widened from a text-to-video model's, or loaded
from a `StableVideoDiffusionPipeline` folder); it attends to the frame's CLIP
embedding instead of text. Training draws the augmentation strength per clip,
ln(strength) ~ N(noise_aug_mean, noise_aug_std) (about 0.05, as SVD), and tells the
model (micro-conditioning). Generated from an image (`animate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.tasks.base import Task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageToVideoOptions:
    noise_aug_mean: float = -3.0
    noise_aug_std: float = 0.5


class ImageToVideo(Task):
    name = "i2v"
    title = "image-to-video (SVD): animates a conditioning frame"
    description = (
        "Image-to-video (SVD): the conditioning frame's CLIP embedding replaces the text, its noise-augmented "
        "latent is concatenated to every frame. --init-from a trained video model or a StableVideoDiffusionPipeline "
        "folder; the result is also written in that pipeline's format (<output>/svd)."
    )
    conditioning = "image"
    Options = ImageToVideoOptions
    endpoint = "image_to_video"
    samples_from_data = True
    generation_fields = ("noise_aug_strength",)
    registered_name = "vdm-image-to-video"

    def check(self, config) -> None:
        super().check(config)
        if config.data != "clips":
            raise ValueError("image-to-video trains a video model on clips (it needs each clip's first frame)")

    def input_channels(self, latent_channels: int) -> int:
        return 2 * latent_channels  # noisy latents, conditioning frame's latent

    def prepare_unet(self, unet, config, init_from):
        from model.networks import widen_input

        return widen_input(unet, self.input_channels(unet.config.out_channels))

    def network(self, unet):
        from model.networks import ImageToVideoNetwork

        return ImageToVideoNetwork(unet)

    def time_ids(self, fps: torch.Tensor, noise_strength: torch.Tensor, batch: dict) -> torch.Tensor:
        """SVD's micro-conditioning (B, 3): fps, motion bucket, noise strength."""
        from model.conditioning import added_time_ids

        return added_time_ids(fps, batch.get("motion"), noise_strength)

    def condition(self, model, batch, generator):
        """The clip's first frame, noise-augmented at a random strength that the model is told
        (micro-conditioning); dropped samples get zeros for both embedding and latent, the
        unconditional input of SVD's guidance."""
        import torch

        from model.conditioning import dropped, per_sample
        from model.diffusion import lognormal_sigmas

        options = model.config.options
        frames = batch["video"][:, 0]
        strength = lognormal_sigmas(
            frames.shape[0], options.noise_aug_mean, options.noise_aug_std, generator=generator
        ).to(frames.device)
        cond = model.image_condition(frames, strength, generator)
        drop = dropped(frames.shape[0], model.config.cond_dropout if model.training else 0.0, generator)
        cond = {k: torch.where(per_sample(drop, v), torch.zeros_like(v), v) for k, v in cond.items()}
        return cond | {"added": self.time_ids(batch["fps"], strength, batch)}

    @dataclass(frozen=True)
    class Inputs:
        image: torch.Tensor = field(metadata={"media": "image"})  # (3, H, W) in [-1, 1], fitted to the video's size

    def sample(self, model, inputs, config, on_step=None):
        from model.pipeline import animate

        return animate(model, inputs.image, config, on_step)

    def inputs_of(self, clip):
        return self.Inputs(image=clip["video"][0])


TASKS = (ImageToVideo(),)
