"""The x4 video upsampler (Video LDM's latent upsampler, on SD's x4 upscaler's recipe).

The denoiser works on the high-resolution clip's latents. Its input is the noisy latents
with the low-resolution clip concatenated channel-wise, frame by frame: at x4 and with a
VAE that downsamples by 4 (the x4 upscaler's, and the tiny one) the low-resolution frames
lie exactly on the latent grid, so they go in as pixels (3 channels), as in SD's x4
upscaler. The low-resolution clip is noise-augmented (Gaussian noise in pixel space of a
strength drawn uniformly in [0, noise_aug_max] while training) and the model is told the
strength through SVD's micro-conditioning (its third slot, as image-to-video's), so at
sampling a little noise hides the difference between real low-resolution frames and
downscaled ones.

The UNet is the spatio-temporal one of the other video kinds: its temporal layers sit
between the spatial ones and start as the identity (model/networks.py), so until they
train the model is exactly the per-frame image upsampler. Trained on one-frame images
(`data: images`) the temporal branches are off (model/spatial.py), which is how the image
upsampler trains; trained on clips they learn to make the frames agree.

Training takes random patches: a crop of the high-resolution clip's latents and the
matching crop of its x4-downscaled frames (the same place, the same for every frame). The
network is convolutional (attention is over positions, whatever their number), so it
upsamples whole frames of any size that the UNet can take.

The evaluation: held-out clips downscaled x4 and upsampled back, against the clips they
came from: PSNR to the truth, and flicker, the mean absolute difference between the
upsampled clip's frame-to-frame change and the truth's (0: it changes exactly as the truth
does; a per-frame upsampler that invents different detail in each frame scores high).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALE = 4  # the upsampling factor
LATENT_FACTOR = 4  # the VAE downsampling the low-resolution frames must match (SD x4 upscaler's VAE)


def downscale(video: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3, H/factor, W/factor): the mean of each factor x factor
    block (area downsampling), so a crop aligned to the blocks downscales to the same crop
    of the downscaled frame."""
    h, w = video.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"frames of {h}x{w} do not divide into {factor}x{factor} blocks")
    return F.avg_pool2d(video.flatten(0, -4), factor).unflatten(0, video.shape[:-3])


