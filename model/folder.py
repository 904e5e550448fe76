"""The layout of a trained model's folder, defined once: what `VideoDiffusion.save`
writes, `VideoDiffusion.load` and the next stage read, the registry logs as the
pyfunc's artifact, and serving downloads.

    stage.json          the config (its `stage` is the kind, model/tasks), and which
                        parts hold random weights (`random_weights`: tests and demos)
    unet/               the trained UNet (diffusers); with adapters, the base under them
    vae/                the VAE (diffusers; a temporal decoder after that finetune)
    text_encoder/       the text tower's weights, when the config names a file
    image_encoder/      the vision tower's weights (image kinds)
    adapters/<name>/    camera-motion LoRA adapters, peft's format
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The config file's key listing the parts with random weights (not a config field: a fact about the weights).
RANDOM_WEIGHTS_KEY = "random_weights"


@dataclass(frozen=True)
class ModelFolder:
    root: Path

    CONFIG_FILE = "stage.json"
    UNET, VAE, TEXT_ENCODER, IMAGE_ENCODER, ADAPTERS = "unet", "vae", "text_encoder", "image_encoder", "adapters"
    IMAGE_WEIGHTS = "open_clip_vision.safetensors"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_file(self) -> Path:
        return self.root / self.CONFIG_FILE

    @property
    def unet(self) -> Path:
        return self.root / self.UNET

    @property
    def vae(self) -> Path:
        return self.root / self.VAE

    @property
    def text_encoder(self) -> Path:
        return self.root / self.TEXT_ENCODER

    @property
    def image_weights(self) -> Path:
        return self.root / self.IMAGE_ENCODER / self.IMAGE_WEIGHTS

    @property
    def adapters(self) -> Path:
        return self.root / self.ADAPTERS

    def has_vae(self) -> bool:
        return (self.vae / "config.json").exists()

    def raw_config(self) -> dict:
        if not self.config_file.exists():
            raise ValueError(f"{self.root} is not a model folder: it has no {self.CONFIG_FILE}")
        return json.loads(self.config_file.read_text())

    def kind(self) -> str:
        """The kind of model the folder holds (model/tasks)."""
        return self.raw_config()["stage"]

    def random_weights(self) -> tuple[str, ...]:
        """The parts (vae, text, image) that hold seeded random weights, not trained or
        imported ones: tests and demos only. `save` records them beside the config."""
        if not self.config_file.exists():
            return ()
        return tuple(self.raw_config().get(RANDOM_WEIGHTS_KEY, ()))

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))
