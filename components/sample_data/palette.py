"""A synthetic "high-quality" image set for the image-only spatial finetune: the moving-
shapes data's discs, drawn as lossless PNGs in fully saturated colours (HSV saturation
1: one channel at 255, one at 0) where the video data's discs have random, mostly
greyish colours (each channel uniform in 96..255, saturation about 0.3) and pass
through a lossy video codec. The saturation of the generated object is the image-quality
proxy whose target is known (model/spatial.py)."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import webdataset as wds

from components.sample_data.render import draw_shapes


def saturated_color(hue: float) -> np.ndarray:
    """RGB uint8 of `hue` (0..1) at full saturation and value."""
    return np.array([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0)], np.uint8)


def write_palette_image_shards(
    folder: Path,
    *,
    shards: int = 2,
    images_per_shard: int = 8,
    size: int = 64,
    radius_range: tuple[float, float] = (5.0, 7.0),
    seed: int = 0,
) -> tuple[list[Path], dict[str, dict]]:
    """Writes `palette-NNNNNN.tar` files (`<key>.png` + `<key>.json` with a caption);
    returns their paths and, per key, the truth (position, radius, colour)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for s in range(shards):
        path = folder / f"palette-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as tar:
            for i in range(images_per_shard):
                key = f"palette-{seed:04d}-{s:04d}-{i:04d}"
                rng = np.random.default_rng(seed * 100_003 + s * 1009 + i)
                radius = rng.uniform(*radius_range)
                centre = rng.uniform(radius, size - radius, size=2)
                color = saturated_color(rng.random())
                image = np.zeros((size, size, 3), np.uint8)
                draw_shapes(image, centre[None], np.array([radius]), color[None])
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                tar.write({"__key__": key, "png": png.getvalue(), "json": {"key": key, "caption": "a disc on black"}})
                truth[key] = {"position": centre.tolist(), "radius": float(radius), "color": color.tolist()}
        paths.append(path)
    return paths, truth
