"""Motion score and camera-motion label from dense optical flow (Farneback).

Flow is computed between a sampled frame and the next one (adjacent frames: small
displacements, accurate flow), at about `sample_fps` sample points per second.
"""

from __future__ import annotations

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


def _gray(rgb: np.ndarray, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(2, round(w * height / h)), min(h, height))
    return cv2.cvtColor(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)


def estimate(frames: np.ndarray, sample_points: list[int], config: Motion) -> MotionEstimate:
    """`frames` are one clip's frames; flow is taken at each sample point t (t, t+1)."""
    points = [t for t in sample_points if t + 1 < len(frames)]
    if not points:
        return MotionEstimate(0.0, (0.0, 0.0), 0.0, STATIC)
    magnitudes, translations, zooms = [], [], []
    radial = None
    for t in points:
        a, b = _gray(frames[t], config.flow_height), _gray(frames[t + 1], config.flow_height)
        # Adjacent frames move little: 3 pyramid levels and 2 iterations are enough.
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 2, 5, 1.2, 0)
        if radial is None:
            h, w = a.shape
            ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
            rx, ry = xs - (w - 1) / 2, ys - (h - 1) / 2
            radial = (rx, ry, float((rx**2 + ry**2).sum()), float(np.hypot(w / 2, h / 2)))
        rx, ry, norm, corner = radial
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
        tx, ty = float(np.median(flow[..., 0])), float(np.median(flow[..., 1]))
        # Least-squares radial expansion rate of the flow left after the translation.
        rate = ((flow[..., 0] - tx) * rx + (flow[..., 1] - ty) * ry).sum() / norm
        translations.append((tx, ty))
        zooms.append(float(rate) * corner)
    tx, ty = np.median(np.array(translations), axis=0)
    zoom = float(np.median(zooms))
    return MotionEstimate(float(np.mean(magnitudes)), (float(tx), float(ty)), zoom, _label(tx, ty, zoom, config))


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
