"""open_clip models built without downloads: registered tiny architectures for tests
and demos, seeded random initialisation (reproducible), weights from local files."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

TINY_CLIP_MODEL = "vdm-tiny-clip"
TINY_COCA_MODEL = "vdm-tiny-coca"
# The image-to-video tower: StableVideoDiffusionPipeline resizes its input to 224 x 224 whatever the
# tower, so the tiny one takes 224 too (large patches keep it as cheap as the 64-pixel one).
TINY_IMAGE_CLIP_MODEL = "vdm-tiny-clip-224"
# The open_clip text tower whose token width matches each UNet's cross-attention (SD 2.1: ViT-H-14).
TEXT_MODELS = {"tiny": TINY_CLIP_MODEL, "small": "ViT-L-14-quickgelu", "base": "ViT-H-14"}
# The open_clip vision tower whose embedding width matches each UNet's cross-attention (SVD: ViT-H-14).
IMAGE_MODELS = {"tiny": TINY_IMAGE_CLIP_MODEL, "small": "ViT-L-14-quickgelu", "base": "ViT-H-14"}

_TINY_VISION = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_TINY_CONFIGS = {
    TINY_CLIP_MODEL: {"embed_dim": 64, "vision_cfg": _TINY_VISION, "text_cfg": _TINY_TEXT},
    TINY_IMAGE_CLIP_MODEL: {
        "embed_dim": 64,
        "vision_cfg": {**_TINY_VISION, "image_size": 224, "patch_size": 32},
        "text_cfg": _TINY_TEXT,
    },
    TINY_COCA_MODEL: {
        "embed_dim": 64,
        "vision_cfg": {
            **_TINY_VISION,
            "attentional_pool": True,
            "attn_pooler_queries": 16,
            "attn_pooler_heads": 2,
            "output_tokens": True,
        },
        "text_cfg": {**_TINY_TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**_TINY_TEXT, "context_length": 76, "attn_pooler_heads": 2},
        "custom_text": True,
    },
}


def register_tiny_models(cache_dir: str | Path) -> None:
    """Make the tiny architectures known to open_clip (idempotent)."""
    import open_clip

    if all(name in open_clip.list_models() for name in _TINY_CONFIGS):
        return
    config_dir = Path(cache_dir) / "open_clip_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    for model, model_config in _TINY_CONFIGS.items():
        # Written aside and renamed: ranks of one job register at the same time, and
        # open_clip reads every *.json in the folder (a half-written one failed a CI run).
        partial = config_dir / f"{model}.json.{os.getpid()}.partial"
        partial.write_text(json.dumps(model_config, indent=2))
        os.replace(partial, config_dir / f"{model}.json")
    open_clip.add_model_config(config_dir)


@contextlib.contextmanager
def fixed_seed(seed: int = 0) -> Iterator[None]:
    """Random-initialised models come out the same in every process, so runs with random
    weights are reproducible (and a resumed run matches a clean one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build(name: str, weights: Path | None) -> torch.nn.Module:
    """An open_clip model in eval mode: `weights` (a local file) loaded, or seeded random."""
    import open_clip

    with fixed_seed():
        model = open_clip.create_model(name, pretrained=None)  # builds the architecture, downloads nothing
    if weights is not None:
        open_clip.load_checkpoint(model, str(weights))
    return model.eval()
