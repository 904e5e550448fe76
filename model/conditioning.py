"""What the denoiser is conditioned on, as small composable pieces (sgm style):
the text (open_clip text tower, SD 2.x's penultimate-layer tokens) or, for
image-to-video, the conditioning frame (open_clip vision tower's embedding and a
noise-augmented VAE latent), SVD's micro-conditioning (fps, motion bucket,
conditioning-noise strength), condition dropout for classifier-free guidance, and
the frozen VAE that maps frames to latents."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from safetensors.torch import load_file

from model import openclip
from model.records import MOTION_BUCKET_SCALE, MOTION_BUCKETS


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


class ImageEncoder(torch.nn.Module):
    """The CLIP embedding of a conditioning frame, (B, 1, D): the open_clip vision tower's
    projected (unnormalised) output, as SVD conditions on OpenCLIP ViT-H. The frame is
    resized and normalised exactly as `StableVideoDiffusionPipeline` does, so a model
    exported to that pipeline sees the same embedding. Frozen."""

    def __init__(self, model_name: str, weights: Path | None):
        super().__init__()
        self.visual = openclip.build(model_name, None).visual
        if weights is not None:
            self.visual.load_state_dict(vision_state(weights))
        preprocess = self.visual.preprocess_cfg
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.visual.output_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`images` (B, 3, H, W) in [-1, 1]."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        x = (_resize_with_antialiasing(images.float(), self.visual.image_size) + 1) / 2
        return self.visual((x - self.mean) / self.std)[:, None]


def vision_state(weights: Path) -> dict[str, torch.Tensor]:
    """The vision tower's weights from a file of them alone (what a model folder keeps) or
    from a whole open_clip checkpoint (e.g. the public ViT-H-14), whose `visual.` part it takes."""
    from open_clip.factory import load_state_dict

    state = load_file(weights) if str(weights).endswith(".safetensors") else load_state_dict(str(weights))
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def motion_bucket(score: torch.Tensor) -> torch.Tensor:
    """Curation's motion score (px/frame at 128 px) to SVD's integer motion bucket 0..255."""
    return (score * MOTION_BUCKET_SCALE).round().clamp(0, MOTION_BUCKETS - 1)


def added_time_ids(fps: torch.Tensor, motion: torch.Tensor, noise_strength: torch.Tensor) -> torch.Tensor:
    """SVD's micro-conditioning vector, (B, 3): fps, motion bucket, conditioning-noise strength."""
    return torch.stack([fps.float(), motion_bucket(motion), noise_strength.float()], dim=1)


def camera_time_ids(fps: torch.Tensor, elevation: torch.Tensor, noise_strength: torch.Tensor) -> torch.Tensor:
    """Multi-view (SVD-MV) micro-conditioning, (B, 3): the camera elevation in degrees where
    SVD has the motion bucket (an orbit's motion is fixed: one turn), through the same
    sinusoidal embedding, which resolves a degree as it resolves a bucket."""
    return torch.stack([fps.float(), elevation.float(), noise_strength.float()], dim=1)


def drop_conditions(
    embeddings: torch.Tensor, empty: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each sample's embedding by the empty prompt's with `probability`, so the
    model also learns the unconditional score that classifier-free guidance needs."""
    drop = dropped(embeddings.shape[0], probability, generator)
    return torch.where(per_sample(drop, embeddings), empty.expand_as(embeddings), embeddings)


def dropped(batch: int, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples of a batch lose their condition, (B,) bool."""
    return torch.rand(batch, generator=generator) < probability


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) mask shaped to broadcast over `like` (B, ...)."""
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def noise_augmented(images: torch.Tensor, strength: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """SVD's conditioning-frame augmentation: Gaussian noise of `strength` (B,) added in pixel
    space, so the model does not just copy the frame and tolerates real photos at sampling."""
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return images + per_sample(strength, images) * noise


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    latent_channels: int = 4
    scaling_factor: float = 0.18215  # SD's; a tiny random VAE keeps it


TINY_VAE = VAEConfig(block_out_channels=(32, 32, 64))


class LatentCodec(torch.nn.Module):
    """The frozen VAE: (B, T, 3, H, W) in [-1, 1] <-> (B, T, 4, H/f, W/f) scaled latents.
    An AutoencoderKL works frame by frame; SVD's AutoencoderKLTemporalDecoder (same
    encoder) decodes each clip's frames together."""

    def __init__(self, vae: AutoencoderKL | AutoencoderKLTemporalDecoder):
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
        config = json.loads((folder / sub.get("subfolder", "") / "config.json").read_text())
        temporal = config["_class_name"] == AutoencoderKLTemporalDecoder.__name__
        return cls((AutoencoderKLTemporalDecoder if temporal else AutoencoderKL).from_pretrained(folder, **sub))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, t = video.shape[:2]
        latents = self.vae.encode(video.flatten(0, 1)).latent_dist.sample(generator)
        return (latents * self.vae.config.scaling_factor).unflatten(0, (b, t))

    @torch.no_grad()
    def condition_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latent of conditioning frames: the posterior's mode, unscaled, as SVD
        (and its diffusers pipeline) concatenates it."""
        return self.vae.encode(images).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, t = latents.shape[:2]
        z = latents.flatten(0, 1) / self.vae.config.scaling_factor
        clips = {"num_frames": t} if isinstance(self.vae, AutoencoderKLTemporalDecoder) else {}
        frames = self.vae.decode(z, **clips).sample
        return frames.clamp(-1, 1).unflatten(0, (b, t))
