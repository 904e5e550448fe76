"""Evidence that the masked finetunes (interpolation and prediction) do what they are
for, on linear synthetic motion (discs at known constant velocity), with full sampling:

moving-shapes shards -> the base video model: --base, a trained video model folder
(the motion evidence's Stage II `full/final`, downloaded: it draws and moves discs; pass
--size 64, the size of the data it trained on) and its VAE; or, without one, a tiny VAE
trained here on the frames (a random one does not decode: nothing to track) and the tiny
video model untrained -> `interpolation` and `prediction` finetunes of it (the same loop
as `vdm finetune`, without the services) -> on held-out clips:

- interpolation: keys = frames 0, 4, 8 of 9-frame clips; mean |fraction - j/4| of the
  tracked disc in the in-between frames (and its distance from the linear position),
  for the finetune given the keys, the finetune given none, and the base model;
- prediction: velocity error (px/frame) of the continuation against the clip's own,
  given 2 context frames, 1 (position but no velocity), none, and the base model.

Prints JSON. Sized for a few minutes on a loaded 2-core CPU:

    python benchmarks/masked_evidence/run.py [--steps 100] [--vae-steps 120] [--eval-clips 4] [--sample-steps 6]
    python benchmarks/masked_evidence/run.py --base FOLDER --size 64 --steps 600 --eval-clips 8

Figures of a run from a trained base: docs/evidence/masked.md.
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

SIZE = {"height": 32, "width": 32}


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


def clips(shards: list[str], spec: ClipSpec, count: int, seed: int) -> list[torch.Tensor]:
    return [c["video"] for c in itertools.islice(ClipDataset(shards, spec, seed=seed, random_crop=False), count)]


def train_vae(shards: list[str], folder: Path, steps: int) -> tuple[Path, float]:
    frames = iter(ClipDataset(shards, ClipSpec(num_frames=4, fps=12.0, **SIZE), seed=7))

    def batches():
        while True:
            yield torch.cat([next(frames)["video"] for _ in range(4)])

    vae = train_autoencoder(LatentCodec.tiny().vae, batches(), AutoencoderTraining(steps=steps, batch_frames=16))
    error = reconstruction_error(vae, next(batches()))
    vae.save_pretrained(folder)
    return folder, error


def finetune(kind: str, spec: ClipSpec, shards, base: Path, vae: Path, steps: int, lr: float, workdir: Path):
    config = named_config("tiny", kind)
    config = replace(
        config,
        clip=spec,
        vae=str(vae),
        batch_size=4,
        max_steps=steps,
        checkpoint_every=steps,
        log_every=max(1, steps // 5),
        optim=replace(config.optim, lr=lr, warmup_steps=10, ema_decay=0.95),
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
    """Per condition: the distance (px) of the first generated frame's object from where
    the clip's is in that frame (what the context says: 0 context frames give a random
    place); the velocity error (px/frame) from the last context frame on, over the first
    chunk's length and over the whole `length`-frame video."""
    report = {"context_2": [], "context_1": [], "context_0": [], "base": []}
    for seed, video in enumerate(videos):
        truth = track(video)
        velocity = (truth[-1] - truth[0]) / (len(video) - 1)
        settings = replace(config, seed=seed)
        for given in (2, 1, 0):
            long = predict(model, video[:given], length, settings)
            first = max(given - 1, 0)
            report[f"context_{given}"].append(
                {
                    "next_position_error_px": float(np.linalg.norm(track(long[given : given + 1])[0] - truth[given])),
                    "velocity_error": velocity_error(long[: len(video)], velocity, first),
                    "long_velocity_error": velocity_error(long, velocity, first),
                }
            )
        generated = generate(base, "", replace(settings, num_frames=len(video)))
        report["base"].append(
            {
                "next_position_error_px": float(np.linalg.norm(track(generated[:1])[0] - truth[0])),
                "velocity_error": velocity_error(generated, velocity),
            }
        )
    return {k: mean(v) for k, v in report.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=None, help="A trained video model folder (default: the tiny one at init).")
    parser.add_argument("--size", type=int, default=32, help="Frame size of the shapes data written (the base's).")
    parser.add_argument("--kinds", default="interpolation,prediction")
    parser.add_argument("--steps", type=int, default=100, help="Finetune steps per kind.")
    parser.add_argument("--lr", type=float, default=2e-3, help="Finetune learning rate (lower from a trained base).")
    parser.add_argument("--vae-steps", type=int, default=120)
    parser.add_argument("--eval-clips", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=6)
    parser.add_argument("--context-guidance", type=float, default=1.5)
    # 9 frames 4 apart need 17 of the data's 24: 12 fps at most. Prediction's displacement per
    # frame must be visible in 8x8 latents: 12 fps moves 32 px discs up to 3 px a frame, the
    # 64 px data resized (--size 64) only 1.5: give it the base's 8 fps there.
    parser.add_argument("--prediction-fps", type=float, default=12.0)
    parser.add_argument("--predict-frames", type=int, default=14)
    args = parser.parse_args()
    torch.manual_seed(0)
    clock = Clock()
    specs = {
        "interpolation": ClipSpec(num_frames=9, fps=12.0, **SIZE),
        "prediction": ClipSpec(num_frames=8, fps=args.prediction_fps, **SIZE),
    }
    report = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with clock("data"):
            size = {"height": args.size, "width": args.size}
            train_paths, _ = write_shapes_shards(work / "train", shards=4, clips_per_shard=16, **size)
            eval_paths, _ = write_shapes_shards(work / "eval", shards=1, clips_per_shard=16, seed=9, **size)
            shards, held_out = [str(p) for p in train_paths], [str(p) for p in eval_paths]
        if args.base:
            base_folder, vae = Path(args.base), Path(args.base) / "vae"
        else:
            with clock("vae"):
                vae, report["vae_reconstruction_l1"] = train_vae(shards, work / "vae", args.vae_steps)
            # Untrained, with diffusers' initialisation of the temporal layers: the known frames
            # reach the others only through them, and the inflated model's are the identity.
            video = replace(named_config("tiny", "video"), vae=str(vae))
            base_folder = VideoDiffusion(video, video_unet(CONFIGS["tiny"])).save(work / "base")
        base = VideoDiffusion.load(base_folder)  # the tiny one saved with the trained VAE as its vae/
        for kind in args.kinds.split(","):
            spec = specs[kind]
            with clock(f"finetune_{kind}"):
                model = finetune(kind, spec, shards, base_folder, vae, args.steps, args.lr, work / kind)
            config = GenerationConfig(
                steps=args.sample_steps, context_guidance=args.context_guidance, num_frames=spec.num_frames,
                fps=spec.fps, height=spec.height, width=spec.width,
            )  # fmt: skip
            videos = clips(held_out, spec, args.eval_clips, 1)
            with clock(f"eval_{kind}"):
                if kind == "interpolation":
                    report[kind] = evaluate_interpolation(model, base, videos, config)
                else:
                    report[kind] = evaluate_prediction(model, base, videos, config, args.predict_frames)
    report["wall_s"] = clock.seconds
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
