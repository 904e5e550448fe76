"""Image-only spatial finetune (VideoCrafter2): after video training, only the spatial
layers of the video UNet train, on a high-quality image set; the temporal layers keep
the motion they learned, bit for bit.

An image is a one-frame clip. The video UNet runs it with its temporal branches
switched off: diffusers' spatio-temporal blocks take an `image_only_indicator`, and
where it is 1 their `AlphaBlender`s ("learned_with_images", SVD's joint image/video
training) pass the spatial output on alone. `UNetSpatioTemporalConditionModel.forward`
always builds it as zeros, so `images_only` overrides it on the blocks' calls.

The image-quality proxy, with a known target: the synthetic high-quality set
(`components/sample_data/palette.py`) draws its discs in fully saturated colours,
the video data in unsaturated ones; `foreground_saturation` measures it on frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def _image_only(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, kwargs | {"image_only_indicator": torch.ones_like(kwargs["image_only_indicator"])}


@contextmanager
def images_only(unet: torch.nn.Module) -> Iterator[None]:
    """The video UNet's forward passes treat every frame as an independent image (temporal
    branches off) for the duration."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    handles = [block.register_forward_pre_hook(_image_only, with_kwargs=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def foreground_saturation(frames: torch.Tensor, threshold: float = 0.5) -> float:
    """Mean HSV saturation ((max - min) / max of RGB) of the pixels brighter than
    `threshold` of each frame's luma range (the object `evaluation.track` follows),
    weighted as there; frames (T, 3, H, W) in [-1, 1]."""
    rgb = (frames.float().clamp(-1, 1) + 1) / 2
    luma = rgb.mean(dim=1)
    lo = luma.amin(dim=(1, 2), keepdim=True)
    hi = luma.amax(dim=(1, 2), keepdim=True)
    weight = ((luma - lo) / (hi - lo).clamp(min=1e-6) > threshold).float() * (luma - lo)
    top, bottom = rgb.amax(dim=1), rgb.amin(dim=1)
    saturation = (top - bottom) / top.clamp(min=1e-6)
    return float((weight * saturation).sum() / weight.sum().clamp(min=1e-6))


def palette_report(generated: list[torch.Tensor], images: list[torch.Tensor], clips: list[torch.Tensor]) -> dict:
    """The image-quality proxy: foreground saturation of generated frames against the
    high-quality image set's (`saturation_gap`, lower is better) and the video data's."""
    generated_saturation = float(np.mean([foreground_saturation(v) for v in generated]))
    image_saturation = float(np.mean([foreground_saturation(i) for i in images]))
    return {
        "generated_saturation": generated_saturation,
        "image_set_saturation": image_saturation,
        "video_data_saturation": float(np.mean([foreground_saturation(c) for c in clips])),
        "saturation_gap": abs(image_saturation - generated_saturation),
    }


def evaluate_palette(
    model, shards: list[str], reference: list[str], generated: list[torch.Tensor], *, clips: int
) -> dict:
    """`palette_report` of `generated` videos against the first `clips` images of the image
    set `reference` and the first `clips` clips of the video data `shards`, both at the
    model's size, centre-cropped."""
    import itertools

    from model.data import ClipDataset, ImageDataset

    if not reference:
        raise ValueError("the image-quality proxy compares with the high-quality image set: give its shards")
    spec = model.config.clip
    images = ImageDataset(reference, spec.height, spec.width, random_crop=False)
    data = ClipDataset(shards, spec, random_crop=False, heldout=True)
    return palette_report(
        generated,
        [item["video"] for item in itertools.islice(iter(images), clips)],
        [item["video"] for item in itertools.islice(iter(data), clips)],
    )
