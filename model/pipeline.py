"""Generation, one readable call per task.

`generate` (text-to-video; text-to-image for Stage I): prompt -> text tokens (and the
empty prompt's, for guidance) -> noise at sigma_max -> sampler over a Karras schedule
with classifier-free guidance (optionally rising across frames) -> VAE decode ->
frames in [-1, 1].

`animate` (image-to-video, SVD): image -> CLIP embedding + latent of the
noise-augmented image (zeros for guidance) -> the same sampling, guidance rising
from the first frame (which should be the image) to the last -> frames in [-1, 1].
A multi-view model (SVD-MV) animates the same way, told the camera elevation
instead of a motion bucket: the frames are an orbit around the object
(`model.multiview.orbit`).

`generate_and_upscale` (the cascade): `generate` with a text-to-video model, then the x4
upsampler (model/upsampler.py) on its frames with the same prompt.

Every sampling call takes `on_step(i)`, called after each sampler step; an exception it
raises ends the sampling there and propagates to the caller (a way to cancel a
generation between two steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.camera_lora import use_adapter
from model.conditioning import added_time_ids
from model.data import ClipSpec, fit_frames
from model.samplers import SAMPLERS, StepCallback, batched_pair, frame_guidance, guided_pair, karras_sigmas
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

    @classmethod
    def for_clip(cls, clip: ClipSpec, **settings) -> GenerationConfig:
        """Settings for a model trained on `clip`: frames, size and fps left unset (None) are
        the clip's."""
        defaults = {"num_frames": clip.num_frames, "height": clip.height, "width": clip.width, "fps": clip.fps}
        return cls(**defaults | {k: v for k, v in settings.items() if v is not None or k not in defaults})

    noise_aug_strength: float = 0.02  # image-to-video: noise added to the conditioning image (SVD's default)
    adapter: str | None = None  # camera-motion LoRA: the adapter to sample with (None: the base model)
    adapter_strength: float = 1.0  # its LoRA update's multiplier (1: as trained)
    elevation: float | None = None  # multi-view: the camera elevation in degrees (`orbit`)
    # Interpolation and prediction: classifier-free guidance on the known frames (1: none).
    context_guidance: float = 1.0


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
    if model.text is None:
        raise ValueError("this is an image-to-video model: it animates an image (animate), it takes no prompt")
    model.eval()
    use_adapter(model.unet, config.adapter, config.adapter_strength)
    device = next(model.unet.parameters()).device
    factor = model.codec.downsampling
    latent_channels = model.codec.vae.config.latent_channels
    text = model.text([prompt]).to(device)
    negative = model.text([negative_prompt]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max).to(device)
    shape = (1, config.num_frames, latent_channels, config.height // factor, config.width // factor)
    noise = torch.randn(shape, generator=generator).to(device) * sigmas[0]

    if model.task.video:
        ids = added_time_ids(torch.tensor([config.fps]), torch.tensor([config.motion]), torch.zeros(1)).to(device)
        scale = frame_guidance(config.num_frames, config.guidance_min, config.guidance_max).to(device)

        def with_text(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"text": embedding, "added": ids}

        x = noise
    else:  # frames as a batch of images; guidance is one number
        scale = config.guidance_max
        frames = config.num_frames

        def with_text(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"text": embedding.expand(frames, -1, -1)}

        x = noise[0]
    denoise = guided_pair(batched_pair(model.denoiser, with_text(text), with_text(negative)), scale)
    latents = SAMPLERS[config.sampler](denoise, x, sigmas, on_step)
    if not model.task.video:
        latents = latents[None]
    return model.codec.decode(latents)[0]


@torch.no_grad()
def animate(
    model: VideoDiffusion, image: torch.Tensor, config: GenerationConfig, on_step: StepCallback | None = None
) -> torch.Tensor:
    """(T, 3, H, W) frames in [-1, 1] starting from `image`, (3, h, w) in [-1, 1]; an image
    of another size is resized (shorter side) and centre-cropped to config's height x width.
    `on_step(i)` is called after each sampler step. Random draws come in
    StableVideoDiffusionPipeline's order (image noise, then latents): an exported model
    given the same seed there starts from the same noise."""
    if model.image is None:
        raise ValueError("this is a text-to-video model: it takes a prompt (generate), not an image")
    model.eval()
    use_adapter(model.unet, config.adapter, config.adapter_strength)
    device = next(model.unet.parameters()).device
    factor = model.codec.downsampling
    generator = torch.Generator().manual_seed(config.seed)
    frame = fit_frames(image[None].float(), config.height, config.width).to(device)
    strength = torch.tensor([config.noise_aug_strength])
    cond = model.image_condition(frame, strength.to(device), generator)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}  # what training's condition dropout gives
    micro = {"motion": torch.tensor([config.motion])}
    if config.elevation is not None:
        micro["elevation"] = torch.tensor([config.elevation])
    ids = model.task.time_ids(torch.tensor([config.fps]), strength, micro).to(device)
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max).to(device)
    shape = (
        1,
        config.num_frames,
        model.codec.vae.config.latent_channels,
        config.height // factor,
        config.width // factor,
    )
    noise = torch.randn(shape, generator=generator).to(device) * sigmas[0]

    scale = frame_guidance(config.num_frames, config.guidance_min, config.guidance_max).to(device)
    denoise = guided_pair(batched_pair(model.denoiser, cond | {"added": ids}, uncond | {"added": ids}), scale)
    latents = SAMPLERS[config.sampler](denoise, noise, sigmas, on_step)
    return model.codec.decode(latents)[0]


@torch.no_grad()
def generate_and_upscale(
    base: VideoDiffusion,
    upsampler: VideoDiffusion,
    prompt: str,
    config: GenerationConfig,
    upscale_config: GenerationConfig | None = None,
    negative_prompt: str = "",
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade (Video LDM): `generate` `prompt` with the text-to-video `base`, then the x4
    `upsampler` on those frames with the same prompt (`upscale_config`: its steps, seed and
    noise strength; None: `config`'s). Returns (the base's frames (T, 3, H, W), the upsampled
    frames (T, 3, 4H, 4W)), in [-1, 1]. `on_step(i)` after each step of either sampler."""
    from model.upsampler import upscale

    if upsampler.task.endpoint != "upscale":
        raise ValueError(f"the cascade's upsampler must be an upsampler model, not a {upsampler.config.stage!r} one")
    low = generate(base, prompt, config, negative_prompt, on_step)
    return low, upscale(upsampler, low, upscale_config or config, prompt, on_step)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8, for writing video."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
