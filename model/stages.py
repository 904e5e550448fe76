"""The three training stages and the finetunes as one model: a frozen condition encoder
(text, or the conditioning frame for image-to-video) + frozen VAE + a UNet (2D for
Stage I, spatio-temporal for the rest) behind EDM's preconditioning. A stage differs
only by its config: resolution, frames, noise-level shift, conditioning and what trains."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors.torch import save_file

from model import camera_lora
from model.conditioning import (
    ImageEncoder,
    LatentCodec,
    TextEncoder,
    added_time_ids,
    camera_time_ids,
    drop_conditions,
    dropped,
    noise_augmented,
    per_sample,
)
from model.data import ClipSpec
from model.diffusion import Denoiser, denoising_loss, lognormal_sigmas, shifted_p_mean
from model.latents import vae_fingerprint
from model.masked import KEY_EVERY, MAX_CONTEXT, KnownFrames, MaskedVideoNetwork, input_channels, training_condition
from model.networks import CONFIGS, image_unet, inflate, load_image_unet, widen_input
from model.openclip import TINY_CLIP_MODEL, TINY_IMAGE_CLIP_MODEL, register_tiny_models
from model.spatial import images_only
from model.training import OptimConfig, Strategy

# Pretraining stages, then finetunes of a video model (`vdm finetune KIND`).
Stage = Literal["image", "video", "hq", "i2v", "spatial-hq", "camera-lora", "multiview", "interpolation", "prediction"]
STAGE_FILE = "stage.json"
TEXT_FOLDER, IMAGE_FOLDER, VAE_FOLDER = "text_encoder", "image_encoder", "vae"
IMAGE_WEIGHTS = "open_clip_vision.safetensors"
# The open_clip text tower whose token width matches each UNet's cross-attention (SD 2.1: ViT-H-14).
TEXT_MODELS = {"tiny": TINY_CLIP_MODEL, "small": "ViT-B-32", "base": "ViT-H-14"}
# The open_clip vision tower whose embedding width matches each UNet's cross-attention (SVD: ViT-H-14).
IMAGE_MODELS = {"tiny": TINY_IMAGE_CLIP_MODEL, "small": "ViT-B-32", "base": "ViT-H-14"}
# Resolution at which p_mean is given; larger stages shift towards more noise.
BASE_PIXELS = 64 * 64


@dataclass(frozen=True)
class StageConfig:
    stage: Stage
    unet: str = "tiny"  # a named UNetConfig
    strategy: Strategy = "full"
    clip: ClipSpec = ClipSpec()
    # clips: curated video shards; images: a WebDataset of images (Stage I, spatial finetunes);
    # latents: clips cached by `vdm cache-latents` for this stage and VAE;
    # orbits: turntable views with their camera elevation (multi-view, model/multiview.py).
    data: Literal["clips", "images", "latents", "orbits"] = "clips"
    p_mean: float = -1.2
    p_std: float = 1.2
    # What a video is generated from: a caption, or a conditioning frame (image-to-video, SVD).
    conditioning: Literal["text", "image"] = "text"
    # Frames the video model is also given (model/masked.py): key frames to interpolate
    # between, or leading context frames to continue.
    known_frames: KnownFrames = "none"
    text_model: str | None = None  # open_clip model; None: the one matching `unet` (TEXT_MODELS)
    # Local path of open_clip weights (relative: inside the model folder); None: seeded random (tests).
    text_weights: str | None = None
    image_model: str | None = None  # open_clip vision tower; None: the one matching `unet` (IMAGE_MODELS)
    # Local path of the vision tower's weights (safetensors; relative: inside the model folder).
    image_weights: str | None = None
    # Image-to-video training: ln(noise-augmentation strength) ~ N(mean, std) (about 0.05, as SVD).
    noise_aug_mean: float = -3.0
    noise_aug_std: float = 0.5
    # Camera-motion LoRA (strategy: lora): the motion class its adapter learns (model/camera_lora.py;
    # its clips are those curation labelled with the class's camera motions) and the adapter's size.
    motion_class: str | None = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # While training, this share of the clips get a motion score drawn uniformly in
    # [0, motion_jitter_max] instead of theirs. For a camera-motion adapter: the base already
    # reads the class from the score where the score tells it (a pan's is high, a held
    # camera's 0), so an adapter trained only at its class's score learns little of its own
    # and does not move the camera at another score (the default request's).
    motion_jitter: float = 0.0
    motion_jitter_max: float = 3.0
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
        if self.conditioning == "image" and (not self.video or self.data not in ("clips", "orbits")):
            raise ValueError("image-to-video trains a video model on clips (it needs each clip's first frame)")
        if self.stage == "spatial-hq" and (self.data != "images" or self.strategy != "spatial"):
            raise ValueError("the spatial-hq finetune trains the spatial layers only (strategy: spatial) on images")
        if (self.stage == "camera-lora") != (self.strategy == "lora"):
            raise ValueError("a camera-motion LoRA trains LoRA adapters only (strategy: lora), and only it does")
        if self.motion_class is not None:
            camera_lora.labels_of(self.motion_class)  # a known class, or a clear error
        if not 0.0 <= self.motion_jitter <= 1.0 or self.motion_jitter_max < 0:
            raise ValueError("motion_jitter is a share of the clips (0 to 1), motion_jitter_max a score (>= 0)")
        if (self.stage == "multiview") != (self.data == "orbits") or (
            self.stage == "multiview" and self.conditioning != "image"
        ):
            raise ValueError(
                "multi-view is image-to-video on orbits (stage: multiview, conditioning: image, data: orbits)"
            )
        if self.known_frames != "none":
            _check_known_frames(self)

    @property
    def video(self) -> bool:
        return self.stage != "image"

    @property
    def camera_motion(self) -> tuple[str, ...] | None:
        """Curation's camera-motion labels of the clips this config trains on (None: all)."""
        return camera_lora.labels_of(self.motion_class) if self.motion_class else None

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


