"""Training the frame autoencoder (the VAE whose latents the UNets denoise).

Production stages use a pretrained `AutoencoderKL` (e.g. the one in a copy of SD 2.1)
and keep it frozen. The CPU-sized `tiny` model has no public VAE, and a random one
does not reconstruct frames, so the motion evidence and the finetunes need a small
trained one: reconstruction (L1 + MSE) plus a small KL term, as in the LDM recipe
minus the perceptual and adversarial losses that a 32x32 VAE of flat synthetic
shapes does not need. Afterwards `scaling_factor` is set so latents have unit
variance, as Stable Diffusion's 0.18215 does for its VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


@dataclass(frozen=True)
class AutoencoderTraining:
    steps: int = 400
    batch_frames: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0
    # Finetune the decoder only (as SD's VAE decoder was, ft-MSE): the encoder and the
    # scaling stay, so latents, and every model trained on them, are unchanged.
    decoder_only: bool = False


def autoencoder_loss(vae: AutoencoderKL, frames: torch.Tensor, kl_weight: float, generator: torch.Generator) -> dict:
    posterior = vae.encode(frames).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    l1 = (reconstruction - frames).abs().mean()
    mse = (reconstruction - frames).pow(2).mean()
    kl = posterior.kl().mean() / frames[0].numel()
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


def train_autoencoder(
    vae: AutoencoderKL,
    frames: Iterator[torch.Tensor],
    config: AutoencoderTraining,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> AutoencoderKL:
    """`frames` yields batches (N, 3, H, W) in [-1, 1]; returns the trained VAE with
    its `scaling_factor` measured on the last batches (kept as it was if `decoder_only`)."""
    generator = torch.Generator().manual_seed(config.seed)
    trained = [vae.post_quant_conv, vae.decoder] if config.decoder_only else [vae]
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    vae.requires_grad_(False).train()
    for module in trained:
        module.requires_grad_(True)
    seen: list[torch.Tensor] = []
    for step in range(1, config.steps + 1):
        batch = next(frames)
        losses = autoencoder_loss(vae, batch, config.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        seen = (seen + [batch])[-4:]
        if on_log and (step % 20 == 0 or step == config.steps):
            on_log(step, {k: v.item() for k, v in losses.items()})
    vae.requires_grad_(False).eval()
    if config.decoder_only:
        return vae
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in seen])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, frames: torch.Tensor) -> float:
    """Mean absolute error of encode (mean) -> decode, in [-1, 1] units."""
    vae.eval()
    decoded = vae.decode(vae.encode(frames).latent_dist.mean).sample.clamp(-1, 1)
    return float(F.l1_loss(decoded, frames))
