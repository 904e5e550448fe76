"""Evidence that the video stage (Stage II) learns the frame-rate and motion
micro-conditioning, in one process on the CPU (no stack: the figures are the model's):

moving-shapes shards (a disc entering at the left edge and moving right at a speed drawn per
clip, 43 frames at 24 fps) -> the tiny VAE -> Stage I (text-to-image) -> Stage II trained
with `clip.fps_choices` [4, 8] (each clip drawn at whole strides 6 or 3 of the source,
conditioned on its real rate and on its motion per drawn frame) -> generation at fps 8 and 4
crossed with the motion the data has at 8 and at 4 fps, and at each rate with the slowest and
fastest clips' motion; the generated disc is tracked (model/evaluation.py) and its
displacement per frame compared with the data's at the same rates. Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/fps_evidence/run.py [--workdir DIR] [--reuse EARLIER_WORKDIR]

Method and figures: docs/evidence/fps.md.
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
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from model.data import ClipSpec

HERE = Path(__file__).parent
PROMPT = "a disc moving on black"
SOURCE_FPS = 24.0
# Just long enough for 8 frames at stride 6 (4 fps): those clips all start at the source's first
# frame, where the disc enters at the left edge; 8 fps clips (stride 3) start up to 21 frames in.
SOURCE_FRAMES = 43
# Every disc moves the same way, so the conditioning tells the denoiser where the disc goes: a
# random direction would leave the best guess at high noise the same whatever the speed.
DIRECTION = (1.0, 0.0)
# The speed range of the discs at the 64 px source, in px per source frame. At stride 6 (4 fps)
# the fastest moves 0.6 * 6 = 3.6 px per drawn frame: motion bucket 230 (255 at 4 px per frame,
# model/conditioning.py `motion_bucket`), so no bucket saturates; the slowest, 0.2 * 3 = 0.6 px
# per frame at 8 fps, still moves 2 px at 32x32 over 8 frames.
MIN_SPEED, MAX_SPEED = 0.2, 0.6


def sized(clip: ClipSpec, size: int) -> ClipSpec:
    return replace(clip, height=size, width=size)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def net_speed(frames: torch.Tensor) -> float:
    """Displacement per frame of the tracked disc from the first frame to the last: unlike the
    mean step it does not grow with frame-to-frame jitter."""
    from model.evaluation import track

    centres = track(frames)
    return float(np.linalg.norm(centres[-1] - centres[0]) / (len(centres) - 1))


def measured(videos: list[torch.Tensor]) -> dict[str, float]:
    from model.evaluation import motion_stats, summarize

    return summarize([motion_stats(v) for v in videos]) | {
        "net_px_per_frame": float(np.mean([net_speed(v) for v in videos]))
    }


@torch.no_grad()
def conditioning_gain(model, clips: dict[float, list[dict]], sigmas=(0.5, 1.0, 2.0, 5.0)) -> dict[str, float]:
    """The denoising loss of each rate's clips told their own fps and motion against the same
    clips told the other rate's (same noise levels, same noise), relative: above 0 the model uses
    what the conditioning says; 0, it ignores it."""
    from torch.utils.data import default_collate

    (fast, slow), gains = sorted(clips), {}
    for rate, other in ((fast, slow), (slow, fast)):
        batch = default_collate(clips[rate])
        swapped = batch | {"fps": torch.full_like(batch["fps"], other), "motion": batch["motion"] * rate / other}
        true, wrong = [], []
        for k, sigma in enumerate(sigmas):
            true.append(model.loss(batch, torch.Generator().manual_seed(k), sigma=sigma).item())
            wrong.append(model.loss(swapped, torch.Generator().manual_seed(k), sigma=sigma).item())
        gains[f"{rate:g}fps_clips"] = float(np.mean(wrong) / np.mean(true) - 1)
    return gains


def train_vae(shards: list[str], steps: int, size: int, folder: Path) -> Path:
    from model.autoencoder import AutoencoderTraining, train_autoencoder
    from model.conditioning import LatentCodec
    from model.data import ClipDataset, ClipSpec

    config = AutoencoderTraining(steps=steps)
    clips = iter(ClipDataset(shards, ClipSpec(num_frames=4, fps=8.0, height=size, width=size), seed=config.seed))

    def frames():
        while True:
            yield torch.cat([next(clips)["video"] for _ in range(config.batch_frames // 4)])

    vae = train_autoencoder(LatentCodec.tiny().vae, frames(), config)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the models here (default: a temporary folder)")
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument(
        "--size", type=int, default=32, help="Frame height and width the models train on (the source is 64x64)"
    )
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--image-steps", type=int, default=600)
    parser.add_argument("--video-steps", type=int, default=None, help="Stage II steps (default: video.yaml's)")
    parser.add_argument("--eval-clips", type=int, default=8, help="generated videos per (fps, motion) pair")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--min-speed", type=float, default=MIN_SPEED, help="px per source frame at 64 px")
    parser.add_argument("--max-speed", type=float, default=MAX_SPEED, help="px per source frame at 64 px")
    parser.add_argument(
        "--random-direction", action="store_true", help="Each disc its own direction (per-axis speed up to --max-speed)"
    )
    parser.add_argument("--p-mean", type=float, default=None, help="Stage II's training noise, ln sigma's mean")
    parser.add_argument("--p-std", type=float, default=None, help="and its standard deviation (default: video.yaml's)")
    parser.add_argument(
        "--measure-every",
        type=int,
        default=None,
        help="Also measure Stage II after every N steps (default: at the end)",
    )
    parser.add_argument("--stage-2", type=Path, default=None, help="Measure this Stage II folder, trained before")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="An earlier --workdir: its VAE and Stage I (they see frames only)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    from components.sample_data.shards import write_shapes_shards
    from model.conditioning import motion_bucket
    from model.data import ClipDataset
    from model.pipeline import GenerationConfig, generate
    from model.stages import StageConfig, VideoDiffusion
    from model.train import train

    with tempfile.TemporaryDirectory(prefix="vdm-fps-evidence-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths, _ = write_shapes_shards(
            work / "shapes", shards=8, clips_per_shard=args.clips // 8, num_frames=SOURCE_FRAMES, fps=SOURCE_FPS,
            height=64, width=64, max_speed=args.max_speed, seed=1,
            direction=None if args.random_direction else DIRECTION, from_edge=not args.random_direction,
            min_speed=0.0 if args.random_direction else args.min_speed,
        )  # fmt: skip
        shards = [str(p) for p in paths]
        seconds: dict[str, float] = {}

        if args.reuse or args.stage_2:
            vae, stage_1 = (args.reuse or work) / "vae", (args.reuse or work) / "stage1" / "final"
        else:
            clock = time.perf_counter()
            vae = train_vae(shards, args.vae_steps, args.size, work / "vae")
            seconds["vae"] = time.perf_counter() - clock
            log(f"vae: {seconds['vae']:.0f} s")

            clock = time.perf_counter()
            image = StageConfig.load(HERE / "image.yaml")
            image = replace(image, vae=str(vae), max_steps=args.image_steps, clip=sized(image.clip, args.size))
            image = replace(image, checkpoint_every=args.image_steps)
            stage_1 = train(image, shards, work / "stage1").final
            seconds["stage_1"] = time.perf_counter() - clock
            log(f"stage 1: {seconds['stage_1']:.0f} s")

        # The data at each generated rate, through the same tracker, and the motion value it is
        # conditioned on there (the curated score times the stride).
        video = StageConfig.load(HERE / "video.yaml")
        video = replace(video, vae=str(vae), clip=sized(video.clip, args.size))
        if args.stage_2:  # its clip (size, rates) decides what the data is measured at
            trained_before = VideoDiffusion.load(args.stage_2).eval()
            video = trained_before.config
        data, motions, clips = {}, {}, {}
        for fps in (8.0, 4.0):
            spec = replace(video.clip, fps=fps).single_rate()
            # Each item's motion per drawn frame at `fps`, as the several-rate loader gives it.
            clips[fps] = list(itertools.islice(iter(ClipDataset(shards, spec, random_crop=False)), 32))
            motions[fps] = float(np.mean([item["motion"].item() for item in clips[fps]]))
            data[f"{fps:g}fps"] = measured([item["video"] for item in clips[fps]]) | {
                "motion": motions[fps],
                "motion_bucket_max": float(motion_bucket(torch.stack([item["motion"] for item in clips[fps]])).max()),
            }
        slow, fast = (args.min_speed, args.max_speed) if not args.random_direction else (0.0, args.max_speed)

        def measure(model) -> dict:
            """The loss gain, the generated videos' figures and their ratios for one Stage II."""
            clock = time.perf_counter()
            # Relative denoising-loss increase when each rate's clips are told the other rate.
            report = {"loss_gain_of_true_conditioning": conditioning_gain(model, clips), "generated": {}}
            log(f"loss gain: {report['loss_gain_of_true_conditioning']}")
            requests = {  # name: (fps, motion)
                f"{fps:g}fps_motion_of_{of:g}fps": (fps, motions[of])
                for fps, of in itertools.product((8.0, 4.0), repeat=2)
            }
            # Within one rate the motion value tells the speed: the slowest and the fastest clips' at
            # each rate (speed per source frame times the stride).
            for fps in (8.0, 4.0):
                requests |= {
                    f"{fps:g}fps_motion_of_{name}": (fps, speed * SOURCE_FPS / fps)
                    for name, speed in (("slowest", slow), ("fastest", fast))
                }
            for name, (fps, motion) in requests.items():
                config = GenerationConfig.for_clip(video.clip, fps=fps, motion=motion, steps=args.sample_steps)
                videos = [generate(model, PROMPT, replace(config, seed=seed)) for seed in range(args.eval_clips)]
                report["generated"][name] = measured(videos) | {"fps": fps, "motion": motion}
                log(f"{name}: {report['generated'][name]}")
            generated = report["generated"]
            for figure in ("speed_px_per_frame", "net_px_per_frame"):
                report[f"ratio_4fps_over_8fps_{figure}"] = {
                    "data": data["4fps"][figure] / data["8fps"][figure],
                    # fps and motion as the data has them at each rate
                    "fps_and_motion": generated["4fps_motion_of_4fps"][figure]
                    / generated["8fps_motion_of_8fps"][figure],
                    # fps alone (motion held at 8 fps's) and motion alone (fps held at 8)
                    "fps_alone": generated["4fps_motion_of_8fps"][figure] / generated["8fps_motion_of_8fps"][figure],
                    "motion_alone": generated["8fps_motion_of_4fps"][figure] / generated["8fps_motion_of_8fps"][figure],
                }
                # at each rate, the fastest clips' motion over the slowest's (the data: max / min speed)
                for fps in ("8fps", "4fps"):
                    report[f"ratio_fastest_over_slowest_at_{fps}_{figure}"] = (
                        generated[f"{fps}_motion_of_fastest"][figure] / generated[f"{fps}_motion_of_slowest"][figure]
                    )
            seconds["generation"] = seconds.get("generation", 0.0) + time.perf_counter() - clock
            return report

        if args.stage_2:
            model, measured_at = trained_before, {}
        else:
            steps = args.video_steps or video.max_steps
            every = args.measure_every or steps
            noise = {k: v for k, v in (("p_mean", args.p_mean), ("p_std", args.p_std)) if v is not None}
            video = replace(video, max_steps=steps, checkpoint_every=every, **noise)
            # Stage II trained to each measuring point in turn, resumed exactly from the last one.
            measured_at, checkpoint, seconds["stage_2"] = {}, None, 0.0
            for target in sorted({*range(every, steps, every), steps}):
                clock = time.perf_counter()
                trained = train(
                    replace(video, max_steps=target), shards, work / "stage2", init_from=stage_1, resume=checkpoint
                )
                seconds["stage_2"] += time.perf_counter() - clock
                log(f"stage 2, step {target}: {seconds['stage_2']:.0f} s in all")
                checkpoint, model = work / "stage2" / f"checkpoint-{target:08d}", trained.model.eval()
                if target < steps:
                    measured_at[target] = measure(model)

        report = {
            "fps_choices": list(video.clip.fps_choices),
            "source_fps": SOURCE_FPS,
            "direction": None if args.random_direction else list(DIRECTION),
            "speed_range_px_per_source_frame": [0.0 if args.random_direction else args.min_speed, args.max_speed],
            "video_steps": video.max_steps,
            "training_noise": {"p_mean": video.p_mean, "p_std": video.p_std},
            "data": data,
        } | measure(model)
        if measured_at:  # the same figures at the earlier measuring points
            report["at_earlier_steps"] = measured_at
        report["wall_s"] = {k: round(v, 1) for k, v in seconds.items()}
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
