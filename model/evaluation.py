"""Motion evidence for generated clips: track the brightest blob (the moving shape of the
synthetic data) frame by frame and measure how far it moves per frame and how straight.

A video model trained on the moving-shapes data should produce clips whose speed is
close to the data's and whose path is nearly straight; an image model applied per
frame produces unrelated frames: erratic jumps, a path far from a line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class MotionStats:
    speed_px_per_frame: float  # mean displacement of the tracked centre between frames
    straightness: float  # net displacement / path length: 1 for a straight line, near 0 for jitter
    jerk_px: float  # mean |second difference| of the track: 0 for constant velocity


def track(frames: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """Centre (x, y) per frame of the pixels brighter than `threshold` of the frame's
    range; frames (T, 3, H, W) in [-1, 1]."""
    luma = frames.float().mean(dim=1)
    lo = luma.amin(dim=(1, 2), keepdim=True)
    hi = luma.amax(dim=(1, 2), keepdim=True)
    weight = ((luma - lo) / (hi - lo).clamp(min=1e-6) > threshold).float() * (luma - lo)
    ys, xs = torch.meshgrid(torch.arange(luma.shape[1]), torch.arange(luma.shape[2]), indexing="ij")
    total = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    return torch.stack([(weight * xs).sum(dim=(1, 2)) / total, (weight * ys).sum(dim=(1, 2)) / total], 1).numpy()


def motion_stats(frames: torch.Tensor) -> MotionStats:
    centres = track(frames)
    steps = np.diff(centres, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    path = float(lengths.sum())
    net = float(np.linalg.norm(centres[-1] - centres[0]))
    jerk = np.linalg.norm(np.diff(steps, axis=0), axis=1) if len(steps) > 1 else np.zeros(1)
    return MotionStats(float(lengths.mean()), net / path if path > 1e-6 else 1.0, float(jerk.mean()))


def summarize(stats: list[MotionStats]) -> dict[str, float]:
    return {
        "speed_px_per_frame": float(np.mean([s.speed_px_per_frame for s in stats])),
        "straightness": float(np.mean([s.straightness for s in stats])),
        "jerk_px": float(np.mean([s.jerk_px for s in stats])),
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of frames in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return 10 * float(np.log10(4 / max(mse, 1e-12)))


def first_frame_stats(model, frames: list[torch.Tensor], generated: list[torch.Tensor]) -> dict[str, float]:
    """How well image-to-video keeps its conditioning frame: PSNR of generated frame 0
    against the frame it was given, against another clip's frame (what an unrelated
    start scores), against the VAE's reconstruction of the frame (what the latent
    space allows), and how far the tracked object starts from where the frame has it."""
    codec = model.codec
    device = next(codec.parameters()).device
    others = frames[1:] + frames[:1]
    scale = codec.vae.config.scaling_factor
    reconstructions = [
        codec.decode(codec.condition_latent(f[None].to(device))[None] * scale)[0, 0].cpu() for f in frames
    ]
    return {
        "psnr": float(np.mean([psnr(g[0], f) for g, f in zip(generated, frames, strict=True)])),
        "psnr_mismatched": float(np.mean([psnr(g[0], o) for g, o in zip(generated, others, strict=True)])),
        "psnr_vae_reconstruction": float(np.mean([psnr(r, f) for r, f in zip(reconstructions, frames, strict=True)])),
        "start_error_px": float(
            np.mean(
                [np.linalg.norm(track(g[:1])[0] - track(f[None])[0]) for g, f in zip(generated, frames, strict=True)]
            )
        ),
    }


def evaluate_motion(
    model, shards: list[str], *, clips: int = 8, steps: int = 25, prompts: list[str] | None = None
) -> dict:
    """Motion of `clips` generated videos against the same number of held-out data clips
    loaded at the model's own frames, fps and size: both through the same tracker. Each
    video is generated (seed = its index) from what its kind takes of a data clip
    (`Task.evaluation_inputs`): a text model from `prompts[i]` in turn (None: the empty
    prompt, the data's motion), an image-to-video model from the clip's first frame (and
    the report adds `first_frame`, how well it kept that frame). `clips` holds the data
    clips and `prompts` the text each video stands for (its prompt, else the clip's caption)."""
    import itertools

    from model.data import ClipDataset
    from model.pipeline import GenerationConfig

    spec = model.config.clip
    items = list(itertools.islice(iter(ClipDataset(shards, spec, random_crop=False, heldout=True)), clips))
    data = [item["video"] for item in items]
    motion = float(np.mean([item["motion"].item() for item in items]))  # ask for the data's typical motion
    config = GenerationConfig.for_clip(spec, motion=motion, steps=steps)
    task = model.task
    texts = [prompts[i % len(prompts)] if prompts else None for i in range(len(items))]
    inputs = [task.evaluation_inputs(item, text) for item, text in zip(items, texts, strict=True)]
    generated = [
        # float32 on the CPU, where the metrics run, whatever device and precision sampled them
        task.sample(model, given, replace(config, seed=seed)).float().cpu()
        for seed, given in enumerate(inputs)
    ]
    report = {
        "data": summarize([motion_stats(v) for v in data]),
        "generated": summarize([motion_stats(v) for v in generated]),
        "samples": generated,
        "clips": data,
        "prompts": [getattr(given, "prompt", "") or item["caption"] for given, item in zip(inputs, items, strict=True)],
    }
    if task.conditioning == "image":
        report["first_frame"] = first_frame_stats(model, [video[0] for video in data], generated)
    return report


def motion_gate_metrics(report: dict) -> dict[str, float]:
    """What the motion gate compares: how far the generated speed is from the data's
    (relative, 0 is right), how straight and how smooth the generated paths are."""
    data, generated = report["data"], report["generated"]
    return {
        "motion_speed_error": abs(generated["speed_px_per_frame"] / data["speed_px_per_frame"] - 1),
        "motion_straightness": generated["straightness"],
        "motion_jerk_px": generated["jerk_px"],
    }
