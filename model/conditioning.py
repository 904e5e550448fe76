"""What the denoiser is conditioned on, as small composable pieces (sgm style):
the text (open_clip text tower, SD 2.x's penultimate-layer tokens), SVD's
micro-conditioning (fps, motion bucket, conditioning-noise strength), condition
dropout for classifier-free guidance, and the frozen VAE that maps frames to latents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from model import openclip


class TextEncoder(torch.nn.Module):
    """Token features of the open_clip text tower at its penultimate layer, after the
    final norm (as Stable Diffusion 2.x conditions on OpenCLIP). Frozen."""

    def __init__(self, model_name: str, weights: Path | None):
        super().__init__()
        import open_clip

        clip = openclip.build(model_name, weights)
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.blocks = clip.transformer.resblocks[:-1]
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions).to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


def motion_bucket(score: torch.Tensor, scale: float = 64.0, buckets: int = 256) -> torch.Tensor:
    """Curation's motion score (px/frame at 128 px) to SVD's integer motion bucket 0..255."""
    return (score * scale).round().clamp(0, buckets - 1)


def added_time_ids(fps: torch.Tensor, motion: torch.Tensor, noise_strength: torch.Tensor) -> torch.Tensor:
    """SVD's micro-conditioning vector, (B, 3): fps, motion bucket, conditioning-noise strength."""
    return torch.stack([fps.float(), motion_bucket(motion), noise_strength.float()], dim=1)


def drop_conditions(
    embeddings: torch.Tensor, empty: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each sample's embedding by the empty prompt's with `probability`, so the
    model also learns the unconditional score that classifier-free guidance needs."""
    drop = torch.rand(embeddings.shape[0], generator=generator) < probability
    mask = drop.to(embeddings.device).reshape(-1, *([1] * (embeddings.ndim - 1)))
    return torch.where(mask, empty.expand_as(embeddings), embeddings)


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    latent_channels: int = 4
    scaling_factor: float = 0.18215  # SD's; a tiny random VAE keeps it


TINY_VAE = VAEConfig(block_out_channels=(32, 32, 64))


class LatentCodec(torch.nn.Module):
    """The frozen AutoencoderKL applied frame by frame: (B, T, 3, H, W) in [-1, 1] <->
    (B, T, 4, H/f, W/f) scaled latents."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def tiny(cls) -> LatentCodec:
        with openclip.fixed_seed():
            n = len(TINY_VAE.block_out_channels)
            vae = AutoencoderKL(
                block_out_channels=TINY_VAE.block_out_channels,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                latent_channels=TINY_VAE.latent_channels,
                norm_num_groups=32,
                scaling_factor=TINY_VAE.scaling_factor,
            )
        return cls(vae)

    @classmethod
    def from_folder(cls, folder: str | Path) -> LatentCodec:
        """A diffusers VAE: a pipeline folder (with `vae/`, e.g. SD 2.1) or a bare VAE folder."""
        folder = Path(folder)
        sub = {"subfolder": "vae"} if (folder / "vae" / "config.json").exists() else {}
        return cls(AutoencoderKL.from_pretrained(folder, **sub))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, t = video.shape[:2]
        latents = self.vae.encode(video.flatten(0, 1)).latent_dist.sample(generator)
        return (latents * self.vae.config.scaling_factor).unflatten(0, (b, t))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, t = latents.shape[:2]
        frames = self.vae.decode(latents.flatten(0, 1) / self.vae.config.scaling_factor).sample
        return frames.clamp(-1, 1).unflatten(0, (b, t))
