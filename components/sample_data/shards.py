"""Training shards in curation's format (`<key>.mp4` + `<key>.json`) from the
moving-shapes generator: clips whose per-frame object positions are known, for
training tests and the motion evaluation before (or without) real curated data."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Literal, TypeVar

import cv2
import numpy as np
import webdataset as wds

from components.common.media import write_video
from components.sample_data.render import draw_shapes, moving_shapes, pan, texture, zoom
from model.records import PAN_LEFT, PAN_RIGHT, STATIC, ZOOM_IN, ZOOM_OUT, CameraMotion, ClipRecord

R = TypeVar("R", bound=ClipRecord)


def clip_metadata(
    key: str,
    num_frames: int,
    fps: float,
    motion: float,
    camera_motion: str,
    caption: str,
    *,
    record: type[R] = ClipRecord,
    **fields,
) -> R:
    """The record curation writes beside a kept clip (the loader's contract; `.to_json()`
    is the shard's `<key>.json`), for a whole synthetic clip: its motion score (the only
    score measured: the others are not set), camera-motion label and caption; `record`
    and `fields` for a record with more (OrbitRecord: `elevation`, `azimuths`)."""
    return record(
        key=key,
        video=key,
        start_frame=0,
        end_frame=num_frames,
        start_s=0.0,
        end_s=num_frames / fps,
        fps=fps,
        kept=True,
        drop_reasons=[],
        scores={"motion": motion},
        camera_motion=camera_motion,
        caption=caption,
        **fields,
    )


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
    direction: tuple[float, float] | None = None,
    min_speed: float = 0.0,
    from_edge: bool = False,
    kinds: tuple[str, ...] = ("disc",),
) -> tuple[list[Path], dict[str, dict]]:
    """Writes `shard-NNNNNN.tar` files; returns their paths and, per clip key, its truth
    (positions per frame, velocities, radii, kind). The disc's velocity is drawn per axis from
    [-max_speed, max_speed], or with `direction` along it at a speed drawn from
    [min_speed, max_speed], starting from the frame's edge with `from_edge` (`moving_shapes`).
    `kinds`: each clip's shape is one of these (render.py SHAPE_KINDS), captioned
    "a <kind> moving on black"."""
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
                    direction=direction,
                    min_speed=min_speed,
                    from_edge=from_edge,
                    kinds=kinds,
                )
                video = Path(tmp) / f"{key}.mp4"
                write_video(video, clip.frames, fps)
                speed = float(np.linalg.norm(clip.velocities, axis=1).mean())
                caption = f"a {clip.kinds[0]} moving on black"
                meta = clip_metadata(key, num_frames, fps, speed, STATIC, caption)
                tar.write({"__key__": key, "mp4": video.read_bytes(), "json": meta.to_json()})
                truth[key] = {
                    "positions": clip.positions.tolist(),
                    "velocities": clip.velocities.tolist(),
                    "radii": clip.radii.tolist(),
                    "kind": clip.kinds[0],
                    "variant": int(clip.variants[0]),
                }
        paths.append(path)
    return paths, truth


def write_camera_shards(
    folder: Path,
    *,
    labels: tuple[CameraMotion, ...] = (PAN_LEFT, PAN_RIGHT, ZOOM_IN, ZOOM_OUT, STATIC),
    clips_per_label: int = 4,
    shards: int = 2,
    num_frames: int = 8,
    fps: float = 8.0,
    size: int = 32,
    pan_px_per_frame: int = 4,
    zoom_rate_per_frame: float = 1.1,
    seed: int = 0,
    scene: Literal["texture", "discs"] = "texture",
) -> tuple[list[Path], dict[str, dict]]:
    """Clips of a world filmed by a camera that pans horizontally, zooms or stays, labelled
    in their metadata as curation labels them (`camera_motion`), each label's clips dealt
    round robin to `shards` shards (so every shard holds every label: a data-loading
    worker or rank given one shard finds its class's clips there). The world (`scene`) is
    a textured landscape, or discs on black drawn like `write_shapes_shards`' (radius
    2.5-3.5 px at 32 px, colours 96..255, about 2-3 in view, captioned as those are: "a
    disc moving on black"), whose zoom is centred on the middle frame (the discs keep about
    their size on average). Returns the paths and, per key, the truth: the label, the
    content's velocity (px per frame, x right) and the zoom rate per frame."""
    camera = {
        PAN_LEFT: ((-pan_px_per_frame, 0), 1.0),  # the window moves left: the content moves right
        PAN_RIGHT: ((pan_px_per_frame, 0), 1.0),
        ZOOM_IN: ((0, 0), zoom_rate_per_frame),
        ZOOM_OUT: ((0, 0), 1 / zoom_rate_per_frame),
        STATIC: ((0, 0), 1.0),
    }
    unknown = set(labels) - set(camera)
    if unknown:
        raise ValueError(f"no synthetic camera for {sorted(unknown)}; one of {sorted(camera)}")
    if scene not in ("texture", "discs"):
        raise ValueError(f"unknown scene {scene!r}; one of ['discs', 'texture']")
    caption = "a textured landscape" if scene == "texture" else "a disc moving on black"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"camera-{s:06d}.tar" for s in range(shards)]
    writers = [wds.TarWriter(str(path), mtime=0) for path in paths]
    truth = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips = [(label, i) for i in range(clips_per_label) for label in labels]
        for n, (label, i) in enumerate(clips):
            key = f"camera-{seed:04d}-{label}-{i:04d}"
            rng = np.random.default_rng([seed, n])
            window, rate = camera[label]
            if scene == "texture":
                # Large enough for the whole pan and for zooming out; drawn at half resolution and
                # enlarged, so its finest detail is a few pixels wide (no aliasing in small frames).
                half = texture(rng, 3 * size // 2, 3 * size // 2, tuple(rng.uniform(0.5, 1.0, 3)))
                world = cv2.resize(half, (3 * size, 3 * size), interpolation=cv2.INTER_CUBIC)
                first_scale = 1.0
            else:
                world = disc_world(rng, 3 * size, size)
                first_scale = rate ** (-(num_frames - 1) / 2)  # the middle frame at the world's scale
            if rate == 1.0:
                frames = pan(world, size, size, num_frames, window)
            else:
                frames = zoom(world, size, size, num_frames, rate, first_scale)
            video = Path(tmp) / f"{key}.mp4"
            write_video(video, frames, fps)
            velocity = [-float(window[0]), -float(window[1])]
            # One caption for every class: the camera motion must come from the adapter, not the text.
            meta = clip_metadata(key, num_frames, fps, camera_motion_score(size, window, rate), label, caption)
            writers[i % shards].write({"__key__": key, "mp4": video.read_bytes(), "json": meta.to_json()})
            truth[key] = {
                "camera_motion": label,
                "content_velocity_px_per_frame": velocity,
                "zoom_rate_per_frame": rate,
            }
    for writer in writers:
        writer.close()
    return paths, truth


def camera_motion_score(size: int, window: tuple[float, float], rate: float) -> float:
    """Curation's motion score (mean optical-flow magnitude, px per frame) of a camera
    moving the window by `window` px per frame or magnifying by `rate` per frame about the
    centre of a `size`-px frame: a zoom moves each pixel by |rate - 1| times its distance
    from the centre, so a zoom's score is not 0 (a static clip's) although nothing pans."""
    if rate == 1.0:
        return float(np.hypot(*window))
    offsets = np.arange(size) - (size - 1) / 2
    return float(abs(rate - 1) * np.hypot(*np.meshgrid(offsets, offsets)).mean())


def disc_world(rng: np.random.Generator, world_size: int, view_size: int) -> np.ndarray:
    """A black square world (uint8) with discs drawn like `write_shapes_shards`' at a frame
    of `view_size` px (radius 5-7 px at 64, colours 96..255 per channel, anti-aliased),
    one in each cell of a grid whose cells are 5/8 of the view: about 2.5 discs in a
    view, evenly spread (a view seldom misses them all), never overlapping."""
    cell = 5 * view_size / 8
    cells = math.ceil(world_size / cell)
    n = cells * cells
    radii = rng.uniform(5 * view_size / 64, 7 * view_size / 64, n)
    corners = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="xy"), -1).reshape(-1, 2) * cell
    centres = corners + radii[:, None] + rng.random((n, 2)) * (cell - 2 * radii[:, None])
    colors = rng.integers(96, 256, size=(n, 3)).astype(np.uint8)
    world = np.zeros((world_size, world_size, 3), np.uint8)
    draw_shapes(world, centres, radii, colors)
    return world


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
