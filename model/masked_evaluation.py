"""Evidence for the masked finetunes on linear synthetic motion (discs at constant
velocity), through evaluation.track:

- interpolation: each in-between frame's object should sit at 1/4, 2/4, 3/4 of the way
  from one key frame's object to the next. `interpolation_errors` projects the tracked
  position onto the key-to-key segment (the fraction) and also measures its distance
  from the linear position in pixels.
- prediction: a continuation should keep the context's velocity. `velocity_error` is
  the distance between the mean per-frame displacement of the generated frames and the
  true velocity.
"""

from __future__ import annotations

import numpy as np
import torch

from model.evaluation import track
from model.masked import KEY_EVERY

# Key frames closer than this (px) give no usable fraction: the segment is too short.
MIN_KEY_DISTANCE = 2.0


def interpolation_errors(video: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, float]:
    """`video` (4T - 3, 3, H, W) in [-1, 1], frames 0, 4, 8, ... the keys; `keys` (T, 2):
    the keys' object positions (default: tracked in `video`). Mean |fraction - j/4| over
    in-between frames of pairs whose keys are at least MIN_KEY_DISTANCE apart, and the
    mean distance (px) of every in-between object from its linear position."""
    positions = track(video)
    keys = positions[::KEY_EVERY] if keys is None else np.asarray(keys, dtype=float)
    if len(keys) != (len(video) - 1) // KEY_EVERY + 1 or (len(video) - 1) % KEY_EVERY:
        raise ValueError(f"{len(video)} frames do not hold {len(keys)} key frames every {KEY_EVERY}")
    fraction_errors, pixel_errors = [], []
    for pair, (start, end) in enumerate(zip(keys[:-1], keys[1:], strict=True)):
        segment = end - start
        length = float(np.dot(segment, segment))
        for j in range(1, KEY_EVERY):
            position = positions[pair * KEY_EVERY + j]
            pixel_errors.append(float(np.linalg.norm(position - (start + j / KEY_EVERY * segment))))
            if length >= MIN_KEY_DISTANCE**2:
                fraction = float(np.dot(position - start, segment)) / length
                fraction_errors.append(abs(fraction - j / KEY_EVERY))
    return {
        "fraction_error": float(np.mean(fraction_errors)) if fraction_errors else float("nan"),
        "position_error_px": float(np.mean(pixel_errors)),
    }


def velocity_error(video: torch.Tensor, velocity: np.ndarray, first: int = 0) -> float:
    """Distance (px/frame) between the mean displacement per frame of `video`'s tracked
    object from frame `first` on and the true `velocity` (2,)."""
    positions = track(video)[first:]
    if len(positions) < 2:
        raise ValueError("a velocity needs at least 2 frames")
    measured = (positions[-1] - positions[0]) / (len(positions) - 1)
    return float(np.linalg.norm(measured - np.asarray(velocity, dtype=float)))