def bicubic(video: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """(T, 3, h, w) -> (T, 3, factor h, factor w): the plain interpolation baseline."""
    return F.interpolate(video.float(), scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def check_codec(codec) -> None:
    if codec.downsampling != LATENT_FACTOR:
        raise ValueError(
            f"the x4 upsampler puts the low-resolution frames on the latent grid: its VAE must downsample by "
            f"{LATENT_FACTOR} (the SD x4 upscaler's, weights:sd-x4-upscaler), not {codec.downsampling}"
        )


def augmentation_strengths(batch: int, maximum: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample noise strengths for the low-resolution clips, uniform in [0, maximum]."""
    return torch.rand(batch, generator=generator) * maximum


def augmented(low: torch.Tensor, strength: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`low` (B, T, 3, h, w) with Gaussian noise of `strength` (B,) per clip, in pixel space."""
    noise = torch.randn(low.shape, generator=generator).to(low.device)
    return low + strength.to(low.device).reshape(-1, 1, 1, 1, 1) * noise


def patch_offsets(latent_size: tuple[int, int], patch: int, generator: torch.Generator) -> tuple[int, int]:
    """A random patch position on the latent grid, (top, left) in latent pixels."""
    h, w = latent_size
    if patch > h or patch > w:
        raise ValueError(f"patch of {patch} latent pixels does not fit latents of {h}x{w}")
    top = int(torch.randint(0, h - patch + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - patch + 1, (1,), generator=generator))
    return top, left


def random_patches(
    latents: torch.Tensor, low: torch.Tensor, patch_pixels: int | None, factor: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random crop (per clip, all its frames) of the latents (B, T, C, H/f, W/f) and of
    the low-resolution frames (B, T, 3, H/4, W/4), `patch_pixels` a side at high resolution
    (None: the whole frames)."""
    if patch_pixels is None:
        return latents, low
    size = patch_pixels // factor
    ratio = factor // SCALE  # low-resolution pixels per latent pixel
    latent_crops, low_crops = [], []
    for b in range(latents.shape[0]):
        top, left = patch_offsets(tuple(latents.shape[-2:]), size, generator)
        latent_crops.append(latents[b, ..., top : top + size, left : left + size])
        low_crops.append(low[b, ..., top * ratio : (top + size) * ratio, left * ratio : (left + size) * ratio])
    return torch.stack(latent_crops), torch.stack(low_crops)


class UpsamplerNetwork(torch.nn.Module):
    """The video UNet on the noisy latents with the (noise-augmented) low-resolution frames
    concatenated channel-wise to each frame; text tokens and the micro-conditioning (the
    augmentation strength in its third slot) as the other video kinds."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor, added: torch.Tensor, low_res: torch.Tensor
    ) -> torch.Tensor:
        if low_res.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"low-resolution frames {tuple(low_res.shape[-2:])} off the latent grid {x.shape[-2:]}")
        return self.unet(torch.cat([x, low_res.to(x.dtype)], dim=2), c_noise, text, added_time_ids=added).sample


def size_step(model) -> int:
    """Output sides must be multiples of this: the VAE's factor times the UNet's halvings."""
    return model.codec.downsampling * 2 ** (len(model.unet.config.down_block_types) - 1)


@torch.no_grad()
def upscale(model, video: torch.Tensor, config, prompt: str = "", on_step=None) -> torch.Tensor:
    """(T, 3, h, w) in [-1, 1] -> (T, 3, 4h, 4w) in [-1, 1]: the whole frames at once (the
    network is convolutional; it trained on patches). `config` (a GenerationConfig) gives the
    steps, sampler, noise range, seed, fps, motion and `noise_aug_strength`; its frames and
    size are the video's. `on_step(i)` after each sampler step."""
    from model.conditioning import added_time_ids
    from model.samplers import SAMPLERS, karras_sigmas

    if model.text is None:
        raise ValueError("the upsampler is conditioned on text: it needs a text model")
    check_codec(model.codec)
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be (T, 3, h, w) frames, not {tuple(video.shape)}")
    t, _, h, w = video.shape
    step = size_step(model)
    if (SCALE * h) % step or (SCALE * w) % step:
        raise ValueError(f"video of {w}x{h}: 4x its sides must be multiples of {step} ({step // SCALE} at its size)")
    model.eval()
    device = next(model.unet.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    strength = torch.tensor([config.noise_aug_strength], dtype=torch.float32)
    low = augmented(video[None].float(), strength, generator).to(device)
    text = model.text([prompt]).to(device)
    ids = added_time_ids(torch.tensor([config.fps]), torch.tensor([config.motion]), strength).to(device)
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max).to(device)
    factor = model.codec.downsampling
    shape = (1, t, model.codec.vae.config.latent_channels, SCALE * h // factor, SCALE * w // factor)
    noise = torch.randn(shape, generator=generator).to(device) * sigmas[0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.denoiser(x, sigma, text=text, added=ids, low_res=low)

    latents = SAMPLERS[config.sampler](denoise, noise, sigmas, on_step)
    return model.codec.decode(latents)[0]


# -- evaluation --------------------------------------------------------------------------


def psnr(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (model/evaluation.py's) of the estimate, clamped to the
    frames' range [-1, 1], to the truth."""
    from model.evaluation import psnr as frames_psnr

    return frames_psnr(estimate.float().clamp(-1, 1), truth)


def flicker(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute difference, in 8-bit levels, between the estimate's frame-to-frame change
    and the truth's, (T, 3, H, W) in [-1, 1] (the temporal decoder's `frame_change_error`):
    how much the error changes from frame to frame."""
    from model.temporal_decoder import frame_change_error

    if estimate.shape[0] < 2:
        raise ValueError("flicker needs clips of 2 frames or more")
    return float(frame_change_error(estimate.float().clamp(-1, 1)[None], truth.float()[None])) * 127.5


@dataclass(frozen=True)
class UpscaleFigures:
    psnr: float
    flicker: float


def figures(estimates: list[torch.Tensor], truths: list[torch.Tensor]) -> UpscaleFigures:
    """Mean PSNR and flicker of upsampled clips against their truths."""
    pairs = list(zip(estimates, truths, strict=True))
    return UpscaleFigures(
        psnr=float(np.mean([psnr(e, t) for e, t in pairs])), flicker=float(np.mean([flicker(e, t) for e, t in pairs]))
    )


def evaluate_upscaling(model, shards: list[str], *, clips: int, steps: int, prompts: list[str] | None = None) -> dict:
    """`clips` held-out clips at the model's size, downscaled x4 and upsampled back (seed = the
    clip's index): PSNR and flicker against the clips, and the same for bicubic interpolation
    (the baseline). The samples, the clips and the text each was upsampled with come along."""
    import itertools
    from dataclasses import replace

    from model.data import ClipDataset
    from model.pipeline import GenerationConfig

    spec = model.config.clip
    items = list(itertools.islice(iter(ClipDataset(shards, spec, random_crop=False, heldout=True)), clips))
    if not items:
        raise ValueError(f"no held-out clip of {spec.num_frames} frames in {shards}")
    config = GenerationConfig.for_clip(spec, steps=steps)
    task = model.task
    texts = [prompts[i % len(prompts)] if prompts else None for i in range(len(items))]
    inputs = [task.evaluation_inputs(item, text) for item, text in zip(items, texts, strict=True)]
    truths = [item["video"] for item in items]
    samples = [task.sample(model, given, replace(config, seed=seed)).float().cpu() for seed, given in enumerate(inputs)]
    model_figures = figures(samples, truths)
    baseline = figures([bicubic(given.video) for given in inputs], truths)
    return {
        "psnr": model_figures.psnr,
        "flicker": model_figures.flicker,
        "bicubic_psnr": baseline.psnr,
        "bicubic_flicker": baseline.flicker,
        "samples": samples,
        "clips": truths,
        "prompts": [given.prompt or item["caption"] for given, item in zip(inputs, items, strict=True)],
    }
