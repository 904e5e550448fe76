"""The three training stages and the finetunes as one model: a frozen condition encoder
(text, or the conditioning frame for image-to-video) + frozen VAE + a UNet (2D for
Stage I, spatio-temporal for the rest) behind EDM's preconditioning. A config names
its kind (`stage`, a `model.tasks` kind), which decides the network's inputs, the
training conditioning and the data; the rest is resolution, frames, noise-level shift
and what trains."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors.torch import save_file

from model import camera_lora, svd
from model.conditioning import (
    ImageEncoder,
    LatentCodec,
    TextEncoder,
    added_time_ids,
    drop_conditions,
    noise_augmented,
)
from model.config_fields import typed_fields, typed_section
from model.data import ClipSpec
from model.diffusion import Denoiser, denoising_loss, lognormal_sigmas, shifted_p_mean
from model.folder import RANDOM_WEIGHTS_KEY, ModelFolder
from model.latents import vae_fingerprint
from model.networks import CONFIGS, enable_checkpointing, image_unet, inflate, load_image_unet, load_video_unet
from model.openclip import IMAGE_MODELS, TEXT_MODELS, register_tiny_models
from model.spatial import images_only
from model.tasks import NoOptions, Task, task_of
from model.training import OptimConfig, Strategy

# Resolution at which p_mean is given; larger stages shift towards more noise.
BASE_PIXELS = 64 * 64


@dataclass(frozen=True)
class StageConfig:
    """The fields every kind shares; `options` holds the kind's own (its `Options`),
    written flat beside these in YAML and `stage.json`."""

    stage: str  # the kind (model/tasks): image, video, hq, i2v, camera-lora, ...
    unet: str = "tiny"  # a named UNetConfig
    strategy: Strategy = "full"
    clip: ClipSpec = ClipSpec()
    # clips: curated video shards; images: a WebDataset of images (Stage I, spatial finetunes);
    # latents: clips cached by `vdm cache-latents` for this stage and VAE;
    # orbits: turntable views with their camera elevation (multi-view).
    data: Literal["clips", "images", "latents", "orbits"] = "clips"
    p_mean: float = -1.2
    p_std: float = 1.2
    text_model: str | None = None  # open_clip model; None: the one matching `unet` (TEXT_MODELS)
    # Local path of open_clip weights (relative: inside the model folder); None: seeded random (tests).
    text_weights: str | None = None
    image_model: str | None = None  # open_clip vision tower; None: the one matching `unet` (IMAGE_MODELS)
    # Local path of the vision tower's weights (safetensors; relative: inside the model folder).
    image_weights: str | None = None
    # A diffusers VAE folder (e.g. a copy of SD 2.1, or `vdm train-vae`'s output); None: the
    # `vae/` of the folder the model starts from, else a seeded random tiny VAE (tests).
    vae: str | None = None
    # Tests and demos only (the tiny configs): seeded random VAE and condition towers where no
    # weights are named. Any other config names every weight it uses, or the model refuses to build.
    allow_random_weights: bool = False
    cond_dropout: float = 0.1
    batch_size: int = 2
    max_steps: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    gradient_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks: replicate (DDP) or shard (FSDP2)
    sample_every: int | None = None  # also generate the sample prompts every N steps (None: only at the end)
    sample_prompts: tuple[str, ...] = ("",)
    sample_steps: int = 20
    # The validation loss (model/train.py): clips held out of training, measured every N steps.
    validation_clips: int = 2  # 0: no validation loss, nothing held out
    validate_every: int = 100  # 0: only at the start and the end
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache_dir: str = ".vdm/cache/models"
    options: object = NoOptions()  # the kind's own fields (its task's Options)

    def __post_init__(self):
        if not isinstance(self.options, self.task.Options):
            raise ValueError(f"a {self.stage!r} config takes {self.task.Options.__name__}, not {self.options!r}")
        self.task.check(self)

    @property
    def task(self) -> Task:
        return task_of(self.stage)

    @property
    def video(self) -> bool:
        return self.task.video

    @property
    def p_mean_at_resolution(self) -> float:
        return shifted_p_mean(self.p_mean, self.clip.height * self.clip.width, BASE_PIXELS)

    def with_fields(self, **values) -> StageConfig:
        """A copy with shared fields or the kind's option fields replaced."""
        own = {k: v for k, v in values.items() if k in {f.name for f in fields(self.options)}}
        shared = {k: v for k, v in values.items() if k not in own}
        unknown = set(shared) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not config fields of a {self.stage!r} model")
        return replace(self, **shared, **({"options": replace(self.options, **own)} if own else {}))

    def to_dict(self) -> dict:
        """Flat: shared fields and the kind's options side by side (what `from_dict` reads)."""
        raw = asdict(self)
        return raw | raw.pop("options")

    @classmethod
    def from_dict(cls, raw: dict) -> StageConfig:
        raw = dict(raw)
        if "stage" not in raw:
            raise ValueError("a config names its kind of model: `stage: <kind>`")
        # The kind's, not the config's (older folders hold them), and the folder's record of random weights.
        for derived in ("conditioning", "known_frames", RANDOM_WEIGHTS_KEY):
            raw.pop(derived, None)
        shared = {f.name for f in fields(cls)} - {"options"}
        options = task_of(raw["stage"]).options({k: raw.pop(k) for k in list(raw) if k not in shared})
        clip = typed_section(ClipSpec, raw.pop("clip", {}), "clip")
        optim = typed_section(OptimConfig, raw.pop("optim", {}), "optim")
        return cls(**typed_fields(cls, raw), clip=clip, optim=optim, options=options)

    @classmethod
    def load(cls, path: str | Path) -> StageConfig:
        return cls.load_text(Path(path).read_text())

    @classmethod
    def load_text(cls, text: str) -> StageConfig:
        """A config from its YAML."""
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ValueError("a config is a YAML mapping of its fields")
        return cls.from_dict(raw)


