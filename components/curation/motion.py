"""Motion score and camera-motion label from dense optical flow (OpenCV's DIS, its
ultrafast preset, on the luma plane).

Flow is computed between a sampled frame and the next one (adjacent frames: small
displacements, accurate flow), at about `sample_fps` sample points per second. DIS
gives the same labels as Farneback on the synthetic pans, tilts and zooms, and scores
within 6 percent, at about a twentieth of its cost (0.15 against 3.6 ms a pair
at 228x128).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from components.curation.config import Motion

# The labels are the clip record's vocabulary (model/records.py), re-exported here.
from model.records import (  # noqa: F401 - CAMERA_MOTIONS: every label this module can give
    CAMERA_MOTIONS,
    PAN_LEFT,
    PAN_RIGHT,
    STATIC,
    TILT_DOWN,
    TILT_UP,
    ZOOM_IN,
    ZOOM_OUT,
    CameraMotion,
)


@dataclass(frozen=True)
class MotionEstimate:
    score: float  # mean flow magnitude, px per source frame at flow height
    translation: tuple[float, float]  # robust global content motion (x right, y down), px/frame
    zoom: float  # radial expansion at the frame corner, px/frame (> 0: zoom in)
    camera_motion: CameraMotion


# Spacing of the flow vectors the statistics read: DIS's finest scale at the ultrafast preset.
_GRID = 4


def _flow_size(shape: tuple[int, int], height: int) -> tuple[int, int]:
    h, w = shape
    return max(2, round(w * min(h, height) / h)), min(h, height)


@functools.lru_cache(maxsize=16)
def _radial(size: tuple[int, int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """For flow vectors on the `_GRID` of a frame of `size` (w, h), `shape` of them: each one's
    offset from the frame centre (x, y) in pixels (flattened), the sum of their squares, and the
    centre's distance to a corner."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) * _GRID  # in pixels at the flow size
    rx, ry = xs - (size[0] - 1) / 2, ys - (size[1] - 1) / 2
    return rx.ravel(), ry.ravel(), float((rx**2 + ry**2).sum()), float(np.hypot(size[0] / 2, size[1] / 2))


@dataclass(frozen=True)
class PairMotion:
    """The flow from one frame to the next: what a clip's estimate is made of (`combine`)."""

    magnitude: float  # mean flow magnitude, px per frame at flow height
    translation: tuple[float, float]  # median flow (x right, y down)
    zoom: float  # least-squares radial expansion at the frame corner of the flow left after the translation


class FlowMeter:
    """Flow between adjacent frames of one size (their Y planes), one pair at a time: curation
    measures each sample point as its frames decode, so that a clip's estimate is ready when the
    clip closes."""

    def __init__(self, shape: tuple[int, int], config: Motion):
        self.size = _flow_size(shape, config.flow_height)
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOpticalFlow_PRESET_ULTRAFAST)

    def pair(self, a: np.ndarray, b: np.ndarray) -> PairMotion:
        # Bilinear: at most a 2.5x reduction of a 320 px frame; area's general path costs 5x more.
        a, b = (cv2.resize(x, self.size, interpolation=cv2.INTER_LINEAR) for x in (a, b))
        # The ultrafast preset estimates flow at a quarter of the size (its finest scale, 2) and scales it
        # up bilinearly: every fourth vector each way holds all it found, at a sixteenth of the cost.
        grid = self._dis.calc(a, b, None)[::_GRID, ::_GRID]
        rx, ry, norm, corner = _radial(self.size, grid.shape[:2])
        vectors = np.ascontiguousarray(grid.transpose(2, 0, 1)).reshape(2, -1)  # x and y components
        x, y = vectors
        # Both medians from one partition (numpy's median costs two of them and twice the calls).
        half = x.size // 2
        middle = np.partition(vectors, [half - 1, half], axis=1)
        tx, ty = (float(m) for m in (middle[:, half] if x.size % 2 else middle[:, half - 1 : half + 1].mean(axis=1)))
        zoom = float((x - tx) @ rx + (y - ty) @ ry) / norm * corner
        return PairMotion(float(cv2.magnitude(x, y).mean()), (tx, ty), zoom)


def combine(pairs: Sequence[PairMotion], config: Motion) -> MotionEstimate:
    """A clip's estimate from the flow at its sample points: the mean magnitude, and the median
    translation and zoom (robust to a pair gone wrong)."""
    if not pairs:
        return MotionEstimate(0.0, (0.0, 0.0), 0.0, STATIC)
    # Python's statistics: a few values, where numpy's call costs 30 times the work.
    tx = statistics.median(p.translation[0] for p in pairs)
    ty = statistics.median(p.translation[1] for p in pairs)
    zoom = statistics.median(p.zoom for p in pairs)
    magnitude = statistics.fmean(p.magnitude for p in pairs)
    return MotionEstimate(magnitude, (tx, ty), zoom, _label(tx, ty, zoom, config))


def estimate(lumas: Sequence[np.ndarray], sample_points: list[int], config: Motion) -> MotionEstimate:
    """`lumas` are one clip's frames (their Y planes); flow is taken at each sample point t (t, t+1)."""
    points = [t for t in sample_points if t + 1 < len(lumas)]
    if not points:
        return combine([], config)
    meter = FlowMeter(lumas[0].shape, config)
    return combine([meter.pair(lumas[t], lumas[t + 1]) for t in points], config)


def _label(tx: float, ty: float, zoom: float, config: Motion) -> CameraMotion:
    shift = float(np.hypot(tx, ty))
    if abs(zoom) >= config.zoom_px_per_frame and abs(zoom) > shift:
        return ZOOM_IN if zoom > 0 else ZOOM_OUT
    if shift < config.static_px_per_frame:
        return STATIC
    # Content moving right means the camera pans left; content moving down, it tilts up.
    if abs(tx) >= abs(ty):
        return PAN_LEFT if tx > 0 else PAN_RIGHT
    return TILT_UP if ty > 0 else TILT_DOWN
