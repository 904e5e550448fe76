"""Global camera motion of a video in curation's terms (content translation and the
radial expansion at the frame corner, px per frame, medians over adjacent frame pairs;
components/curation/motion.py) and the motion class it reads as. `model/` cannot use
`components/curation`, and curation's dense flow is made for frames of 128 px and more,
not for the tiny models' 32x32 frames (where a 4 px pan is large and a zoom of smooth
upscaled frames barely changes a pixel), so this estimator fits the camera directly: phase correlation for the
translation, then the best magnification about the centre. Frames are upscaled to
FLOW_HEIGHT first for sub-pixel accuracy; results are in the video's own pixels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

# Flow is computed at this height (frames upscaled or downscaled to it), then scaled back.
FLOW_HEIGHT = 96


@dataclass(frozen=True)
class CameraMotion:
    translation: tuple[float, float]  # content motion (x right, y down), px per frame
    zoom: float  # radial expansion at the frame corner, px per frame (> 0: zoom in)


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    h, w = frame.shape[:2]
    size = (round(w * FLOW_HEIGHT / h), FLOW_HEIGHT)
    return cv2.cvtColor(cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC), cv2.COLOR_RGB2GRAY)


def _scale(a: np.ndarray, b: np.ndarray, shift: tuple[float, float]) -> float:
    """The magnification about the centre that best maps `a` onto `b` (after `shift`):
    a search over scales, then a parabola through the best three (dense flow on upscaled
    32 px frames is too smooth to measure a zoom, a direct fit is not)."""
    import cv2

    h, w = a.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    inner = (slice(h // 6, h - h // 6), slice(w // 6, w - w // 6))  # away from the borders warping invents
    target = b[inner].astype(np.float32)
    scales = np.exp(np.linspace(-0.3, 0.3, 61))
    errors = []
    for s in scales:
        m = np.float32([[s, 0, cx - s * cx + shift[0]], [0, s, cy - s * cy + shift[1]]])
        warped = cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        errors.append(float(np.mean((warped[inner].astype(np.float32) - target) ** 2)))
    i = int(np.clip(np.argmin(errors), 1, len(scales) - 2))
    e0, e1, e2 = errors[i - 1 : i + 2]
    curvature = e0 - 2 * e1 + e2
    offset = 0.5 * (e0 - e2) / curvature if curvature > 0 else 0.0
    step = np.log(scales[1]) - np.log(scales[0])
    return float(np.exp(np.log(scales[i]) + np.clip(offset, -1, 1) * step))


def estimate(frames: torch.Tensor) -> CameraMotion:
    """Frames (T, 3, H, W) in [-1, 1]; medians over the adjacent pairs. The translation
    comes from phase correlation (exact for a pan however far it moves per frame), the
    zoom from the best magnification of one frame onto the next."""
    import cv2

    rgb = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).contiguous().cpu().numpy()
    scale = rgb.shape[1] / FLOW_HEIGHT  # flow pixels -> video pixels
    grays = [_gray(f).astype(np.float32) for f in rgb]
    h, w = grays[0].shape
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    corner = float(np.hypot(w / 2, h / 2))
    translations, zooms = [], []
    for a, b in zip(grays[:-1], grays[1:], strict=True):
        shift, _ = cv2.phaseCorrelate(a.copy(), b.copy(), window)  # it windows its inputs in place
        translations.append((shift[0] * scale, shift[1] * scale))
        zooms.append((_scale(a, b, shift) - 1) * corner * scale)
    tx, ty = np.median(np.array(translations), axis=0)
    return CameraMotion((float(tx), float(ty)), float(np.median(zooms)))


def motion_class(motion: CameraMotion, static_px: float = 0.5, zoom_px: float = 0.5) -> str:
    """`pan` (mostly horizontal translation), `tilt` (vertical), `zoom_in`, `zoom_out` or
    `static`: curation's rule with thresholds for small frames."""
    shift = float(np.hypot(*motion.translation))
    if abs(motion.zoom) >= zoom_px and abs(motion.zoom) > shift:
        return "zoom_in" if motion.zoom > 0 else "zoom_out"
    if shift < static_px:
        return "static"
    return "pan" if abs(motion.translation[0]) >= abs(motion.translation[1]) else "tilt"