NAMED_CONFIGS = Path(__file__).parent / "configs"


def config_names() -> list[str]:
    """The shipped config sizes (tiny, small, svd): model/configs/<size>-<kind>.yaml."""
    return sorted({p.name.split("-")[0] for p in NAMED_CONFIGS.glob("*.yaml")})


def named_config(name_or_path: str, stage: str) -> StageConfig:
    """`tiny` -> model/configs/tiny-<stage>.yaml (likewise `small`, `svd`); anything else is a path."""
    path = NAMED_CONFIGS / f"{name_or_path}-{stage}.yaml"
    if not path.exists() and not Path(name_or_path).is_file():
        raise ValueError(f"no config {name_or_path!r}: a shipped size ({', '.join(config_names())}) or a YAML file")
    config = StageConfig.load(path if path.exists() else name_or_path)
    if config.stage != stage:
        raise ValueError(f"{name_or_path} is a {config.stage!r} config, not {stage!r}")
    return config


class VideoDiffusion(torch.nn.Module):
    """Trainable UNet + frozen condition encoder (`text` or `image`, the other is None)
    and VAE; `loss(batch)` for any kind (its task builds the inputs)."""

    def __init__(
        self,
        config: StageConfig,
        unet: torch.nn.Module,
        vae_folder: Path | None = None,
        codec: LatentCodec | None = None,
        image_state: dict[str, torch.Tensor] | None = None,
        inherited_random: tuple[str, ...] = (),
    ):
        """`image_state`: the vision tower's weights, given (an SVD folder's); `inherited_random`:
        parts taken from a folder that holds them with random weights."""
        super().__init__()
        register_tiny_models(config.cache_dir)
        self.config = config
        self.task = config.task
        self.unet = unet
        self.text: TextEncoder | None = None
        self.image: ImageEncoder | None = None
        vae = config.vae or vae_folder
        # Parts with seeded random weights: refused unless the config allows them (tests, demos).
        built = random_weights_of(config, vae is not None or codec is not None, image_state is not None)
        self.random_weights: tuple[str, ...] = tuple(sorted({*built, *inherited_random}))
        if self.random_weights and not config.allow_random_weights:
            raise ValueError(missing_weights_message(config, self.random_weights))
        if self.task.conditioning == "image":
            encoder_name = config.image_model or IMAGE_MODELS[config.unet]
            self.image = ImageEncoder(encoder_name, _local(config.image_weights, "image_weights"))
            if image_state is not None:
                self.image.visual.load_state_dict(image_state)
            width = self.image.width
        else:
            encoder_name = config.text_model or TEXT_MODELS[config.unet]
            self.text = TextEncoder(encoder_name, _local(config.text_weights, "text_weights"))
            width = self.text.width
        if width != unet.config.cross_attention_dim:
            raise ValueError(
                f"{self.task.conditioning} model {encoder_name} gives {width}-wide embeddings; the UNet attends to "
                f"{unet.config.cross_attention_dim}"
            )
        self.codec = codec or (LatentCodec.from_folder(_local(vae, "vae")) if vae else LatentCodec.tiny())
        expected = self.task.input_channels(self.codec.vae.config.latent_channels)
        if unet.config.in_channels != expected:
            raise ValueError(f"a {self.task.name} UNet takes {expected} input channels, not {unet.config.in_channels}")
        self.denoiser = Denoiser(self.task.network(unet))
        self._empty_text: torch.Tensor | None = None
        self._vae_fingerprint: str | None = None
        if config.gradient_checkpointing:
            enable_checkpointing(unet)

    @classmethod
    def create(cls, config: StageConfig, init_from: str | Path | None = None) -> VideoDiffusion:
        """Stage I from scratch (or an SD 2.1 folder); Stages II/III inflate or continue
        from `init_from` (a folder with a Stage I `unet/` or a video `unet/`, and maybe a `vae/`);
        a finetune's task prepares the UNet it starts from (a wider input, adapters).
        Image kinds may also start from an SVD-format folder (`StableVideoDiffusionPipeline`,
        e.g. the public SVD weights)."""
        folder = Path(init_from) if init_from is not None else None
        if folder is not None and svd.is_svd_folder(folder):
            return cls._from_svd_folder(config, folder)
        has_vae = config.vae is not None or (folder is not None and ModelFolder(folder).has_vae())
        missing = random_weights_of(config, has_vae, has_image_state=False)
        if missing and not config.allow_random_weights:  # before building a full-size UNet for nothing
            raise ValueError(missing_weights_message(config, missing))
        unet, vae = _networks(config, folder)
        inherited = _inherited_random_weights(config, folder) if folder is not None else ()
        return cls(config, config.task.prepare_unet(unet, config, folder), vae, inherited_random=inherited)

    @classmethod
    def _from_svd_folder(cls, config: StageConfig, folder: Path) -> VideoDiffusion:
        """An image-to-video model from a StableVideoDiffusionPipeline folder: its UNet under our
        preconditioning, its VAE (latents rescaled to ours), its image encoder as the
        open_clip tower it converts to."""
        if config.task.conditioning != "image":
            raise ValueError(f"an SVD folder starts image-to-video models only, not {config.stage!r}")
        register_tiny_models(config.cache_dir)  # the candidate towers must be known to open_clip
        unet, codec, (name, vision) = svd.load_svd_parts(folder)
        return cls(
            replace(config, image_model=name, image_weights=None, vae=None), unet, codec=codec, image_state=vision
        )

    def image_condition(
        self, images: torch.Tensor, noise_strength: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Image-to-video conditioning of frames (B, 3, H, W) in [-1, 1]: the CLIP embedding
        of the clean frame and the latent of the frame with noise of `noise_strength` (B,)."""
        latent = self.codec.condition_latent(noise_augmented(images, noise_strength, generator))
        return {"image": self.image(images), "image_latent": latent}

    def text_condition(
        self, batch: dict, generator: torch.Generator, micro_conditioning: bool = True
    ) -> dict[str, torch.Tensor]:
        """The captions' tokens (some dropped to the empty prompt's while training) and SVD's
        micro-conditioning (fps, motion score; no conditioning image)."""
        text = self.text(list(batch["caption"]))
        if self._empty_text is None:  # the unconditional embedding never changes: encode it once
            self._empty_text = self.text([""])
        dropout = self.config.cond_dropout if self.training else 0.0
        kwargs = {"text": drop_conditions(text, self._empty_text, dropout, generator)}
        if micro_conditioning:
            strength = torch.zeros_like(batch["fps"], dtype=torch.float32)
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

    def loss(self, batch: dict, generator: torch.Generator, sigma: float | None = None) -> torch.Tensor:
        """Every random draw (latent sample, dropout, noise level, noise) comes from
        `generator`, which checkpoints save: a resumed run repeats the same draws.
        `sigma`: one noise level for the whole batch instead of drawn ones (the validation loss)."""
        latents, cond = self.task.training_inputs(self, batch, self.latents(batch, generator), generator)
        if sigma is None:
            sigma = lognormal_sigmas(
                latents.shape[0], self.config.p_mean_at_resolution, self.config.p_std, generator=generator
            ).to(latents.device)
        else:
            sigma = torch.full((latents.shape[0],), sigma, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        # A video model trained on images runs them with its temporal branches off (model/spatial.py).
        with images_only(self.unet) if self.config.video and self.config.data == "images" else nullcontext():
            return denoising_loss(self.denoiser, latents, sigma, noise=noise, **cond).mean()

    def save(self, folder: Path, unet: torch.nn.Module | None = None) -> Path:
        """A self-contained model folder (model/folder.py): the trained UNet and the VAE as
        diffusers folders, the text tower's weights if any or the vision tower's (always:
        it may come from an SVD folder), and the config that `load` rebuilds the rest from.
        `create(init_from=...)` starts the next stage from it. `unet`: a plain copy to save
        instead of a sharded one."""
        layout = ModelFolder(folder)
        if camera_lora.adapter_names(self.unet):  # the base as it was, each adapter apart
            camera_lora.save_adapters(self.unet, folder)
            unet = unet or camera_lora.base_unet(self.unet)
        (unet or self.unet).save_pretrained(layout.unet, safe_serialization=True)
        self.codec.vae.save_pretrained(layout.vae, safe_serialization=True)
        config = replace(self.config, vae=None)  # the folder's own vae/
        if self.image is not None:
            layout.image_weights.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in self.image.visual.state_dict().items()}
            save_file(state, layout.image_weights)
            config = replace(config, image_weights=layout.relative(layout.image_weights))
        if self.config.text_weights:
            weights = Path(self.config.text_weights)
            layout.text_encoder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, layout.text_encoder / weights.name)
            config = replace(config, text_weights=layout.relative(layout.text_encoder / weights.name))
        record = {RANDOM_WEIGHTS_KEY: list(self.random_weights)} if self.random_weights else {}
        layout.config_file.write_text(json.dumps(config.to_dict() | record, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> VideoDiffusion:
        """A model saved by `save`, ready to sample."""
        folder = Path(folder)
        config = StageConfig.from_dict(ModelFolder(folder).raw_config())
        if config.text_weights and not Path(config.text_weights).is_absolute():
            config = replace(config, text_weights=str(folder / config.text_weights))
        if config.image_weights and not Path(config.image_weights).is_absolute():
            config = replace(config, image_weights=str(folder / config.image_weights))
        return cls.create(config, init_from=folder)


# Where each part's weights are named, and what to name them with.
_WEIGHT_FIELDS = {
    "vae": "vae: a diffusers VAE or pipeline folder (e.g. weights:sd21), or --init-from a folder with a vae/",
    "text": "text_weights: an open_clip checkpoint of the text tower (e.g. weights:open-clip-vit-h-14)",
    "image": "image_weights: an open_clip checkpoint of the vision tower (e.g. weights:open-clip-vit-h-14)",
}


def random_weights_of(config: StageConfig, has_vae: bool, has_image_state: bool) -> tuple[str, ...]:
    """The parts a model of `config` would build with seeded random weights."""
    parts = [] if has_vae else ["vae"]
    if config.task.conditioning == "image":
        parts += [] if config.image_weights or has_image_state else ["image"]
    else:
        parts += [] if config.text_weights else ["text"]
    return tuple(sorted(parts))


def missing_weights_message(config: StageConfig, parts: tuple[str, ...]) -> str:
    named = "; ".join(_WEIGHT_FIELDS[p] for p in parts)
    return (
        f"this {config.stage} config ({config.unet} UNet) has no weights for the {', '.join(parts)}: name them "
        f"({named}) after importing them once with `vdm weights import NAME PATH` (docs/training.md). "
        "Random weights are for the tiny configs (tests and demos) only."
    )


def _local(path: str | Path | None, field_name: str) -> Path | None:
    """A weights location the model can open: a local path (weights:NAME and s3:// are resolved
    into local copies by whoever builds the model from a request: the training and evaluation steps)."""
    if path is None:
        return None
    if str(path).startswith(("weights:", "s3://")):
        raise ValueError(f"{field_name} {path} must be resolved to a local copy before the model is built")
    return Path(path)


def _inherited_random_weights(config: StageConfig, folder: Path) -> tuple[str, ...]:
    """The parts this model takes from `folder` that hold random weights there."""
    recorded = ModelFolder(folder).random_weights()
    inside = str(folder.resolve())
    taken = {
        "vae": config.vae is None,
        "text": config.text_weights is None or str(Path(config.text_weights).resolve()).startswith(inside),
        "image": config.image_weights is None or str(Path(config.image_weights).resolve()).startswith(inside),
    }
    return tuple(p for p in recorded if taken[p])


def _networks(config: StageConfig, init_from: Path | None) -> tuple[torch.nn.Module, Path | None]:
    """The UNet a stage starts from and the VAE folder that comes with it, if any."""
    if init_from is None:
        image = image_unet(CONFIGS[config.unet])
        return (inflate(image) if config.video else image), None
    folder, layout = init_from, ModelFolder(init_from)
    vae = layout.vae if layout.has_vae() else None
    if not config.video:
        return load_image_unet(folder), vae
    unet_folder = layout.unet if layout.unet.exists() else folder
    class_name = json.loads((unet_folder / "config.json").read_text())["_class_name"]
    if class_name == "UNet2DConditionModel":
        return inflate(load_image_unet(folder)), vae
    return load_video_unet(unet_folder), vae
