"""Orbit renders of procedural 3D objects with exactly known cameras, for the multi-view
finetune (SVD-MV): a few flat-shaded coloured boxes, seen by a camera on a circle
around them at elevation `e`, `T` azimuths evenly over 360 degrees.

numpy/OpenCV only: perspective projection, back faces culled, the remaining faces
drawn far to near (painter's order; the boxes never interpenetrate much, so face
centres order them well enough at these sizes). The light is fixed in the world, so
a face has the same shade from every camera: the hidden side of an object is
predictable from what the first view shows, as multi-view training assumes.

World: y up; the camera at azimuth a, elevation e sits at
distance * (cos e cos a, sin e, cos e sin a) looking at the origin.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from components.common.media import write_video
from components.sample_data.shards import clip_metadata
from model.records import ORBIT, OrbitRecord

_SUBPIXEL_BITS = 4
# Unit cube corners and its faces as corner indices, counter-clockwise seen from outside.
_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
_FACES = np.array(
    [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]  # -x +x -y +y -z +z
)
_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64)
_LIGHT = np.array([0.5, 0.8, 0.3]) / np.linalg.norm([0.5, 0.8, 0.3])


@dataclass(frozen=True)
class Box:
    centre: tuple[float, float, float]
    half_size: tuple[float, float, float]
    color: tuple[int, int, int]  # RGB of a face lit head-on


@dataclass(frozen=True)
class Orbit:
    frames: np.ndarray  # (T, H, W, 3) uint8
    elevation: float  # degrees
    azimuths: np.ndarray  # (T,) degrees


def random_object(rng: np.random.Generator, boxes: int = 3) -> list[Box]:
    """`boxes` boxes of distinct saturated colours around the origin, within a unit sphere."""
    hues = rng.permutation(6)[:boxes] * 30  # OpenCV hue 0..179, far apart
    result = []
    for i, hue in enumerate(hues):
        hsv = np.uint8([[[hue, 200 + rng.integers(0, 56), 255]]])
        color = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
        angle = 2 * np.pi * i / boxes + rng.uniform(-0.4, 0.4)
        radius = 0.0 if i == 0 else rng.uniform(0.35, 0.5)  # one box in the middle, others around it
        centre = (radius * np.cos(angle), rng.uniform(-0.15, 0.15), radius * np.sin(angle))
        half = tuple(rng.uniform(0.12, 0.3, size=3)) if i else tuple(rng.uniform(0.2, 0.35, size=3))
        result.append(Box(tuple(float(c) for c in centre), tuple(float(h) for h in half), tuple(int(c) for c in color)))
    return result


def camera(elevation: float, azimuth: float, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera position and world-to-camera rotation (rows: right, up, forward), degrees in."""
    e, a = np.radians(elevation), np.radians(azimuth)
    position = distance * np.array([np.cos(e) * np.cos(a), np.sin(e), np.cos(e) * np.sin(a)])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return position, np.stack([right, up, forward])


def render_view(
    boxes: list[Box],
    elevation: float,
    azimuth: float,
    size: int,
    *,
    distance: float = 3.0,
    focal: float = 2.6,
    background: int = 0,
) -> np.ndarray:
    """One view (size, size, 3) uint8. `focal` is in units of half the image width."""
    position, rotation = camera(elevation, azimuth, distance)
    faces = []  # (depth, polygon in pixels, colour)
    for box in boxes:
        corners = np.asarray(box.centre) + _CORNERS * np.asarray(box.half_size)
        in_camera = (corners - position) @ rotation.T  # (8, 3): x right, y up, z forward
        # OpenCV puts pixel centres at integer coordinates: the image centre is (size - 1) / 2.
        pixels = (size - 1) / 2 + size / 2 * focal * in_camera[:, :2] / in_camera[:, 2:] * np.array([1.0, -1.0])
        for face, normal in zip(_FACES, _NORMALS, strict=True):
            centre = corners[face].mean(axis=0)
            if np.dot(normal, position - centre) <= 0:
                continue  # facing away from the camera
            shade = 0.35 + 0.65 * max(0.0, float(np.dot(normal, _LIGHT)))
            color = tuple(int(round(c * shade)) for c in box.color)
            faces.append((float(np.linalg.norm(centre - position)), pixels[face], color))
    image = np.full((size, size, 3), background, dtype=np.uint8)
    scale = 1 << _SUBPIXEL_BITS
    for _, polygon, color in sorted(faces, key=lambda f: -f[0]):
        points = np.round(polygon * scale).astype(np.int32)
        cv2.fillConvexPoly(image, points, color, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    return image


def orbit_azimuths(num_views: int, start: float = 0.0) -> np.ndarray:
    """`num_views` azimuths (degrees) evenly over 360 from `start`, the full turn excluded."""
    return (start + 360.0 * np.arange(num_views) / num_views) % 360.0


def render_orbit(boxes: list[Box], elevation: float, azimuths: np.ndarray, size: int, **view) -> Orbit:
    frames = np.stack([render_view(boxes, elevation, float(a), size, **view) for a in azimuths])
    return Orbit(frames, float(elevation), np.asarray(azimuths, dtype=np.float64))


def write_orbit_shards(
    folder: Path,
    *,
    shards: int = 2,
    orbits_per_shard: int = 4,
    num_views: int = 8,
    fps: float = 8.0,
    size: int = 32,
    elevations: tuple[float, ...] = (-10.0, 10.0, 30.0, 50.0),
    seed: int = 0,
) -> tuple[list[Path], dict[str, dict]]:
    """Writes `orbit-NNNNNN.tar` files of curation's format (`<key>.mp4` + `<key>.json`),
    one orbit per sample: `num_views` frames, the JSON carrying `elevation` and
    `azimuths` (degrees). Elevations are drawn from `elevations`, start azimuths at random.
    Returns the paths and, per key, the truth (boxes, elevation, azimuths) to re-render."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for s in range(shards):
        path = folder / f"orbit-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as tar, tempfile.TemporaryDirectory() as tmp:
            for o in range(orbits_per_shard):
                key = f"orbit-{seed:04d}-{s:04d}-{o:04d}"
                rng = np.random.default_rng(seed * 100_003 + s * 1009 + o)
                boxes = random_object(rng, boxes=int(rng.integers(2, 4)))
                elevation = float(rng.choice(elevations))
                orbit = render_orbit(boxes, elevation, orbit_azimuths(num_views, rng.uniform(0, 360)), size)
                video = Path(tmp) / f"{key}.mp4"
                write_video(video, orbit.frames, fps)
                meta = clip_metadata(
                    key,
                    num_views,
                    fps,
                    0.0,
                    ORBIT,
                    "an orbit around coloured boxes",
                    record=OrbitRecord,
                    elevation=elevation,
                    azimuths=orbit.azimuths.tolist(),
                )
                tar.write({"__key__": key, "mp4": video.read_bytes(), "json": meta.to_json()})
                truth[key] = {
                    "boxes": [[list(b.centre), list(b.half_size), list(b.color)] for b in boxes],
                    "elevation": elevation,
                    "azimuths": orbit.azimuths.tolist(),
                }
        paths.append(path)
    return paths, truth


def boxes_from_truth(record: dict) -> list[Box]:
    """The boxes of a `write_orbit_shards` truth record."""
    return [Box(tuple(c), tuple(h), tuple(int(v) for v in rgb)) for c, h, rgb in record["boxes"]]
