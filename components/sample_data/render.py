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


# The shapes `draw_shapes` draws. A polygon of radius r has the area of a disc of radius r (so a
# brightness-weighted tracker sees them alike). The hollow ones are a filled kind's outline with a
# hole of its outline at half the size; `frame` is the hollow square. `polygon` is another shape
# for every variant (`_polygon`): a class of many, as "a dog" is.
HOLLOW_KINDS = {"frame": "square", "hollow-diamond": "diamond", "hollow-triangle": "triangle"}
SHAPE_KINDS = ("disc", "square", "diamond", "triangle", "cross", *HOLLOW_KINDS, "polygon")


@dataclass(frozen=True)
class MovingShapes:
    """Shapes in linear motion; `positions[t, i]` is the centre (x, y) of shape i at frame t."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    positions: np.ndarray  # (T, S, 2) float64
    velocities: np.ndarray  # (S, 2) pixels per frame
    radii: np.ndarray  # (S,)
    colors: np.ndarray  # (S, 3) uint8
    kinds: tuple[str, ...]  # per shape (SHAPE_KINDS)
    variants: np.ndarray  # (S,) int: which `polygon` a shape of that kind is


def _polygon(variant: int) -> list[np.ndarray]:
    """Kind `polygon`'s contours for one variant: 5 to 10 vertices at random distances (0.6 to 1)
    around a centre every edge can be seen from (consecutive angles less than 180 degrees apart), so
    a copy at half the size about that centre lies inside; half the variants have that copy as a
    hole. Scaled to area pi, its area centroid at the origin."""
    rng = np.random.default_rng([variant, 7])
    n = int(rng.integers(5, 11))
    angles = 2 * np.pi * (np.arange(n) + rng.uniform(-0.35, 0.35, n)) / n
    outline = rng.uniform(0.6, 1.0, n)[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    moments = cv2.moments(outline.astype(np.float32))
    area, centroid = moments["m00"], np.array([moments["m10"], moments["m01"]]) / moments["m00"]
    contours = [outline]
    if rng.random() < 0.5:  # less the half-size copy: a quarter of the area, centred at half the distance
        area, centroid = area * 3 / 4, centroid * 7 / 6  # (A c - A/4 c/2) / (3A/4)
        contours.append(outline / 2)
    return [(c - centroid) * np.sqrt(np.pi / area) for c in contours]


def _contours(kind: str, x: float, y: float, r: float, variant: int = 0) -> list[np.ndarray]:
    """The contours, each vertices (N, 2), of a polygonal shape of area pi r^2 centred at (x, y):
    the outline first, then any hole's."""
    if kind == "polygon":
        return [c * r + (x, y) for c in _polygon(variant)]
    if kind in HOLLOW_KINDS:  # the outline less a half-size copy (a quarter of the area): scaled by sqrt(4/3)
        (outline,) = _contours(HOLLOW_KINDS[kind], 0.0, 0.0, r * np.sqrt(4 / 3))
        return [outline + (x, y), outline / 2 + (x, y)]
    if kind == "square":
        h = r * np.sqrt(np.pi) / 2
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif kind == "diamond":
        d = r * np.sqrt(np.pi / 2)
        points = [(0, -d), (d, 0), (0, d), (-d, 0)]
    elif kind == "triangle":  # equilateral, pointing up, about its centroid
        c = r * np.sqrt(4 * np.pi / (3 * np.sqrt(3)))
        points = [(c * np.cos(a), c * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif kind == "cross":  # five squares of side 2w
        w = r * np.sqrt(np.pi / 5) / 2
        points = [(-w, -3 * w), (w, -3 * w), (w, -w), (3 * w, -w), (3 * w, w), (w, w), (w, 3 * w), (-w, 3 * w),
                  (-w, w), (-3 * w, w), (-3 * w, -w), (-w, -w)]  # fmt: skip
    else:
        raise ValueError(f"shape kind {kind!r}: one of {list(SHAPE_KINDS)}")
    return [np.asarray(points, np.float64) + (x, y)]


def _reach(kind: str, variant: int = 0) -> float:
    """How far a shape of the kind reaches from its centre, in radii."""
    if kind == "disc":
        return 1.0
    return float(np.linalg.norm(_contours(kind, 0.0, 0.0, 1.0, variant)[0], axis=1).max())


def draw_shapes(
    frame: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    colors: np.ndarray,
    kinds: tuple[str, ...] | None = None,
    variants: np.ndarray | None = None,
) -> None:
    """Draw filled anti-aliased shapes (discs where `kinds` is None) in place at sub-pixel centres;
    `variants` picks each `polygon` (0 where None)."""
    scale = 1 << _SUBPIXEL_BITS
    for i, ((x, y), r, c) in enumerate(zip(centres, radii, colors, strict=True)):
        color = tuple(int(v) for v in c)
        kind = "disc" if kinds is None else kinds[i]
        if kind == "disc":
            centre = (int(round(x * scale)), int(round(y * scale)))
            cv2.circle(frame, centre, int(round(r * scale)), color, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        else:
            variant = 0 if variants is None else int(variants[i])
            _fill_polygon(frame, _contours(kind, x, y, r, variant), np.asarray(color, np.float32))


# Polygons are filled at this many times the frame's resolution and averaged down: their pixels
# are covered by their area to about 1% (OpenCV's anti-aliased fill adds a rim of about a pixel).
_SUPERSAMPLE = 16


def _inradius(points: np.ndarray, centre: np.ndarray) -> float:
    """The distance from `centre` to the nearest line through an edge of the polygon `points` (N, 2)."""
    edges = np.roll(points, -1, axis=0) - points
    to_centre = centre - points
    cross = edges[:, 0] * to_centre[:, 1] - edges[:, 1] * to_centre[:, 0]
    return float((np.abs(cross) / np.linalg.norm(edges, axis=1)).min())


def _fill_polygon(frame: np.ndarray, contours: list[np.ndarray], color: np.ndarray) -> None:
    """Blend `color` into `frame` (H, W, 3) by each pixel's coverage by the polygon (its outline,
    then holes: OpenCV fills what an odd number of contours encloses)."""
    height, width = frame.shape[:2]
    x0, y0 = np.maximum(np.floor(contours[0].min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(contours[0].max(axis=0)).astype(int) + 1, (width, height))
    if x1 <= x0 or y1 <= y0:
        return
    k = _SUPERSAMPLE
    # The fill takes in each contour's boundary: a supersample pixel more of the outline, less of a
    # hole. A hole whose every edge is moved out by that pixel (scaled about its centre by its
    # inradius: exact for a regular one) loses no more area than the rim adds.
    holes = [(h, h.mean(axis=0)) for h in contours[1:]]
    contours = [contours[0], *(c + (h - c) * (1 + 1 / (k * _inradius(h, c))) for h, c in holes)]
    mask = np.zeros(((y1 - y0) * k, (x1 - x0) * k), np.uint8)
    # Pixel (i, j) is centred at (x, y) = (j, i) (as cv2.circle draws): it spans [j - 0.5, j + 0.5).
    points = [np.round(((c - (x0, y0) + 0.5) * k - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32) for c in contours]
    cv2.fillPoly(mask, points, 255, cv2.LINE_8, _SUBPIXEL_BITS)
    coverage = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255
    patch = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = np.round(patch * (1 - coverage) + color * coverage).astype(np.uint8)


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
    kinds: tuple[str, ...] = ("disc",),
) -> MovingShapes:
    """Shapes (discs by default) moving in straight lines at constant velocity, all inside the frame for
    every frame (so positions are linear in time: useful ground truth for
    interpolation and prediction tests). Each velocity is drawn per axis from
    [-max_speed, max_speed]; with `direction` (x, y) every disc moves that way instead,
    at a speed drawn per disc from [min_speed, max_speed]. `from_edge`: each disc starts as
    far back along its velocity as the frame allows (on an axis it moves along), so with a
    `direction` every disc enters from the same side and its speed alone says where it is.
    `kinds`: each shape's kind is drawn from these (SHAPE_KINDS; discs only by default), and each
    shape's variant (which `polygon` it is, if one)."""
    rng = np.random.default_rng(seed)
    radii = rng.uniform(*radius_range, size=num_shapes)
    unknown = set(kinds) - set(SHAPE_KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds: some of {list(SHAPE_KINDS)}, not {list(kinds)}")
    # From a generator of their own: the discs of a seed stay where they were.
    drawn = tuple(str(k) for k in np.random.default_rng([seed, 1]).choice(kinds, size=num_shapes))
    variants = np.random.default_rng([seed, 2]).integers(0, 2**31, size=num_shapes)
    reach = radii * np.array([_reach(k, v) for k, v in zip(drawn, variants, strict=True)])
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
            lo = reach[i] - min(0.0, span[i, axis])
            hi = size - reach[i] - max(0.0, span[i, axis])
            if hi <= lo:  # too fast for this frame size: slow it down to fit
                velocities[i, axis] *= 0.5 * (size - 2 * reach[i]) / abs(span[i, axis])
                span[i, axis] = velocities[i, axis] * (num_frames - 1)
                lo = reach[i] - min(0.0, span[i, axis])
                hi = size - reach[i] - max(0.0, span[i, axis])
            moving = velocities[i, axis] != 0
            starts[i, axis] = (lo if velocities[i, axis] > 0 else hi) if from_edge and moving else rng.uniform(lo, hi)
    colors = rng.integers(96, 256, size=(num_shapes, 3)).astype(np.uint8)
    positions = starts[None] + np.arange(num_frames)[:, None, None] * velocities[None]
    base = np.zeros((height, width, 3), np.uint8) if background is None else background
    frames = np.repeat(base[None], num_frames, axis=0)
    for t in range(num_frames):
        draw_shapes(frames[t], positions[t], radii, colors, drawn, variants)
    return MovingShapes(frames, positions, velocities, radii, colors, drawn, variants)


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
