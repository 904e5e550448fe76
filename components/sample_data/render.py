"""Procedural frames with exactly known content: textures, moving shapes, camera moves.

Everything is numpy/OpenCV and seeded, so the same seed gives the same pixels.
Image coordinates: x to the right, y down, positions in pixels (sub-pixel exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

# cv2 drawing takes fixed-point coordinates with this many fractional bits.
_SUBPIXEL_BITS = 4


def texture(rng: np.random.Generator, height: int, width: int, tint: tuple[float, float, float]) -> np.ndarray:
    """A smooth multi-scale noise texture (uint8 HxWx3) that optical flow can track."""
    layers = []
    for cell, weight in ((32, 0.5), (8, 0.35), (2, 0.15)):
        coarse = rng.random((max(2, height // cell), max(2, width // cell)), dtype=np.float32)
        layers.append(weight * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC))
    gray = np.clip(sum(layers), 0, 1)
    rgb = gray[..., None] * np.asarray(tint, np.float32)[None, None, :]
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class MovingShapes:
    """Shapes in linear motion; `positions[t, i]` is the centre (x, y) of shape i at frame t."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    positions: np.ndarray  # (T, S, 2) float64
    velocities: np.ndarray  # (S, 2) pixels per frame
    radii: np.ndarray  # (S,)
    colors: np.ndarray  # (S, 3) uint8


def draw_shapes(frame: np.ndarray, centres: np.ndarray, radii: np.ndarray, colors: np.ndarray) -> None:
    """Draw filled anti-aliased discs in place at sub-pixel centres."""
    scale = 1 << _SUBPIXEL_BITS
    for (x, y), r, c in zip(centres, radii, colors, strict=True):
        cv2.circle(
            frame,
            (int(round(x * scale)), int(round(y * scale))),
            int(round(r * scale)),
            tuple(int(v) for v in c),
            thickness=-1,
            lineType=cv2.LINE_AA,
            shift=_SUBPIXEL_BITS,
        )


def moving_shapes(
    num_frames: int,
    height: int,
    width: int,
    *,
    num_shapes: int = 2,
    max_speed: float = 2.0,
    radius_range: tuple[float, float] = (3.0, 6.0),
    background: np.ndarray | None = None,
    seed: int = 0,
    direction: tuple[float, float] | None = None,
    min_speed: float = 0.0,
    from_edge: bool = False,
) -> MovingShapes:
    """Discs moving in straight lines at constant velocity, all inside the frame for
    every frame (so positions are linear in time: useful ground truth for
    interpolation and prediction tests). Each velocity is drawn per axis from
    [-max_speed, max_speed]; with `direction` (x, y) every disc moves that way instead,
    at a speed drawn per disc from [min_speed, max_speed]. `from_edge`: each disc starts as
    far back along its velocity as the frame allows (on an axis it moves along), so with a
    `direction` every disc enters from the same side and its speed alone says where it is."""
    rng = np.random.default_rng(seed)
    radii = rng.uniform(*radius_range, size=num_shapes)
    if direction is None:
        velocities = rng.uniform(-max_speed, max_speed, size=(num_shapes, 2))
    else:
        unit = np.asarray(direction, np.float64)
        if unit.shape != (2,) or not np.linalg.norm(unit) > 0:
            raise ValueError(f"direction must be a non-zero (x, y) pair, got {direction!r}")
        if not 0 <= min_speed <= max_speed:
            raise ValueError(f"min_speed must lie in [0, max_speed={max_speed}], got {min_speed}")
        speeds = rng.uniform(min_speed, max_speed, size=num_shapes)
        velocities = speeds[:, None] * (unit / np.linalg.norm(unit))[None]
    span = velocities * (num_frames - 1)
    starts = np.empty((num_shapes, 2))
    for i in range(num_shapes):
        for axis, size in ((0, width), (1, height)):
            lo = radii[i] - min(0.0, span[i, axis])
            hi = size - radii[i] - max(0.0, span[i, axis])
            if hi <= lo:  # too fast for this frame size: slow it down to fit
                velocities[i, axis] *= 0.5 * (size - 2 * radii[i]) / abs(span[i, axis])
                span[i, axis] = velocities[i, axis] * (num_frames - 1)
                lo = radii[i] - min(0.0, span[i, axis])
                hi = size - radii[i] - max(0.0, span[i, axis])
            moving = velocities[i, axis] != 0
            starts[i, axis] = (lo if velocities[i, axis] > 0 else hi) if from_edge and moving else rng.uniform(lo, hi)
    colors = rng.integers(96, 256, size=(num_shapes, 3)).astype(np.uint8)
    positions = starts[None] + np.arange(num_frames)[:, None, None] * velocities[None]
    base = np.zeros((height, width, 3), np.uint8) if background is None else background
    frames = np.repeat(base[None], num_frames, axis=0)
    for t in range(num_frames):
        draw_shapes(frames[t], positions[t], radii, colors)
    return MovingShapes(frames, positions, velocities, radii, colors)


def pan(world: np.ndarray, height: int, width: int, num_frames: int, velocity: tuple[int, int]) -> np.ndarray:
    """Crops of a larger world image whose window moves by `velocity` pixels per frame
    (integers, so every frame is an exact shift of the previous one)."""
    vx, vy = velocity
    x0 = (world.shape[1] - width) // 2 - vx * (num_frames - 1) // 2
    y0 = (world.shape[0] - height) // 2 - vy * (num_frames - 1) // 2
    return np.stack(
        [world[y0 + vy * t : y0 + vy * t + height, x0 + vx * t : x0 + vx * t + width] for t in range(num_frames)]
    )


def zoom(
    world: np.ndarray, height: int, width: int, num_frames: int, rate: float, first_scale: float = 1.0
) -> np.ndarray:
    """Frames magnified about the centre by `rate` per frame (>1 zooms in), the first one
    by `first_scale` (world pixels to frame pixels)."""
    cy, cx = world.shape[0] / 2, world.shape[1] / 2
    frames = []
    for t in range(num_frames):
        s = first_scale * rate**t
        # Maps world (x, y) to frame: scale about the world centre, then centre in the frame.
        m = np.array([[s, 0, width / 2 - s * cx], [0, s, height / 2 - s * cy]], np.float32)
        frames.append(cv2.warpAffine(world, m, (width, height), flags=cv2.INTER_LINEAR))
    return np.stack(frames)


def write_audio_only(path: Path, seconds: float = 1.0, sample_rate: int = 44100) -> None:
    """An mp4 with one AAC stream and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        samples = int(seconds * sample_rate)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / sample_rate)).astype(np.float32)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples, frame_size):
            chunk = tone[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
