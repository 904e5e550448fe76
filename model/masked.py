"""Masked conditioning on known frames (Video LDM): one mechanism, two finetunes.

The UNet's input is the noisy latents concatenated channel-wise with the clean latents
of the known frames (zero elsewhere) and a one-channel mask (1 on known frames):
C + C + 1 channels. A trained video UNet is widened for it with its new input channels
at zero (`networks.widen_input`), so the finetune starts as the base model; the text
conditioning stays.

- Frame interpolation (`stage: interpolation`): every `KEY_EVERY`-th frame of a
  clip is known (the key frames); the model fills the three between each pair.
  `interpolate` turns T frames into 4T - 3: three new frames go between each of the
  T - 1 pairs, none after the last key (that would be extrapolation, prediction's job).
  Applied twice, T -> 4T - 3 -> 16T - 15: Video LDM's x4 then x16.
- Long-video prediction (`stage: prediction`): 0, 1 or 2 leading frames of a
  clip are known (drawn per sample); `predict` generates a video chunk by chunk, each
  chunk continuing from the last `MAX_CONTEXT` frames of the one before.

Both train with condition dropout (mask and known latents zeroed): the model also
learns the prediction without known frames, which context guidance (classifier-free
guidance on the known frames) contrasts with the conditional one. A model given no
known frames at all (`generate`) is a text-to-video model.
"""

from __future__ import annotations

import torch

from model.conditioning import added_time_ids, dropped, per_sample
from model.data import fit_frames
from model.networks import VideoNetwork
from model.samplers import SAMPLERS, StepCallback, batched_pair, guided_pair, karras_sigmas

KEY_EVERY = 4  # interpolation: a key frame every 4th frame, x4 frame rate
MAX_CONTEXT = 2  # prediction: at most 2 leading known frames, also what each chunk feeds back


def input_channels(latent_channels: int) -> int:
    """Noisy latents, known latents, mask."""
    return 2 * latent_channels + 1


class MaskedVideoNetwork(VideoNetwork):
    """The video UNet with the known frames' latents and the mask concatenated to its
    input. Without them (text-to-video generation) both are zeros: no frame is known."""

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        text: torch.Tensor,
        added: torch.Tensor,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if known is None:
            known = torch.zeros_like(x)
            mask = x.new_zeros(*x.shape[:2], 1, *x.shape[3:])
        return self.unet(torch.cat([x, known, mask.to(x)], dim=2), c_noise, text, added_time_ids=added).sample


def key_positions(num_frames: int) -> list[int]:
    """The known frames of an interpolation clip: 0, 4, 8, ... (a clip has 4k + 1 frames)."""
    return list(range(0, num_frames, KEY_EVERY))


def interpolation_mask(batch: int, num_frames: int) -> torch.Tensor:
    """(B, T) float mask of an interpolation clip's key frames."""
    mask = torch.zeros(batch, num_frames)
    mask[:, key_positions(num_frames)] = 1.0
    return mask


def prediction_mask(batch: int, num_frames: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, T) float mask of 0, 1 or 2 leading context frames, drawn per sample."""
    counts = torch.randint(0, MAX_CONTEXT + 1, (batch,), generator=generator)
    return (torch.arange(num_frames)[None] < counts[:, None]).float()


def masked_condition(latents: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's extra inputs for latents (B, T, C, h, w) and a (B, T) frame mask:
    the known frames' latents (zero elsewhere) and the mask as a (B, T, 1, h, w) channel."""
    mask = frame_mask.to(latents)[:, :, None, None, None].expand(-1, -1, 1, *latents.shape[-2:])
    return {"known": latents * mask, "mask": mask}


