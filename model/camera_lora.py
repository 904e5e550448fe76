"""Camera-motion LoRA (SVD's camera-motion finetune): LoRA modules (peft) in the temporal
attention of a frozen video UNet, one adapter per motion class, each trained on the clips
that curation labelled with that class's camera motion.

A model folder holds the base UNet unchanged (`unet/`) and each adapter apart, in peft's
own format (`adapters/<class>/adapter_config.json` + `adapter_model.safetensors`, about
50 kB for the tiny UNet): a later finetune adds its adapter next to the others, and
`use_adapter` switches between them (or back to the base) at sampling time without
reloading anything.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from model.folder import ModelFolder
from model.records import PAN_LEFT, PAN_RIGHT, STATIC, ZOOM_IN, ZOOM_OUT, CameraMotion

if TYPE_CHECKING:  # the CLI reads MOTION_CLASSES without paying for torch
    import torch

# Motion class -> the curation labels (model/records.py CAMERA_MOTIONS) of its training clips.
# `pan` is horizontal either way (SVD's "horizontal" class); the sign is left to the sampler.
# Zoom has a class per direction (as AnimateDiff's MotionLoRAs): one adapter trained on both
# under one caption learnt neither clearly (benchmarks/camera_lora_evidence, README).
MOTION_CLASSES: dict[str, tuple[CameraMotion, ...]] = {
    "pan": (PAN_LEFT, PAN_RIGHT),
    ZOOM_IN: (ZOOM_IN,),
    ZOOM_OUT: (ZOOM_OUT,),
    STATIC: (STATIC,),
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Query, key, value and output projections of the temporal transformer blocks' attention
# (attn1: frames attend to each other; attn2: to the text). A plain suffix list would also
# wrap the spatial attention.
TEMPORAL_ATTENTION = r".*temporal_transformer_blocks\.\d+\.attn\d\.(to_q|to_k|to_v|to_out\.0)"


def labels_of(motion_class: str) -> tuple[str, ...]:
    if motion_class not in MOTION_CLASSES:
        raise ValueError(f"unknown motion class {motion_class!r}; one of {sorted(MOTION_CLASSES)}")
    return MOTION_CLASSES[motion_class]


def lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEMPORAL_ATTENTION, init_lora_weights=True)


def _lora_layers(unet: torch.nn.Module) -> list:
    if "peft" not in sys.modules:  # no adapter was ever injected: other models do not pay for importing peft
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(unet: torch.nn.Module) -> list[str]:
    return sorted({name for layer in _lora_layers(unet) for name in layer.lora_A})


def add_adapter(unet: torch.nn.Module, name: str, rank: int, alpha: float) -> None:
    """A new adapter `name` (B at zero: the model computes what the base does until it trains)."""
    if name in adapter_names(unet):
        raise ValueError(f"the UNet already has an adapter {name!r}")
    _inject(lora_config(rank, alpha), unet, name)


def _inject(config, unet: torch.nn.Module, name: str) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # several adapters in one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, unet, adapter_name=name)


def is_adapter_weight(parameter_name: str, adapter: str) -> bool:
    """Whether a UNet parameter is one of `adapter`'s LoRA matrices."""
    return re.search(rf"\.lora_[AB]\.{re.escape(adapter)}\.", parameter_name) is not None


def load_adapters(unet: torch.nn.Module, folder: Path) -> list[str]:
    """Every adapter saved under `folder/adapters/`, injected under its folder's name."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = []
    for path in sorted(ModelFolder(folder).adapters.glob(f"*/{ADAPTER_CONFIG}")):
        name = path.parent.name
        config = LoraConfig.from_pretrained(str(path.parent))
        _inject(config, unet, name)
        result = set_peft_model_state_dict(unet, load_file(path.parent / ADAPTER_WEIGHTS), adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(f"adapter {name} does not fit this UNet: {result.unexpected_keys[:3]}")
        loaded.append(name)
    return loaded


def save_adapters(unet: torch.nn.Module, folder: Path) -> list[str]:
    """Each adapter of `unet` to `folder/adapters/<name>/` in peft's format (the files
    `PeftModel.from_pretrained` reads)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    names = adapter_names(unet)
    for name in names:
        target = ModelFolder(folder).adapters / name
        target.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(unet, adapter_name=name)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, target / ADAPTER_WEIGHTS)
        layer = next(m for m in _lora_layers(unet) if name in m.lora_A)
        config = lora_config(layer.r[name], layer.lora_alpha[name])
        config.save_pretrained(str(target))
    return names


def base_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of the base UNet under the adapters (what `unet/` of a folder holds)."""
    from model.networks import unet_from_config

    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain = unet_from_config(type(unet), unet.config)
    plain.load_state_dict(state)
    return plain


def use_adapter(unet: torch.nn.Module, adapter: str | None, strength: float = 1.0) -> None:
    """Sample with `adapter` active, or with none (the base model). Only which LoRA
    modules run, and how strongly, changes: no weights are loaded, and what trains stays as
    it was (peft's switch also freezes and unfreezes; that is training's business, not
    sampling's). `strength` multiplies the adapter's update to the base weights (1: as
    trained; above 1 exaggerates its motion, as a LoRA weight does in SD tools)."""
    names = adapter_names(unet)
    if adapter is not None and adapter not in names:
        raise ValueError(f"this model has no camera-motion adapter {adapter!r}; it has {names or 'none'}")
    if not names:
        return
    trains = {p: p.requires_grad for p in unet.parameters()}
    for layer in _lora_layers(unet):
        if adapter is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(adapter)
            layer.set_scale(adapter, strength)
            layer.enable_adapters(True)
    for parameter, flag in trains.items():
        parameter.requires_grad_(flag)


def saved_adapters(folder: Path) -> list[str]:
    """The adapters a model folder holds."""
    return sorted(p.parent.name for p in ModelFolder(folder).adapters.glob(f"*/{ADAPTER_CONFIG}"))
