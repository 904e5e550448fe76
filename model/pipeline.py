"""Text-to-video (and text-to-image for Stage I) generation: one readable call.

prompt -> text tokens (and the empty prompt's, for guidance) -> noise at sigma_max ->
sampler over a Karras schedule with classifier-free guidance (optionally rising
across frames) -> VAE decode -> frames in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.conditioning import added_time_ids
from model.samplers import SAMPLERS, StepCallback, frame_guidance, guided, karras_sigmas
from model.stages import VideoDiffusion


@dataclass(frozen=True)
class GenerationConfig:
    num_frames: int = 8
    height: int = 32
    width: int = 32
    fps: float = 8.0
    motion: float = 1.0  # curation's motion score to ask for
    steps: int = 25
    sampler: str = "heun"
    guidance_min: float = 1.0
    guidance_max: float = 3.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    seed: int = 0


@torch.no_grad()
def generate(
    model: VideoDiffusion,
    prompt: str,
    config: GenerationConfig,
    negative_prompt: str = "",
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """(T, 3, H, W) frames in [-1, 1]; Stage I models give T independent images.
    `on_step(i)` is called after each sampler step."""
    model.eval()
    device = next(model.unet.parameters()).device
    factor = model.codec.downsampling
    latent_channels = model.codec.vae.config.latent_channels
    text = model.text([prompt]).to(device)
    negative = model.text([negative_prompt]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max).to(device)
    shape = (1, config.num_frames, latent_channels, config.height // factor, config.width // factor)
    noise = torch.randn(shape, generator=generator).to(device) * sigmas[0]

    if model.config.video:
        ids = added_time_ids(torch.tensor([config.fps]), torch.tensor([config.motion]), torch.zeros(1)).to(device)
        scale = frame_guidance(config.num_frames, config.guidance_min, config.guidance_max).to(device)

        def with_text(embedding: torch.Tensor):
            return lambda x, sigma: model.denoiser(x, sigma, text=embedding, added=ids)

        x = noise
    else:  # frames as a batch of images; guidance is one number
        scale = config.guidance_max
        frames = config.num_frames

        def with_text(embedding: torch.Tensor):
            return lambda x, sigma: model.denoiser(x, sigma, text=embedding.expand(frames, -1, -1))

        x = noise[0]
    denoise = guided(with_text(text), with_text(negative), scale)
    latents = SAMPLERS[config.sampler](denoise, x, sigmas, on_step)
    if not model.config.video:
        latents = latents[None]
    return model.codec.decode(latents)[0]


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8, for writing video."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
