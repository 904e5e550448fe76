"""The x4 video upsampler (Video LDM): a latent diffusion upsampler conditioned on the
noise-augmented low-resolution clip, concatenated channel-wise to each noisy frame, with
the augmentation strength as micro-conditioning (model/upsampler.py says how).

Two steps, one kind. The image upsampler is this kind trained on images (`data: images`,
`strategy: full`): every frame an independent image, temporal branches off, so the spatial
layers and the augmentation-strength embedding learn and the temporal layers stay the
identity. The video upsampler is this kind trained on clips from it, the temporal layers
alone (`strategy: partial`, Video LDM's) or everything (`full`, the shipped configs, which
also start from any video model). Trained on patches (`patch`), applied to whole frames.
Its gate compares flicker, guarded by PSNR; served by `upscale` (an mp4 in, 4x out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.tasks.base import Evaluation, Metric, Task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class UpsamplerOptions:
    # Noise strength of the low-resolution clip while training: uniform in [0, noise_aug_max].
    noise_aug_max: float = 0.2
    # Side in pixels (high resolution) of the square patches training takes; None: whole frames.
    patch: int | None = None


PSNR = Metric("upscale_psnr", "maximize", "PSNR (dB) of held-out clips downscaled x4 and upsampled, to the clips")


class Upsampler(Task):
    name = "upsampler"
    title = "x4 video upsampler (Video LDM): 4x the resolution of a clip, frames consistent"
    description = (
        "x4 latent video upsampler (Video LDM): the noise-augmented low-resolution clip is concatenated to the "
        "noisy latents frame by frame, its noise strength is micro-conditioning; temporal layers make the frames "
        "agree. Trained on random patches, applied to whole frames. --init-from a video model or an upsampler "
        "(data: images trains the per-frame image upsampler; strategy: partial then its temporal layers)."
    )
    Options = UpsamplerOptions
    endpoint = "upscale"
    samples_from_data = True
    generation_fields = ("noise_aug_strength",)
    registered_name = "vdm-upsampler"
    # A new upsampler is judged against the registered one (first the image upsampler).
    starts_from = "vdm-upsampler"
    # The cascade (Video LDM): its finetune pipeline also upsamples this registered model's videos.
    cascade_base = "vdm-text-to-video"
    metric = Metric(
        "upscale_flicker",
        "minimize",
        "mean abs difference (8-bit levels) between the upsampled clips' frame-to-frame change and the truth's, "
        "on held-out clips downscaled x4; upscale_psnr guards the fidelity",
    )
    # Temporal consistency must not cost fidelity: at most 0.5 dB of PSNR below the champion's.
    guard = PSNR
    guard_tolerance = 0.5

    def check(self, config) -> None:
        from model.networks import CONFIGS
        from model.upsampler import LATENT_FACTOR, SCALE

        if config.data == "orbits":
            raise ValueError("orbit data trains the multi-view finetune only (stage: multiview)")
        if config.strategy not in ("full", "partial"):
            raise ValueError(f"the upsampler trains with strategy full or partial, not {config.strategy!r}")
        if config.data == "images" and config.strategy != "full":
            # The augmentation-strength embedding is among the layers the video UNet calls temporal.
            raise ValueError(
                "the image upsampler (data: images) trains with strategy full: the spatial layers and the "
                "noise-strength embedding learn, the temporal layers get no gradient from one-frame images"
            )
        step = LATENT_FACTOR * SCALE
        for side in ("height", "width"):
            if getattr(config.clip, side) % step:
                raise ValueError(f"clip.{side} must be a multiple of {step} (x4 of a frame on the latent grid)")
        # A patch's latents must also halve at every UNet level but the last (both are powers of 2).
        levels = len(CONFIGS[config.unet].block_out_channels) if config.unet in CONFIGS else 1
        patch_step = max(step, LATENT_FACTOR * 2 ** (levels - 1))
        patch = config.options.patch
        if patch is not None and (patch % patch_step or patch > min(config.clip.height, config.clip.width)):
            raise ValueError(f"patch must be a multiple of {patch_step} and fit the clip, not {patch}")
        if config.options.noise_aug_max < 0:
            raise ValueError("noise_aug_max must be >= 0")

    def input_channels(self, latent_channels: int) -> int:
        return latent_channels + 3  # noisy latents, low-resolution RGB frames on the latent grid

    def network_frame_size(self, config) -> tuple[int, int]:
        """The patch's, where it trains on patches."""
        patch = config.options.patch
        return (config.clip.height, config.clip.width) if patch is None else (patch, patch)

    def prepare_unet(self, unet, config, init_from):
        from model.networks import widen_input

        no_low_res_input = unet.config.in_channels != self.input_channels(unet.config.out_channels)
        if no_low_res_input and config.strategy == "partial" and init_from is not None:
            raise ValueError(
                "strategy partial trains the temporal layers of an image upsampler: --init-from an upsampler "
                "(trained with data: images), not a model without the low-resolution input"
            )
        return widen_input(unet, self.input_channels(unet.config.out_channels))

    def network(self, unet):
        from model.upsampler import UpsamplerNetwork

        return UpsamplerNetwork(unet)

    def training_inputs(self, model, batch, latents, generator):
        """The same random patch of the latents and of the x4-downscaled frames; the frames
        noise-augmented at a random strength that the micro-conditioning tells."""
        from model.upsampler import augmentation_strengths, augmented, check_codec, downscale, random_patches

        check_codec(model.codec)
        options = model.config.options
        low = downscale(batch["video"].to(latents.device))
        latents, low = random_patches(latents, low, options.patch, model.codec.downsampling, generator)
        strength = augmentation_strengths(latents.shape[0], options.noise_aug_max, generator)
        cond = model.text_condition(batch, generator)
        ids = cond["added"].clone()
        ids[:, 2] = strength
        return latents, cond | {"added": ids.to(latents.device), "low_res": augmented(low, strength, generator)}

    @dataclass(frozen=True)
    class Inputs:
        video: torch.Tensor = field(metadata={"media": "video"})  # (T, 3, h, w) in [-1, 1]: the low-resolution clip
        prompt: str = ""

    def sample(self, model, inputs, config, on_step=None):
        from model.upsampler import upscale

        return upscale(model, inputs.video, config, inputs.prompt, on_step)

    def inputs_of(self, clip):
        from model.upsampler import downscale

        return self.Inputs(video=downscale(clip["video"]))

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """Held-out clips downscaled x4 and upsampled back: flicker (the gate's figure) and PSNR
        (its guard) against the clips, and bicubic interpolation's for comparison."""
        from model.upsampler import evaluate_upscaling

        report = evaluate_upscaling(model, shards, clips=clips, steps=steps, prompts=prompts)
        metrics = {
            self.metric.name: report["flicker"],
            PSNR.name: report["psnr"],
            "bicubic_flicker": report["bicubic_flicker"],
            "bicubic_psnr": report["bicubic_psnr"],
        }
        details = {"clips": len(report["clips"]), "scale": 4}
        return Evaluation(metrics, details, report["samples"], report["clips"], report["prompts"])


TASKS = (Upsampler(),)