def training_condition(
    latents: torch.Tensor, mask: torch.Tensor, dropout: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Known frames (`mask` (B, T)) for a training batch; with probability `dropout` a
    sample gets none (the unconditional input of context guidance)."""
    mask = torch.where(per_sample(dropped(latents.shape[0], dropout, generator), mask), 0.0, mask)
    return masked_condition(latents, mask)


def sample_known(
    model,
    known_latents: torch.Tensor,
    frame_mask: torch.Tensor,
    text: torch.Tensor,
    config,
    generator: torch.Generator,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Latents (1, T, C, h, w) sampled around known ones (`frame_mask` (1, T)) with context
    guidance `config.context_guidance`: D(no frames known) + w (D(known) - D(no frames
    known)); the known frames are then put back exactly. `on_step(i)` after each sampler step."""
    device = known_latents.device
    cond = masked_condition(known_latents, frame_mask.to(device))
    none = {k: torch.zeros_like(v) for k, v in cond.items()}  # what training's dropout gives
    ids = added_time_ids(torch.tensor([config.fps]), torch.tensor([config.motion]), torch.zeros(1)).to(device)
    sigmas = karras_sigmas(config.steps, config.sigma_min, config.sigma_max).to(device)
    noise = torch.randn(known_latents.shape, generator=generator).to(device) * sigmas[0]

    shared = {"text": text, "added": ids}
    if config.context_guidance == 1.0:  # guidance at 1 is the conditional prediction: no other pass
        denoise = lambda x, sigma: model.denoiser(x, sigma, **shared, **cond)  # noqa: E731
    else:  # both predictions from one batch
        pair = batched_pair(model.denoiser, shared | cond, shared | none)
        denoise = guided_pair(pair, config.context_guidance)
    latents = SAMPLERS[config.sampler](denoise, noise, sigmas, on_step)
    return torch.where(cond["mask"].bool(), known_latents, latents)


def frame_latents(codec, frames: torch.Tensor) -> torch.Tensor:
    """Scaled latents (T, C, h, w) of given frames (T, 3, H, W): the posterior's mode, so
    the same frames always give the same known latents."""
    return codec.condition_latent(frames) * codec.vae.config.scaling_factor


def _require(model, kind: str) -> None:
    if model.task.name != kind:
        raise ValueError(f"this is a {model.task.name!r} model, not a {kind!r} one")


@torch.no_grad()
def interpolate(
    model, frames: torch.Tensor, config, prompt: str = "", on_step: StepCallback | None = None
) -> torch.Tensor:
    """(4T - 3, 3, H, W) frames in [-1, 1]: `frames` (T, 3, h, w), resized to the config's
    size, as every 4th frame and three generated between each pair (at 4x the frame
    rate: `config.fps` is the output's). Windows of the model's training length
    (`config.num_frames`, 4k + 1 frames: k + 1 keys) are sampled one after the other,
    neighbours sharing a key; the last window is aligned to the last key."""
    _require(model, "interpolation")
    if len(frames) < 2:
        raise ValueError(f"interpolation needs at least 2 frames, got {len(frames)}")
    if (config.num_frames - 1) % KEY_EVERY:
        raise ValueError(f"an interpolation window has 4k + 1 frames, not {config.num_frames}")
    model.eval()
    device = next(model.unet.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    text = model.text([prompt]).to(device)
    keys = fit_frames(frames.float(), config.height, config.width).to(device)
    key_latents = frame_latents(model.codec, keys)
    window_keys = min((config.num_frames - 1) // KEY_EVERY + 1, len(keys))
    span = (window_keys - 1) * KEY_EVERY + 1
    total = (len(keys) - 1) * KEY_EVERY + 1
    latents = key_latents.new_zeros(1, total, *key_latents.shape[1:])
    positions = key_positions(span)
    start = 0
    while True:
        start = min(start, len(keys) - window_keys)
        known = key_latents.new_zeros(1, span, *key_latents.shape[1:])
        known[0, positions] = key_latents[start : start + window_keys]
        mask = torch.zeros(1, span)
        mask[0, positions] = 1.0
        first = start * KEY_EVERY
        latents[:, first : first + span] = sample_known(model, known, mask, text, config, generator, on_step)
        if start + window_keys == len(keys):
            break
        start += window_keys - 1
    return model.codec.decode(latents)[0]


@torch.no_grad()
def predict(
    model, context: torch.Tensor, num_frames: int, config, prompt: str = "", on_step: StepCallback | None = None
) -> torch.Tensor:
    """(num_frames, 3, H, W) frames in [-1, 1] continuing `context` (C, 3, h, w) frames, C
    from 0 (text-to-video) to 2 (the last two are used if more are given), resized to the
    config's size. Chunks of `config.num_frames` are sampled one after the other, each
    knowing the last 2 frames generated before it; the context frames come back first
    (as the VAE reconstructs them)."""
    _require(model, "prediction")
    if config.num_frames <= MAX_CONTEXT:
        raise ValueError(f"a prediction chunk needs more than {MAX_CONTEXT} frames, not {config.num_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    model.eval()
    device = next(model.unet.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    text = model.text([prompt]).to(device)
    factor = model.codec.downsampling
    channels = model.codec.vae.config.latent_channels
    shape = (1, config.num_frames, channels, config.height // factor, config.width // factor)
    context = context[-MAX_CONTEXT:]
    if len(context):
        frames = fit_frames(context.float(), config.height, config.width).to(device)
        context_latents = frame_latents(model.codec, frames)[None]
    else:
        context_latents = torch.zeros(1, 0, *shape[2:], device=device)
    video = context_latents
    while video.shape[1] < num_frames:
        given = video[:, -MAX_CONTEXT:]
        known = torch.zeros(shape, device=device)
        known[:, : given.shape[1]] = given
        mask = torch.zeros(1, config.num_frames)
        mask[:, : given.shape[1]] = 1.0
        chunk = sample_known(model, known, mask, text, config, generator, on_step)
        video = torch.cat([video, chunk[:, given.shape[1] :]], dim=1)
    return model.codec.decode(video[:, :num_frames])[0]