class _ImageToVideoNetwork(torch.nn.Module):
    """SVD's UNet input: the noisy frames with the conditioning frame's latent
    concatenated channel-wise to every frame; the image embedding is the one token
    the UNet attends to."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        image: torch.Tensor,
        image_latent: torch.Tensor,
        added: torch.Tensor,
    ) -> torch.Tensor:
        every_frame = image_latent[:, None].expand(-1, x.shape[1], -1, -1, -1)
        return self.unet(torch.cat([x, every_frame], dim=2), c_noise, image, added_time_ids=added).sample


class VideoDiffusion(torch.nn.Module):
    """Trainable UNet + frozen condition encoder (`text` or `image`, the other is None)
    and VAE; `loss(batch)` for any stage."""

    def __init__(
        self,
        config: StageConfig,
        unet: torch.nn.Module,
        vae_folder: Path | None = None,
        codec: LatentCodec | None = None,
    ):
        super().__init__()
        register_tiny_models(config.cache_dir)
        self.config = config
        self.unet = unet
        self.text: TextEncoder | None = None
        self.image: ImageEncoder | None = None
        if config.conditioning == "image":
            encoder_name = config.image_model or IMAGE_MODELS[config.unet]
            self.image = ImageEncoder(encoder_name, Path(config.image_weights) if config.image_weights else None)
            width = self.image.width
        else:
            encoder_name = config.text_model or TEXT_MODELS[config.unet]
            self.text = TextEncoder(encoder_name, Path(config.text_weights) if config.text_weights else None)
            width = self.text.width
        if width != unet.config.cross_attention_dim:
            raise ValueError(
                f"{config.conditioning} model {encoder_name} gives {width}-wide embeddings; the UNet attends to "
                f"{unet.config.cross_attention_dim}"
            )
        vae = config.vae or vae_folder
        self.codec = codec or (LatentCodec.from_folder(vae) if vae else LatentCodec.tiny())
        if config.known_frames != "none":
            network = MaskedVideoNetwork(unet)
            expected = input_channels(self.codec.vae.config.latent_channels)
            if unet.config.in_channels != expected:
                raise ValueError(
                    f"a UNet given known frames takes {expected} input channels, not {unet.config.in_channels}"
                )
        elif config.conditioning == "image":
            network = _ImageToVideoNetwork(unet)
            expected = 2 * self.codec.vae.config.latent_channels
            if unet.config.in_channels != expected:
                raise ValueError(
                    f"an image-to-video UNet takes {expected} input channels, not {unet.config.in_channels}"
                )
        else:
            network = _VideoNetwork(unet) if config.video else _ImageNetwork(unet)
        self.denoiser = Denoiser(network)
        self._empty_text: torch.Tensor | None = None
        self._vae_fingerprint: str | None = None
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    @classmethod
    def create(cls, config: StageConfig, init_from: str | Path | None = None) -> VideoDiffusion:
        """Stage I from scratch (or an SD 2.1 folder); Stages II/III inflate or continue
        from `init_from` (a folder with a Stage I `unet/` or a video `unet/`, and maybe a `vae/`).
        Image-to-video widens a video UNet's input for the conditioning latent, or starts
        from an SVD-format folder (`StableVideoDiffusionPipeline`, e.g. the public SVD weights)."""
        from model import svd

        if init_from is not None and svd.is_svd_folder(Path(init_from)):
            return svd.load_svd_folder(config, Path(init_from))
        unet, vae = _networks(config, init_from)
        if config.conditioning == "image":
            unet = widen_input(unet, 2 * unet.config.out_channels)
        if config.known_frames != "none":
            unet = widen_input(unet, input_channels(unet.config.out_channels))
        if config.stage == "camera-lora":
            _camera_adapters(config, unet, init_from)
        return cls(config, unet, vae)

    def image_condition(
        self, images: torch.Tensor, noise_strength: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Image-to-video conditioning of frames (B, 3, H, W) in [-1, 1]: the CLIP embedding
        of the clean frame and the latent of the frame with noise of `noise_strength` (B,)."""
        latent = self.codec.condition_latent(noise_augmented(images, noise_strength, generator))
        return {"image": self.image(images), "image_latent": latent}

    def conditioning(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.config.conditioning == "image":
            return self._image_conditioning(batch, generator)
        text = self.text(list(batch["caption"]))
        if self._empty_text is None:  # the unconditional embedding never changes: encode it once
            self._empty_text = self.text([""])
        empty = self._empty_text
        kwargs = {"text": drop_conditions(text, empty, self.config.cond_dropout if self.training else 0.0, generator)}
        if self.config.video:
            strength = torch.zeros_like(batch["fps"], dtype=torch.float32)  # text-to-video: no conditioning image
            kwargs["added"] = added_time_ids(batch["fps"], self.training_motion(batch, generator), strength)
        return kwargs

    def _image_conditioning(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The clip's first frame, noise-augmented at a random strength that the model is told
        (micro-conditioning); dropped samples get zeros for both embedding and latent, the
        unconditional input of SVD's guidance."""
        frames = batch["video"][:, 0]
        strength = lognormal_sigmas(
            frames.shape[0], self.config.noise_aug_mean, self.config.noise_aug_std, generator=generator
        ).to(frames.device)
        cond = self.image_condition(frames, strength, generator)
        drop = dropped(frames.shape[0], self.config.cond_dropout if self.training else 0.0, generator)
        cond = {k: torch.where(per_sample(drop, v), torch.zeros_like(v), v) for k, v in cond.items()}
        motion = self.training_motion(batch, generator)
        return cond | {"added": self.time_ids(batch["fps"], strength, motion, batch.get("elevation"))}

    def training_motion(self, batch: dict, generator: torch.Generator) -> torch.Tensor | None:
        """The clips' motion scores, `motion_jitter` of them redrawn while training."""
        motion = batch.get("motion")
        if motion is None or not (self.training and self.config.motion_jitter):
            return motion
        redraw = dropped(len(motion), self.config.motion_jitter, generator)  # the clips that lose theirs
        drawn = torch.rand(motion.shape, generator=generator) * self.config.motion_jitter_max
        return torch.where(redraw.to(motion.device), drawn.to(motion.device), motion.float())

    def time_ids(
        self,
        fps: torch.Tensor,
        noise_strength: torch.Tensor,
        motion: torch.Tensor | None = None,
        elevation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-to-video micro-conditioning (B, 3): SVD's (fps, motion bucket, noise strength),
        or for multi-view (SVD-MV) the camera elevation in the motion bucket's place."""
        if self.config.stage == "multiview":
            if elevation is None:
                raise ValueError("a multi-view model is conditioned on the camera elevation: give one")
            return camera_time_ids(fps, elevation, noise_strength)
        return added_time_ids(fps, motion, noise_strength)

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
        if self.config.known_frames != "none":
            dropout = self.config.cond_dropout if self.training else 0.0
            cond |= training_condition(latents, self.config.known_frames, dropout, generator)
        if not self.config.video:  # Stage I trains on frames as images
            frames = latents.shape[1]
            latents = latents.flatten(0, 1)
            cond = {"text": cond["text"].repeat_interleave(frames, dim=0)}
        sigma = lognormal_sigmas(
            latents.shape[0], self.config.p_mean_at_resolution, self.config.p_std, generator=generator
        ).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        # A video model trained on images runs them with its temporal branches off (model/spatial.py).
        with images_only(self.unet) if self.config.video and self.config.data == "images" else nullcontext():
            return denoising_loss(self.denoiser, latents, sigma, noise=noise, **cond).mean()

    def save(self, folder: Path, unet: torch.nn.Module | None = None) -> Path:
        """A self-contained model folder: the trained UNet and the VAE as diffusers folders
        (`unet/`, `vae/`), the text tower's weights if any (`text_encoder/`) or the vision
        tower's (`image_encoder/`, always: it may come from an SVD folder), and the stage
        config (`stage.json`) that `load` rebuilds the rest from. `create(init_from=...)`
        starts the next stage from it. `unet`: a plain copy to save instead of a sharded one."""
        if camera_lora.adapter_names(self.unet):  # the base as it was, each adapter apart
            camera_lora.save_adapters(self.unet, folder)
            unet = unet or camera_lora.base_unet(self.unet)
        (unet or self.unet).save_pretrained(folder / "unet", safe_serialization=True)
        self.codec.vae.save_pretrained(folder / VAE_FOLDER, safe_serialization=True)
        config = replace(self.config, vae=None)  # the folder's own vae/
        if self.image is not None:
            (folder / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in self.image.visual.state_dict().items()},
                folder / IMAGE_FOLDER / IMAGE_WEIGHTS,
            )
            config = replace(config, image_weights=f"{IMAGE_FOLDER}/{IMAGE_WEIGHTS}")
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
        if config.image_weights and not Path(config.image_weights).is_absolute():
            config = replace(config, image_weights=str(folder / config.image_weights))
        return cls.create(config, init_from=folder)


def _camera_adapters(config: StageConfig, unet: torch.nn.Module, init_from: str | Path | None) -> None:
    """The adapters `init_from` already has, and the config's class: its saved adapter
    (a finetune continues it, a loaded model samples it) or a new one."""
    if config.motion_class is None:
        raise ValueError(
            f"a camera-motion LoRA learns one motion class: give one of {sorted(camera_lora.MOTION_CLASSES)}"
        )
    loaded = camera_lora.load_adapters(unet, Path(init_from)) if init_from is not None else []
    if config.motion_class not in loaded:
        camera_lora.add_adapter(unet, config.motion_class, config.lora_rank, config.lora_alpha)
    camera_lora.use_adapter(unet, config.motion_class)


def _check_known_frames(config: StageConfig) -> None:
    if not config.video or config.conditioning != "text":
        raise ValueError("known frames condition a text-to-video model")
    if config.strategy != "full":
        raise ValueError("known frames need strategy full: the UNet's new input channels (conv_in) must train")
    frames = config.clip.num_frames
    if config.known_frames == "interpolation" and (frames < KEY_EVERY + 1 or (frames - 1) % KEY_EVERY):
        raise ValueError(f"interpolation trains on clips of 4k + 1 frames (keys every {KEY_EVERY}), not {frames}")
    if config.known_frames == "prediction" and frames <= MAX_CONTEXT:
        raise ValueError(f"prediction trains on clips longer than its {MAX_CONTEXT} context frames, not {frames}")


def _networks(config: StageConfig, init_from: str | Path | None) -> tuple[torch.nn.Module, Path | None]:
    """The UNet a stage starts from and the VAE folder that comes with it, if any."""
    if init_from is None:
        image = image_unet(CONFIGS[config.unet])
        return (inflate(image) if config.video else image), None
    folder = Path(init_from)
    vae = folder / VAE_FOLDER if (folder / VAE_FOLDER / "config.json").exists() else None
    if not config.video:
        return load_image_unet(folder), vae
    unet_folder = folder / "unet" if (folder / "unet").exists() else folder
    class_name = json.loads((unet_folder / "config.json").read_text())["_class_name"]
    if class_name == "UNet2DConditionModel":
        return inflate(load_image_unet(folder)), vae
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel.from_pretrained(unet_folder), vae
