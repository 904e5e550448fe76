"""The three training stages as one model: text + frozen VAE + a UNet (2D for Stage I,
spatio-temporal for Stages II/III) behind EDM's preconditioning. A stage differs
only by its config: resolution, frames, noise-level shift and what trains."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import yaml

from model.conditioning import LatentCodec, TextEncoder, added_time_ids, drop_conditions
from model.data import ClipSpec
from model.diffusion import Denoiser, denoising_loss, lognormal_sigmas, shifted_p_mean
from model.latents import vae_fingerprint
from model.networks import CONFIGS, image_unet, inflate, load_image_unet
from model.openclip import TINY_CLIP_MODEL, register_tiny_models
from model.training import OptimConfig, Strategy

Stage = Literal["image", "video", "hq"]
STAGE_FILE = "stage.json"
TEXT_FOLDER, VAE_FOLDER = "text_encoder", "vae"
# The open_clip text tower whose token width matches each UNet's cross-attention (SD 2.1: ViT-H-14).
TEXT_MODELS = {"tiny": TINY_CLIP_MODEL, "small": "ViT-B-32", "base": "ViT-H-14"}
# Resolution at which p_mean is given; larger stages shift towards more noise.
BASE_PIXELS = 64 * 64


@dataclass(frozen=True)
class StageConfig:
    stage: Stage
    unet: str = "tiny"  # a named UNetConfig
    strategy: Strategy = "full"
    clip: ClipSpec = ClipSpec()
    # clips: curated video shards; images: a WebDataset of images (Stage I, spatial finetunes);
    # latents: clips cached by `vdm cache-latents` for this stage and VAE.
    data: Literal["clips", "images", "latents"] = "clips"
    p_mean: float = -1.2
    p_std: float = 1.2
    text_model: str | None = None  # open_clip model; None: the one matching `unet` (TEXT_MODELS)
    # Local path of open_clip weights (relative: inside the model folder); None: seeded random (tests).
    text_weights: str | None = None
    # A diffusers VAE folder (e.g. a copy of SD 2.1, or `vdm train-vae`'s output); None: the
    # `vae/` of the folder the model starts from, else a seeded random tiny VAE (tests).
    vae: str | None = None
    cond_dropout: float = 0.1
    batch_size: int = 2
    max_steps: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    gradient_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks: replicate (DDP) or shard (FSDP2)
    sample_every: int = 0  # also generate the sample prompts every N steps (0: only at the end)
    sample_prompts: tuple[str, ...] = ("",)
    sample_steps: int = 20
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache_dir: str = ".vdm/cache/models"

    def __post_init__(self):
        if self.data == "images" and self.stage != "image" and self.strategy != "spatial":
            raise ValueError("image data trains Stage I or the spatial layers only (strategy: spatial)")

    @property
    def video(self) -> bool:
        return self.stage != "image"

    @property
    def p_mean_at_resolution(self) -> float:
        return shifted_p_mean(self.p_mean, self.clip.height * self.clip.width, BASE_PIXELS)

    @classmethod
    def from_dict(cls, raw: dict) -> StageConfig:
        raw = dict(raw)
        raw["clip"] = ClipSpec(**raw.get("clip", {}))
        if "sample_prompts" in raw:
            raw["sample_prompts"] = tuple(raw["sample_prompts"])
        raw["optim"] = OptimConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.get("optim", {}).items()}
        )
        return cls(**raw)

    @classmethod
    def load(cls, path: str | Path) -> StageConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


NAMED_CONFIGS = Path(__file__).parent / "configs"


def named_config(name_or_path: str, stage: Stage) -> StageConfig:
    """`tiny` -> model/configs/tiny-<stage>.yaml; anything else is a path."""
    path = NAMED_CONFIGS / f"{name_or_path}-{stage}.yaml"
    config = StageConfig.load(path if path.exists() else name_or_path)
    if config.stage != stage:
        raise ValueError(f"{name_or_path} is a {config.stage!r} config, not {stage!r}")
    return config


class _ImageNetwork(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise, encoder_hidden_states=text).sample


class _VideoNetwork(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise, text, added_time_ids=added).sample


class VideoDiffusion(torch.nn.Module):
    """Trainable UNet + frozen text encoder and VAE; `loss(batch)` for any stage."""

    def __init__(self, config: StageConfig, unet: torch.nn.Module, vae_folder: Path | None = None):
        super().__init__()
        register_tiny_models(config.cache_dir)
        self.config = config
        self.unet = unet
        text_model = config.text_model or TEXT_MODELS[config.unet]
        self.text = TextEncoder(text_model, Path(config.text_weights) if config.text_weights else None)
        if self.text.width != unet.config.cross_attention_dim:
            raise ValueError(
                f"text model {text_model} gives {self.text.width}-wide tokens; the UNet attends to "
                f"{unet.config.cross_attention_dim}"
            )
        vae = config.vae or vae_folder
        self.codec = LatentCodec.from_folder(vae) if vae else LatentCodec.tiny()
        network = _VideoNetwork(unet) if config.video else _ImageNetwork(unet)
        self.denoiser = Denoiser(network)
        self._empty_text: torch.Tensor | None = None
        self._vae_fingerprint: str | None = None
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    @classmethod
    def create(cls, config: StageConfig, init_from: str | Path | None = None) -> VideoDiffusion:
        """Stage I from scratch (or an SD 2.1 folder); Stages II/III inflate or continue
        from `init_from` (a folder with a Stage I `unet/` or a video `unet/`, and maybe a `vae/`)."""
        if init_from is None:
            image = image_unet(CONFIGS[config.unet])
            return cls(config, inflate(image) if config.video else image)
        folder = Path(init_from)
        vae = folder / VAE_FOLDER if (folder / VAE_FOLDER / "config.json").exists() else None
        if not config.video:
            return cls(config, load_image_unet(folder), vae)
        unet_folder = folder / "unet" if (folder / "unet").exists() else folder
        class_name = json.loads((unet_folder / "config.json").read_text())["_class_name"]
        if class_name == "UNet2DConditionModel":
            return cls(config, inflate(load_image_unet(folder)), vae)
        from diffusers import UNetSpatioTemporalConditionModel

        return cls(config, UNetSpatioTemporalConditionModel.from_pretrained(unet_folder), vae)

    def conditioning(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        text = self.text(list(batch["caption"]))
        if self._empty_text is None:  # the unconditional embedding never changes: encode it once
            self._empty_text = self.text([""])
        empty = self._empty_text
        kwargs = {"text": drop_conditions(text, empty, self.config.cond_dropout if self.training else 0.0, generator)}
        if self.config.video:
            strength = torch.zeros_like(batch["fps"], dtype=torch.float32)  # text-to-video: no conditioning image
            kwargs["added"] = added_time_ids(batch["fps"], batch["motion"], strength)
        return kwargs

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of the batch: encoded now, or drawn from cached posteriors."""
        if "latent_mean" not in batch:
            return self.codec.encode(batch["video"], generator)
        if self._vae_fingerprint is None:
            self._vae_fingerprint = vae_fingerprint(self.codec)
        if set(batch["vae"]) != {self._vae_fingerprint}:
            raise ValueError(
                f"latents were cached with VAE {set(batch['vae'])}, this model's is {self._vae_fingerprint}"
            )
        mean = batch["latent_mean"]
        factor = self.codec.downsampling
        if mean.shape[-2:] != (self.config.clip.height // factor, self.config.clip.width // factor):
            raise ValueError(f"cached latents are {tuple(mean.shape[-2:])}, this stage needs {self.config.clip}")
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + batch["latent_std"] * noise) * self.codec.vae.config.scaling_factor

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Every random draw (latent sample, dropout, noise level, noise) comes from
        `generator`, which checkpoints save: a resumed run repeats the same draws."""
        latents = self.latents(batch, generator)  # (B, T, 4, h, w)
        cond = self.conditioning(batch, generator)
        if not self.config.video:  # Stage I trains on frames as images
            frames = latents.shape[1]
            latents = latents.flatten(0, 1)
            cond = {"text": cond["text"].repeat_interleave(frames, dim=0)}
        sigma = lognormal_sigmas(
            latents.shape[0], self.config.p_mean_at_resolution, self.config.p_std, generator=generator
        ).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        return denoising_loss(self.denoiser, latents, sigma, noise=noise, **cond).mean()

    def save(self, folder: Path, unet: torch.nn.Module | None = None) -> Path:
        """A self-contained model folder: the trained UNet and the VAE as diffusers folders
        (`unet/`, `vae/`), the text tower's weights if any (`text_encoder/`), and the stage
        config (`stage.json`) that `load` rebuilds the rest from. `create(init_from=...)`
        starts the next stage from it. `unet`: a plain copy to save instead of a sharded one."""
        (unet or self.unet).save_pretrained(folder / "unet", safe_serialization=True)
        self.codec.vae.save_pretrained(folder / VAE_FOLDER, safe_serialization=True)
        config = replace(self.config, vae=None)  # the folder's own vae/
        if self.config.text_weights:
            weights = Path(self.config.text_weights)
            (folder / TEXT_FOLDER).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, folder / TEXT_FOLDER / weights.name)
            config = replace(config, text_weights=f"{TEXT_FOLDER}/{weights.name}")
        (folder / STAGE_FILE).write_text(json.dumps(asdict(config), indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> VideoDiffusion:
        """A model saved by `save`, ready to sample."""
        folder = Path(folder)
        config = StageConfig.from_dict(json.loads((folder / STAGE_FILE).read_text()))
        if config.text_weights and not Path(config.text_weights).is_absolute():
            config = replace(config, text_weights=str(folder / config.text_weights))
        return cls.create(config, init_from=folder)
