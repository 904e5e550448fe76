"""The temporal-decoder finetune (SVD's video VAE decoder): the model's image VAE
(`AutoencoderKL`, which decodes frame by frame) becomes diffusers'
`AutoencoderKLTemporalDecoder`, whose decoder mixes information across the frames of
a clip, and only that decoder is finetuned, so that decoded frames stop flickering.
The encoder, and with it the latent space the UNet was trained in, stays bit-identical.

- Conversion (`temporal_vae`): encoder, `quant_conv` and every spatial decoder weight
  are copied; `post_quant_conv` (1x1, absent from the temporal decoder) is folded into
  the decoder's `conv_in`; each temporal res block's last convolution starts at zero
  (the block is then the identity, so its learned spatial/temporal mix is irrelevant)
  and the output's temporal convolution starts as the identity. The new decoder then
  equals the image decoder except (a) at the latent's border pixels, where the folded
  `post_quant_conv` bias meets `conv_in`'s zero padding, and (b) with
  `layers_per_block=1` (the tiny VAE), where diffusers' temporal mid block keeps one
  res block and no attention: the image decoder's second mid res block and its mid
  attention are dropped. `conversion_error` measures both; training closes the gap.
- Loss: L1 + MSE reconstruction of the clip from its (frozen) encoder's posterior
  samples, plus per-frame Gaussian latent noise (what a sampler's latents carry: the
  frames of a generated clip never agree exactly), plus the frame-change error (the
  flicker metric below, `temporal_weight`), plus a hinge GAN loss from a small
  3D-convolution patch discriminator (`PatchDiscriminator3D`: diffusers and the
  installed libraries have none), weighted adaptively as in taming-transformers/LDM
  (the ratio of the two losses' gradient norms at the decoder's last layer, `time_conv_out`) and
  switched on after `adversarial_start` steps. No perceptual (LPIPS) term: its weights
  are not available offline.
- Metric (`decoding_metrics`): flicker = mean |(decoded[t+1] - decoded[t]) -
  (truth[t+1] - truth[t])| over consecutive frames, reconstruction L1 and PSNR.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from safetensors.torch import load_file, save_file

from model.config_fields import typed_fields, typed_section
from model.data import ClipSpec
from model.evaluation import psnr

KIND = "temporal-decoder"
NAMED_CONFIGS = Path(__file__).parent / "configs"
# Parameters of the temporal decoder that the image decoder has no counterpart for.
TEMPORAL_PARAMETER = re.compile(r"temporal_res_block|time_mixer|time_conv_out")


@dataclass(frozen=True)
class TemporalDecoderConfig:
    stage: Literal["temporal-decoder"] = KIND
    clip: ClipSpec = ClipSpec(num_frames=8, fps=8.0, height=32, width=32)
    batch_size: int = 2
    max_steps: int = 200
    lr: float = 2e-4
    discriminator_lr: float = 2e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    # Weight of the frame-change error (the flicker metric) in the loss: reconstruction
    # alone spends the decoder on each frame's detail and, in short runs, adds flicker.
    temporal_weight: float = 1.0
    adversarial_weight: float = 0.1
    adversarial_start: int = 50  # steps of reconstruction alone before the GAN loss joins
    discriminator_width: int = 32
    # Per-frame Gaussian noise added to the scaled latents during training: std drawn
    # uniformly in [0, latent_noise] per clip (0: the encoder's posterior samples only).
    latent_noise: float = 0.1
    # What trains: the whole decoder (SVD), or its temporal layers only (Video LDM's
    # recipe: the image decoder's frames stay as they were, only their agreement changes).
    trainable: Literal["decoder", "temporal"] = "decoder"
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 10
    # The validation loss (`validation_loss`) every this many steps, at the start and at the end (0: never).
    validate_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.stage != KIND:
            raise ValueError(f"a {self.stage!r} config is not a temporal-decoder config")
        if self.clip.num_frames < 2:
            raise ValueError("a temporal decoder trains on clips of at least 2 frames")

    @classmethod
    def from_dict(cls, raw: dict) -> TemporalDecoderConfig:
        raw = dict(raw)
        clip = typed_section(ClipSpec, raw.pop("clip", {}), "clip")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown temporal-decoder config fields: {sorted(unknown)}")
        return cls(**typed_fields(cls, raw), clip=clip)


def named_config(name_or_path: str) -> TemporalDecoderConfig:
    """`tiny` -> model/configs/tiny-temporal-decoder.yaml; anything else is a path."""
    named = NAMED_CONFIGS / f"{name_or_path}-{KIND}.yaml"
    path = named if named.exists() else Path(name_or_path)
    if not path.exists():
        raise ValueError(f"no config {name_or_path!r} (neither {named.name} in {NAMED_CONFIGS} nor a file)")
    return TemporalDecoderConfig.from_dict(yaml.safe_load(path.read_text()))


# -- conversion -------------------------------------------------------------------------


def _decoder_key(key: str) -> str:
    """An AutoencoderKL decoder key as AutoencoderKLTemporalDecoder names it: its res
    blocks are the spatial halves of spatio-temporal res blocks."""
    return re.sub(r"^(decoder\.(?:mid_block|up_blocks\.\d+)\.resnets\.\d+)\.", r"\1.spatial_res_block.", key)


@torch.no_grad()
def temporal_vae(vae: AutoencoderKL) -> tuple[AutoencoderKLTemporalDecoder, list[str]]:
    """The image VAE with a temporal decoder that starts (nearly) equal to its image
    decoder (see the module docstring), and the image decoder's weights that had no place in
    it. Already temporal: returned as it is."""
    if isinstance(vae, AutoencoderKLTemporalDecoder):
        return vae, []
    c = vae.config
    unsupported = {
        "norm_num_groups": (c.norm_num_groups, 32),
        "act_fn": (c.act_fn, "silu"),
        "use_quant_conv": (c.use_quant_conv, True),
        "use_post_quant_conv": (c.use_post_quant_conv, True),
        "shift_factor": (c.shift_factor, None),
        "mid_block_add_attention": (c.mid_block_add_attention, True),
        "up_block_types": (set(c.up_block_types), {"UpDecoderBlock2D"}),
    }
    wrong = {k: have for k, (have, need) in unsupported.items() if have != need}
    if wrong:
        raise ValueError(f"AutoencoderKLTemporalDecoder has no equivalent of this VAE's {wrong}")
    temporal = AutoencoderKLTemporalDecoder(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=tuple(c.down_block_types),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        sample_size=c.sample_size,
        scaling_factor=c.scaling_factor,
        force_upcast=c.force_upcast,
    )
    image = vae.state_dict()
    state = {_decoder_key(k): v for k, v in image.items() if not k.startswith("post_quant_conv.")}
    # conv_in(post_quant_conv(z)) as one 3x3 convolution of z (exact inside the latent)
    w_post, b_post = image["post_quant_conv.weight"][:, :, 0, 0], image["post_quant_conv.bias"]
    w_in, b_in = image["decoder.conv_in.weight"], image["decoder.conv_in.bias"]
    state["decoder.conv_in.weight"] = torch.einsum("omhw,mi->oihw", w_in, w_post)
    state["decoder.conv_in.bias"] = b_in + torch.einsum("omhw,m->o", w_in, b_post)
    expected = temporal.state_dict()
    dropped = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state and not TEMPORAL_PARAMETER.search(k))
    if missing:
        raise ValueError(f"the image VAE has no weights for {missing[:5]}")
    for key in dropped:
        del state[key]
    temporal.load_state_dict(state, strict=False)
    for name, module in temporal.decoder.named_modules():
        if name.endswith("temporal_res_block"):
            module.conv2.weight.zero_()  # the block adds nothing until it learns to
            module.conv2.bias.zero_()
    out = temporal.decoder.time_conv_out
    out.weight.zero_()
    out.bias.zero_()
    out.weight[:, :, 1, 0, 0] = torch.eye(out.out_channels)  # each frame's own pixels, unchanged
    return temporal, sorted({k.rsplit(".", 1)[0] for k in dropped})


def decode_frames(vae: AutoencoderKL | AutoencoderKLTemporalDecoder, latents: torch.Tensor) -> torch.Tensor:
    """(B, T, C, h, w) unscaled latents -> (B, T, 3, H, W), not clamped: each clip's
    frames together for a temporal decoder, one by one for an image decoder."""
    b, t = latents.shape[:2]
    clips = {"num_frames": t} if isinstance(vae, AutoencoderKLTemporalDecoder) else {}
    return vae.decode(latents.flatten(0, 1), **clips).sample.unflatten(0, (b, t))


@torch.no_grad()
def conversion_error(vae: AutoencoderKL, temporal: AutoencoderKLTemporalDecoder, video: torch.Tensor) -> dict:
    """How far the converted decoder starts from the image decoder on `video` (B, T, 3, H, W)
    in [-1, 1]: max and mean |difference| of the decoded frames (over the image, and
    away from the border pixels that the folded `post_quant_conv` bias leaves inexact)."""
    latents = vae.encode(video.flatten(0, 1)).latent_dist.mode().unflatten(0, video.shape[:2])
    difference = (decode_frames(vae, latents) - decode_frames(temporal, latents)).abs()
    border = 2 ** (len(vae.config.block_out_channels) - 1) * 2  # one latent pixel, plus conv_out's reach
    inner = difference[..., border:-border, border:-border]
    return {
        "max": float(difference.max()),
        "mean": float(difference.mean()),
        "max_inside": float(inner.max()),
        "mean_inside": float(inner.mean()),
    }


# -- discriminator ------------------------------------------------------------------------


class PatchDiscriminator3D(torch.nn.Module):
    """A PatchGAN over space and time: (B, T, 3, H, W) clips in [-1, 1] -> (B, 1, T, H/8,
    W/8) real/fake logits, each seeing a spatio-temporal patch (3 frames wide per layer,
    so flicker between neighbouring frames is visible to it). Strided in space only: our
    clips are short."""

    def __init__(self, width: int = 32, channels: int = 3, layers: int = 3):
        super().__init__()
        blocks: list[torch.nn.Module] = [
            torch.nn.Conv3d(channels, width, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
            torch.nn.LeakyReLU(0.2),
        ]
        for i in range(1, layers):
            c_in, c_out = width * 2 ** (i - 1), width * 2**i
            blocks += [
                torch.nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1), bias=False),
                torch.nn.GroupNorm(min(32, c_out // 4), c_out),
                torch.nn.LeakyReLU(0.2),
            ]
        blocks.append(torch.nn.Conv3d(width * 2 ** (layers - 1), 1, 3, padding=1))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video.transpose(1, 2))


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last: torch.nn.Parameter) -> torch.Tensor:
    """LDM's balance of the GAN loss: ||d reconstruction / d last|| / ||d adversarial / d last||."""
    (g_rec,) = torch.autograd.grad(reconstruction, last, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adversarial, last, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


# -- training -----------------------------------------------------------------------------


def decoder_parameters(
    vae: AutoencoderKLTemporalDecoder, trainable: Literal["decoder", "temporal"] = "decoder"
) -> list[torch.nn.Parameter]:
    """Freeze the encoder (and quant_conv) and, for `temporal`, the decoder's spatial
    layers; returns the parameters that train."""
    vae.requires_grad_(False)
    params = []
    for name, param in vae.decoder.named_parameters():
        param.requires_grad_(trainable == "decoder" or bool(TEMPORAL_PARAMETER.search(name)))
        if param.requires_grad:
            params.append(param)
    return params


@dataclass
class TemporalDecoderState:
    """What a checkpoint restores: weights, both optimizers and the position."""

    step: int = 0
    data_position: int = 0
    losses: list[float] = field(default_factory=list)


def noisy_latents(
    vae: AutoencoderKLTemporalDecoder, video: torch.Tensor, max_noise: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, T, C, h, w) unscaled latents of `video`: a posterior sample per frame, plus
    per-frame Gaussian noise of std ~ U(0, max_noise) per clip in scaled-latent units."""
    b, t = video.shape[:2]
    with torch.no_grad():
        latents = vae.encode(video.flatten(0, 1)).latent_dist.sample(generator).unflatten(0, (b, t))
    std = torch.rand(b, generator=generator) * max_noise / vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    return latents + (std.view(b, 1, 1, 1, 1) * noise).to(latents)


def reconstruction_loss(
    decoded: torch.Tensor, video: torch.Tensor, config: TemporalDecoderConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The decoder's reconstruction loss (weighted L1, MSE and frame-change error) and its terms."""
    l1 = (decoded - video).abs().mean()
    mse = (decoded - video).pow(2).mean()
    change = frame_change_error(decoded, video)
    loss = config.l1_weight * l1 + config.mse_weight * mse + config.temporal_weight * change
    return loss, {"l1": l1.item(), "mse": mse.item(), "frame_change": change.item()}


VALIDATION_SEED = 1_000_000_007  # the latent noise of validation level k is drawn from this + k


@torch.no_grad()
def validation_loss(
    vae: AutoencoderKLTemporalDecoder, video: torch.Tensor, config: TemporalDecoderConfig
) -> dict[str, float]:
    """The reconstruction loss of fixed clips (B, T, 3, H, W), encoded with the posterior mean,
    at three latent-noise levels (none, half and all of `latent_noise`) with fixed noise: the
    same weights give the same figures. Without the GAN term, whose discriminator moves too.
    `val_loss` is their mean; `val_loss/noise_<level>` each level's."""
    latents = vae.encode(video.flatten(0, 1)).latent_dist.mode().unflatten(0, video.shape[:2])
    figures = {}
    for k, level in enumerate((0.0, config.latent_noise / 2, config.latent_noise)):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(VALIDATION_SEED + k))
        decoded = decode_frames(vae, latents + noise.to(latents) * level / vae.config.scaling_factor)
        figures[f"val_loss/noise_{level:.3g}"] = reconstruction_loss(decoded, video, config)[0].item()
    return {"val_loss": sum(figures.values()) / len(figures), **figures}


