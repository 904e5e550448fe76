"""Training shards in curation's format (`<key>.mp4` + `<key>.json`) from the
moving-shapes generator: clips whose per-frame object positions are known, for
training tests and the motion evaluation before (or without) real curated data."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds

from components.common.media import write_video
from components.sample_data.render import moving_shapes


def write_shapes_shards(
    folder: Path,
    *,
    shards: int = 2,
    clips_per_shard: int = 4,
    num_frames: int = 24,
    fps: float = 24.0,
    height: int = 64,
    width: int = 64,
    max_speed: float = 1.5,
    seed: int = 0,
) -> tuple[list[Path], dict[str, dict]]:
    """Writes `shard-NNNNNN.tar` files; returns their paths and, per clip key, its truth
    (positions per frame, velocities, radii)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as tar, tempfile.TemporaryDirectory() as tmp:
            for c in range(clips_per_shard):
                key = f"shapes-{seed:04d}-{s:04d}-{c:04d}"
                clip = moving_shapes(
                    num_frames,
                    height,
                    width,
                    num_shapes=1,
                    max_speed=max_speed,
                    radius_range=(5, 7),
                    seed=seed * 100_003 + s * 1009 + c,
                )
                video = Path(tmp) / f"{key}.mp4"
                write_video(video, clip.frames, fps)
                speed = float(np.linalg.norm(clip.velocities, axis=1).mean())
                meta = {
                    "key": key,
                    "video": key,
                    "start_frame": 0,
                    "end_frame": num_frames,
                    "start_s": 0.0,
                    "end_s": num_frames / fps,
                    "fps": fps,
                    "kept": True,
                    "drop_reasons": [],
                    "scores": {"motion": speed, "text_ratio": 0.0, "aesthetic": 0.0, "clip_sim": 0.0},
                    "camera_motion": "static",
                    "caption": "a disc moving on black",
                }
                tar.write({"__key__": key, "mp4": video.read_bytes(), "json": meta})
                truth[key] = {
                    "positions": clip.positions.tolist(),
                    "velocities": clip.velocities.tolist(),
                    "radii": clip.radii.tolist(),
                }
        paths.append(path)
    return paths, truth


def write_image_shards(
    folder: Path, *, shards: int = 2, images_per_shard: int = 8, size: int = 64, seed: int = 0
) -> tuple[list[Path], dict[str, dict]]:
    """Image shards (`<key>.png` + `<key>.json` with a caption) for Stage I and image-only
    finetunes: discs at known positions. Returns the paths and, per key, the truth."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for s in range(shards):
        path = folder / f"images-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as tar:
            for i in range(images_per_shard):
                key = f"disc-{seed:04d}-{s:04d}-{i:04d}"
                shapes = moving_shapes(
                    1, size, size, num_shapes=1, radius_range=(5, 9), seed=seed * 100_003 + s * 1009 + i
                )
                png = io.BytesIO()
                Image.fromarray(shapes.frames[0]).save(png, format="PNG")
                meta = {"key": key, "caption": "a disc on black"}
                tar.write({"__key__": key, "png": png.getvalue(), "json": meta})
                truth[key] = {"position": shapes.positions[0, 0].tolist(), "radius": float(shapes.radii[0])}
        paths.append(path)
    return paths, truth
