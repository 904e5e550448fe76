"""The video networks FVD's features come from, loaded from imported weights: the
Kinetics-400 I3D (`fvd`; an `i3d` weights entry, one checkpoint file) and a self-supervised
VideoMAE (`fvd_content_debiased`; a transformers folder imported as a `diffusers` entry).
Without weights a network is seeded random, and only where random networks are allowed
(tests and the tiny demo: the figures then mean nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from components.common import weights
from components.common.objectstore import ObjectStore
from components.curation.neural import RandomWeightsNotAllowed, resolve_weights
from model.fvd import VideoMAEFeatures
from model.i3d import InceptionI3d
from model.openclip import fixed_seed

I3D_WEIGHTS = "i3d-kinetics-400"  # the name docs/evaluation.md imports the checkpoint under
VIDEOMAE_WEIGHTS = "videomae-base"


def _refuse(network: str, name: str, what: str) -> None:
    raise RandomWeightsNotAllowed(
        f"no weights for the {network}: import the public {what} once (`vdm weights import {name} PATH`, "
        f"docs/evaluation.md) and configure weights:{name}, or allow random networks (tests and demos only: "
        "the figures mean nothing)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (.safetensors, or a torch file read with
    weights_only): a `state_dict` wrapper and DataParallel's `module.` prefixes removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_i3d(
    ref: str | None, store: ObjectStore | None, cache_dir: str | Path, *, allow_random: bool
) -> tuple[InceptionI3d, bool]:
    """The I3D in eval mode and whether its weights are random. `ref`: weights:NAME, a local
    checkpoint file or an s3:// URI; None: seeded random weights, if `allow_random`."""
    if ref is None:
        if not allow_random:
            _refuse("I3D (FVD's features)", I3D_WEIGHTS, "checkpoint i3d_pretrained_400.pt")
        with fixed_seed():
            return InceptionI3d().eval(), True
    path = resolve_weights(ref, cache_dir, store)
    # A local file was never checked at import: a wrong one fails here in one line naming the keys.
    checked = weights.check_weights(path, kind="i3d")
    network = InceptionI3d(num_classes=int(checked.architecture.rsplit("-", 1)[1]))
    state = read_state_dict(path)
    # Checkpoints converted from TF (VideoGPT's) have no num_batches_tracked: unused at inference.
    state = {k: v for k, v in network.state_dict().items() if k.endswith("num_batches_tracked")} | state
    network.load_state_dict(state)
    return network.eval(), False


def load_videomae(
    ref: str | None,
    store: ObjectStore | None,
    cache_dir: str | Path,
    *,
    allow_random: bool,
    random_config: dict[str, Any] | None = None,
) -> tuple[VideoMAEFeatures, bool]:
    """The VideoMAE encoder in eval mode and whether its weights are random. `ref`:
    weights:NAME (or its s3:// URI) or a local transformers folder; None: seeded random
    weights of `random_config` (default VideoMAE-base's), if `allow_random`."""
    if ref is None:
        if not allow_random:
            _refuse("self-supervised VideoMAE (fvd_content_debiased)", VIDEOMAE_WEIGHTS, "transformers folder")
        with fixed_seed():
            return VideoMAEFeatures.from_config(random_config or {}).eval(), True
    folder = weights.resolve_weights(ref, store, cache_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers VideoMAE folder (no config.json)")
    return VideoMAEFeatures.from_pretrained(str(folder)).eval(), False