class TemporalDecoderTrainer:
    """Alternating generator (decoder) and discriminator steps on clips."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder, config: TemporalDecoderConfig):
        self.vae, self.config = vae, config
        self.params = decoder_parameters(vae, config.trainable)
        self.discriminator = PatchDiscriminator3D(config.discriminator_width).to(next(vae.parameters()).device)
        self.optimizer = torch.optim.AdamW(self.params, config.lr, betas=(0.5, 0.9), weight_decay=0.0)
        self.discriminator_optimizer = torch.optim.AdamW(
            self.discriminator.parameters(), config.discriminator_lr, betas=(0.5, 0.9), weight_decay=0.0
        )
        self.state = TemporalDecoderState()

    def step(self, video: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        config = self.config
        self.vae.decoder.train()
        decoded = decode_frames(self.vae, noisy_latents(self.vae, video, config.latent_noise, generator))
        reconstruction, metrics = reconstruction_loss(decoded, video, config)
        loss = reconstruction
        adversarial_on = self.state.step >= config.adversarial_start and config.adversarial_weight > 0
        if adversarial_on:
            self.discriminator.requires_grad_(False)
            generator_loss = -self.discriminator(decoded).mean()
            weight = adaptive_weight(reconstruction, generator_loss, self.vae.decoder.time_conv_out.weight)
            loss = loss + config.adversarial_weight * weight * generator_loss
            metrics |= {"generator_loss": generator_loss.item(), "adversarial_weight": weight.item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.optimizer.step()
        if adversarial_on:
            self.discriminator.requires_grad_(True)
            real, fake = self.discriminator(video), self.discriminator(decoded.detach())
            discriminator_loss = hinge_discriminator_loss(real, fake)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss.backward()
            self.discriminator_optimizer.step()
            metrics |= {"discriminator_loss": discriminator_loss.item()}
        self.vae.decoder.eval()
        self.state.step += 1
        self.state.data_position += video.shape[0]
        self.state.losses.append(loss.item())
        return {"loss": loss.item(), **metrics}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.vae.decoder.state_dict().items()}, folder / "decoder.safetensors")
        save_file(
            {k: v.contiguous() for k, v in self.discriminator.state_dict().items()},
            folder / "discriminator.safetensors",
        )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            },
            folder / "optimizers.pt",
        )
        (folder / "state.json").write_text(json.dumps(asdict(self.state) | {"stage": KIND}))
        return folder

    def load(self, folder: Path) -> None:
        self.vae.decoder.load_state_dict(load_file(folder / "decoder.safetensors"))
        self.discriminator.load_state_dict(load_file(folder / "discriminator.safetensors"))
        optimizers = torch.load(folder / "optimizers.pt", weights_only=True)
        self.optimizer.load_state_dict(optimizers["optimizer"])
        self.discriminator_optimizer.load_state_dict(optimizers["discriminator_optimizer"])
        state = json.loads((folder / "state.json").read_text())
        self.state = TemporalDecoderState(state["step"], state["data_position"], state["losses"])


def train_temporal_decoder(
    trainer: TemporalDecoderTrainer,
    batches: Iterator[torch.Tensor],
    *,
    validation: torch.Tensor | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TemporalDecoderState:
    """Steps from the trainer's position to `max_steps`; `batches` yields (B, T, 3, H, W)
    clips from that position on. Each step's random draws follow from (seed, step).
    With `validation` clips, their `validation_loss` goes to `on_log` at the start, every
    `validate_every` steps and at the end."""
    config = trainer.config
    generator = torch.Generator()

    def validate() -> None:
        if validation is not None and on_log and config.validate_every:
            on_log(trainer.state.step, validation_loss(trainer.vae, validation, config))

    validate()
    while trainer.state.step < config.max_steps:
        video = next(batches)
        generator.manual_seed(config.seed * 1_000_003 + trainer.state.step)
        metrics = trainer.step(video, generator)
        step = trainer.state.step
        if on_log and (step % config.log_every == 0 or step == config.max_steps):
            on_log(step, metrics)
        if config.validate_every and (step % config.validate_every == 0 or step == config.max_steps):
            validate()
        if on_checkpoint and (step % config.checkpoint_every == 0 or step == config.max_steps):
            on_checkpoint(step)
    return trainer.state


# -- metric -------------------------------------------------------------------------------


def frame_change_error(decoded: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean |(decoded[t+1] - decoded[t]) - (truth[t+1] - truth[t])| over clips (B, T, 3, H, W):
    the frame-to-frame change the decoder adds or removes, in [-1, 1] units."""
    return (decoded.diff(dim=1) - truth.diff(dim=1)).abs().mean()


def flicker(decoded: torch.Tensor, truth: torch.Tensor) -> float:
    return float(frame_change_error(decoded, truth))


@torch.no_grad()
def decoding_metrics(
    vae: AutoencoderKL | AutoencoderKLTemporalDecoder,
    video: torch.Tensor,
    latent_noise: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Flicker, L1 and PSNR of `video` (B, T, 3, H, W) encoded with the posterior mean,
    plus per-frame Gaussian noise of std `latent_noise` (scaled-latent units: a stand-in
    for a sampler's latents), decoded; the same draws for every VAE with the same encoder."""
    latents = vae.encode(video.flatten(0, 1)).latent_dist.mode().unflatten(0, video.shape[:2])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    decoded = decode_frames(vae, latents + noise * latent_noise / vae.config.scaling_factor).clamp(-1, 1)
    return {
        "flicker": flicker(decoded, video),
        "l1": float((decoded - video).abs().mean()),
        "psnr": float(np.mean([psnr(d, v) for d, v in zip(decoded.flatten(0, 1), video.flatten(0, 1), strict=True)])),
    }