def class_report(videos: list[torch.Tensor], expected: str) -> dict:
    """How many of `videos` read as the motion class `expected`, what they read as, and
    their mean |horizontal motion| and |zoom| (px per frame)."""
    return motions_report([estimate(v) for v in videos], expected)


def motions_report(motions: list[CameraMotion], expected: str) -> dict:
    """`class_report` of motions already estimated."""
    classes = [motion_class(m) for m in motions]
    return {
        "match_rate": sum(c == expected for c in classes) / len(classes),
        "classes": dict(Counter(classes)),
        "abs_pan_px_per_frame": float(np.mean([abs(m.translation[0]) for m in motions])),
        "abs_zoom_px_per_frame": float(np.mean([abs(m.zoom) for m in motions])),
    }


def class_accuracy(videos: dict[str, list[torch.Tensor]]) -> dict:
    """How often videos read as the motion class they were made for, `videos` class ->
    its videos: `accuracy`, the mean over classes of the share of a class's videos whose
    estimated motion class is that class (each class weighs the same, however many videos
    it has); `per_class` each share; `classes` what each class's videos read as;
    `abs_pan_px_per_frame` and `abs_zoom_px_per_frame` their mean |horizontal motion| and
    |zoom|."""
    if not videos or not all(videos.values()):
        raise ValueError("class accuracy needs at least one video of at least one class")
    reports = {name: class_report(made, name) for name, made in videos.items()}
    return {
        "accuracy": float(np.mean([r["match_rate"] for r in reports.values()])),
        "per_class": {name: r["match_rate"] for name, r in reports.items()},
        "classes": {name: r["classes"] for name, r in reports.items()},
        "abs_pan_px_per_frame": {name: r["abs_pan_px_per_frame"] for name, r in reports.items()},
        "abs_zoom_px_per_frame": {name: r["abs_zoom_px_per_frame"] for name, r in reports.items()},
    }


def class_clips(shards: list[str], spec, motion_class: str, clips: int) -> list[dict]:
    """The first `clips` items of `shards` curation labelled with `motion_class`'s camera
    motions (model.camera_lora.MOTION_CLASSES), at `spec`'s frames and size, centre-cropped;
    none when the shards hold no such clip."""
    import itertools

    from model.camera_lora import labels_of
    from model.data import ClipDataset

    data = ClipDataset(shards, spec, camera_motion=labels_of(motion_class), random_crop=False, epochs=1, heldout=True)
    try:
        return list(itertools.islice(iter(data), clips))
    except ValueError as error:  # no clip of the class (or none long enough) in these shards
        if "no clip in these shards" not in str(error):
            raise
        return []


def evaluate_adapters(model, shards: list[str], *, clips: int, steps: int, base: bool = True) -> dict:
    """A camera-motion LoRA model's adapters on held-out camera clips `shards`: per adapter
    (`model.camera_lora.adapter_names`), `clips` videos sampled with it (seeds 0..clips-1)
    at the mean motion score of the data's clips of its class (the generation default's
    where the data has none) with their caption, each read as a motion class
    (`estimate`, `motion_class`) and scored by `class_accuracy`; with `base`, the same
    seeds and settings without an adapter (`base`: what the adapters improve on).
    `samples`: each adapter's first video."""
    from dataclasses import replace

    from model.camera_lora import adapter_names, use_adapter
    from model.pipeline import GenerationConfig, generate

    names = adapter_names(model.unet)
    if not names:
        raise ValueError("this model has no camera-motion adapter to evaluate")
    spec = model.config.clip
    config = GenerationConfig.for_clip(spec, steps=steps)
    settings, made, without = {}, {}, {}
    for name in names:
        items = class_clips(shards, spec, name, clips)
        motion = float(np.mean([float(i["motion"]) for i in items])) if items else config.motion
        prompt = items[0]["caption"] if items else ""
        settings[name] = {"motion_score": motion, "data_clips": len(items), "prompt": prompt}
        at = replace(config, motion=motion)
        made[name] = [generate(model, prompt, replace(at, seed=s, adapter=name)) for s in range(clips)]
        if base:
            without[name] = [generate(model, prompt, replace(at, seed=s)) for s in range(clips)]
    use_adapter(model.unet, None)
    report = class_accuracy(made) | {"settings": settings, "samples": [videos[0] for videos in made.values()]}
    if base:
        report["base"] = class_accuracy(without)
    return report
