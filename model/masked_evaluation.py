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
from model.masked import KEY_EVERY, MAX_CONTEXT

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


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def interpolation_report(clips: list[torch.Tensor], generated: list[torch.Tensor]) -> dict:
    """In-between positions of `generated` videos (each interpolated from the keys, every
    KEY_EVERY-th frame, of the clip beside it in `clips`), against the clips' tracked keys:
    `fraction_error` (mean |fraction - j/4| over the clips whose keys are far enough apart
    to give one; NaN when none is) and `position_error_px`; `data` is the same measured on
    the clips themselves (what the tracker gives a true interpolation), `measured_clips`
    how many clips gave a fraction."""
    if len(clips) != len(generated) or not clips:
        raise ValueError(f"{len(generated)} generated videos for {len(clips)} clips")
    made = [interpolation_errors(g, track(c[::KEY_EVERY])) for c, g in zip(clips, generated, strict=True)]
    data = [interpolation_errors(c) for c in clips]
    return {
        "fraction_error": _nanmean([m["fraction_error"] for m in made]),
        "position_error_px": float(np.mean([m["position_error_px"] for m in made])),
        "measured_clips": sum(not np.isnan(m["fraction_error"]) for m in made),
        "data": {
            "fraction_error": _nanmean([d["fraction_error"] for d in data]),
            "position_error_px": float(np.mean([d["position_error_px"] for d in data])),
        },
    }


def prediction_report(clips: list[torch.Tensor], generated: list[torch.Tensor], context: int) -> dict:
    """How `generated` videos continue the first `context` frames of the clips beside them
    (frame for frame: a generated video holds the context, then the continuation):
    `velocity_error` (px/frame) of the tracked object from the last context frame on over
    the clip's length against the clip's own velocity (its tracked displacement per frame);
    `next_position_error_px`, how far the first continued frame's object is from the
    clip's there; `still_velocity_error`, what a continuation that does not move scores
    (the clips' mean speed)."""
    if len(clips) != len(generated) or not clips:
        raise ValueError(f"{len(generated)} generated videos for {len(clips)} clips")
    first = max(context - 1, 0)
    velocity, next_position, still = [], [], []
    for clip, video in zip(clips, generated, strict=True):
        if len(video) < len(clip) or len(clip) <= context:
            raise ValueError(f"a {len(video)}-frame continuation of {context} of a {len(clip)}-frame clip")
        truth = track(clip)
        true_velocity = (truth[-1] - truth[0]) / (len(clip) - 1)
        velocity.append(velocity_error(video[: len(clip)], true_velocity, first))
        next_position.append(float(np.linalg.norm(track(video[context : context + 1])[0] - truth[context])))
        still.append(float(np.linalg.norm(true_velocity)))
    return {
        "velocity_error": float(np.mean(velocity)),
        "next_position_error_px": float(np.mean(next_position)),
        "still_velocity_error": float(np.mean(still)),
    }


def _held_out(model, shards: list[str], clips: int) -> list[torch.Tensor]:
    import itertools

    from model.data import ClipDataset

    items = itertools.islice(iter(ClipDataset(shards, model.config.clip, random_crop=False, heldout=True)), clips)
    return [item["video"] for item in items]


def evaluate_interpolation(model, shards: list[str], *, clips: int, steps: int, prompt: str = "") -> dict:
    """An interpolation model on the first `clips` held-out clips of `shards` (at the
    model's frames, fps and size): each clip's keys interpolated (seed = its index) and
    measured by `interpolation_report`; `samples` are the interpolated videos."""
    from dataclasses import replace

    from model.masked import interpolate
    from model.pipeline import GenerationConfig

    data = _held_out(model, shards, clips)
    config = GenerationConfig.for_clip(model.config.clip, steps=steps)
    generated = [  # float32 on the CPU, where the metrics run
        interpolate(model, c[::KEY_EVERY], replace(config, seed=i), prompt).float().cpu() for i, c in enumerate(data)
    ]
    return interpolation_report(data, generated) | {"samples": generated, "clips": data}


def evaluate_prediction(
    model, shards: list[str], *, clips: int, steps: int, context: int = MAX_CONTEXT, prompt: str = ""
) -> dict:
    """A prediction model on the first `clips` held-out clips of `shards`: each clip's first
    `context` frames continued to the clip's length (seed = its index) and measured by
    `prediction_report`; `samples` are the continuations."""
    from dataclasses import replace

    from model.masked import predict
    from model.pipeline import GenerationConfig

    data = _held_out(model, shards, clips)
    config = GenerationConfig.for_clip(model.config.clip, steps=steps)
    generated = [  # float32 on the CPU, where the metrics run
        predict(model, c[:context], len(c), replace(config, seed=i), prompt).float().cpu() for i, c in enumerate(data)
    ]
    return prediction_report(data, generated, context) | {"context": context, "samples": generated, "clips": data}
