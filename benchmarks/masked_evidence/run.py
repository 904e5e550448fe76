"""Evidence that the masked finetunes (issue: finetunes, items 3 and 4) do what they are
for, on linear synthetic motion (discs at known constant velocity), with full sampling:

moving-shapes shards -> a tiny VAE trained on their frames (a random one does not
decode: nothing to track) -> the base video model (--base: a trained video model
folder, e.g. the motion evidence's Stage II; default: the tiny one untrained)
-> `interpolation` and `prediction` finetunes of it (the same loop as `vdm finetune`,
without the services) -> on held-out clips:

- interpolation: keys = frames 0, 4, 8 of 9-frame clips; mean |fraction - j/4| of the
  tracked disc in the in-between frames (and its distance from the linear position),
  for the finetune given the keys, the finetune given none, and the base model;
- prediction: velocity error (px/frame) of the continuation against the clip's own,
  given 2 context frames, 1 (position but no velocity), none, and the base model.

Prints JSON. Sized for a few minutes on a loaded 2-core CPU:

    python benchmarks/masked_evidence/run.py [--steps 100] [--vae-steps 120] [--eval-clips 4] [--sample-steps 6]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from components.sample_data.shards import write_shapes_shards
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec
from model.data import ClipDataset, ClipSpec
from model.evaluation import track
from model.masked import interpolate, predict
from model.masked_evaluation import interpolation_errors, velocity_error
from model.networks import CONFIGS, video_unet
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train

CLIP = {"fps": 12.0, "height": 32, "width": 32}  # the data's frame rate halved: up to 3 px per frame


class Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class Timed:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *_):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                print(f"  {name}: {clock.seconds[name]:.0f} s", file=sys.stderr)

        return Timed()


def clips(shards: list[str], num_frames: int, count: int, seed: int) -> list[torch.Tensor]:
    spec = ClipSpec(num_frames=num_frames, **CLIP)
    return [c["video"] for c in itertools.islice(ClipDataset(shards, spec, seed=seed, random_crop=False), count)]


def train_vae(shards: list[str], folder: Path, steps: int) -> tuple[Path, float]:
    frames = iter(ClipDataset(shards, ClipSpec(num_frames=4, **CLIP), seed=7))

    def batches():
        while True:
            yield torch.cat([next(frames)["video"] for _ in range(4)])

    vae = train_autoencoder(LatentCodec.tiny().vae, batches(), AutoencoderTraining(steps=steps, batch_frames=16))
    error = reconstruction_error(vae, next(batches()))
    vae.save_pretrained(folder)
    return folder, error


def finetune(kind: str, shards, base: Path, vae: Path, steps: int, workdir: Path) -> VideoDiffusion:
    config = named_config("tiny", kind)
    frames = 9 if kind == "interpolation" else 8
    config = replace(
        config,
        clip=ClipSpec(num_frames=frames, **CLIP),
        vae=str(vae),
        batch_size=4,
        max_steps=steps,
        checkpoint_every=steps,
        log_every=max(1, steps // 5),
        optim=replace(config.optim, lr=2e-3, warmup_steps=10, ema_decay=0.95),
    )

    def log(step: int, metrics: dict) -> None:
        print(f"    {kind} step {step}: loss {metrics['loss']:.3f}", file=sys.stderr)

    return train(config, shards, workdir, init_from=base, on_log=log).model


def mean(values: list[dict]) -> dict[str, float]:
    return {k: round(float(np.nanmean([v[k] for v in values])), 4) for k in values[0]}


def evaluate_interpolation(model, base, videos, config: GenerationConfig) -> dict:
    """Per condition, the mean of interpolation_errors with the data's tracked keys."""
    report = {"data": [], "finetune_given_keys": [], "finetune_no_keys": [], "base": []}
    for seed, video in enumerate(videos):
        keys = track(video[::4])
        settings = replace(config, seed=seed)
        report["data"].append(interpolation_errors(video, keys))
        report["finetune_given_keys"].append(interpolation_errors(interpolate(model, video[::4], settings), keys))
        report["finetune_no_keys"].append(interpolation_errors(generate(model, "", settings), keys))
        report["base"].append(interpolation_errors(generate(base, "", settings), keys))
    return {k: mean(v) for k, v in report.items()}


def evaluate_prediction(model, base, videos, config: GenerationConfig, length: int) -> dict:
    """Per condition, the velocity error (px/frame) from the last context frame on: over
    the first chunk's length, and over the whole `length`-frame video."""
    report = {"context_2": [], "context_1": [], "context_0": [], "base": []}
    for seed, video in enumerate(videos):
        velocity = (track(video)[-1] - track(video)[0]) / (len(video) - 1)
        settings = replace(config, seed=seed)
        for given in (2, 1, 0):
            long = predict(model, video[:given], length, settings)
            first = max(given - 1, 0)
            report[f"context_{given}"].append(
                {
                    "velocity_error": velocity_error(long[: len(video)], velocity, first),
                    "long_velocity_error": velocity_error(long, velocity, first),
                }
            )
        generated = generate(base, "", replace(settings, num_frames=len(video)))
        report["base"].append({"velocity_error": velocity_error(generated, velocity)})
    return {k: mean(v) for k, v in report.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=None, help="A trained video model folder (default: the tiny one at init).")
    parser.add_argument("--steps", type=int, default=100, help="Finetune steps per kind.")
    parser.add_argument("--vae-steps", type=int, default=120)
    parser.add_argument("--eval-clips", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=6)
    parser.add_argument("--context-guidance", type=float, default=1.5)
    parser.add_argument("--predict-frames", type=int, default=14)
    args = parser.parse_args()
    torch.manual_seed(0)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with clock("data"):
            train_paths, _ = write_shapes_shards(work / "train", shards=4, clips_per_shard=16, height=32, width=32)
            eval_paths, _ = write_shapes_shards(
                work / "eval", shards=1, clips_per_shard=16, height=32, width=32, seed=9
            )
            shards, held_out = [str(p) for p in train_paths], [str(p) for p in eval_paths]
        with clock("vae"):
            vae, vae_l1 = train_vae(shards, work / "vae", args.vae_steps)
        if args.base:
            base_folder = Path(args.base)
        else:
            # Untrained, with diffusers' initialisation of the temporal layers: the known frames
            # reach the others only through them, and the inflated model's are the identity.
            video = replace(named_config("tiny", "video"), vae=str(vae))
            base_folder = VideoDiffusion(video, video_unet(CONFIGS["tiny"])).save(work / "base")
        base = VideoDiffusion.load(base_folder)  # the tiny one saved with the trained VAE as its vae/
        models = {}
        for kind in ("interpolation", "prediction"):
            with clock(f"finetune_{kind}"):
                models[kind] = finetune(kind, shards, base_folder, vae, args.steps, work / kind)
        config = GenerationConfig(steps=args.sample_steps, context_guidance=args.context_guidance, **CLIP)
        with clock("eval_interpolation"):
            interpolation = evaluate_interpolation(
                models["interpolation"], base, clips(held_out, 9, args.eval_clips, 1), replace(config, num_frames=9)
            )
        with clock("eval_prediction"):
            prediction = evaluate_prediction(
                models["prediction"], base, clips(held_out, 8, args.eval_clips, 2), replace(config, num_frames=8),
                args.predict_frames,
            )  # fmt: skip
    report = {
        "settings": vars(args),
        "vae_reconstruction_l1": round(vae_l1, 4),
        "interpolation": interpolation,
        "prediction": prediction,
        "wall_s": clock.seconds,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
