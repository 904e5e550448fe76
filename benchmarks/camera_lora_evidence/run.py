"""Evidence of whether the camera-motion LoRA finetune does what it is for: with full
sampling, whether each adapter makes the camera motion of the sampled videos its class
clearly more often than the base model does.

The base is a trained text-to-video model (`--base`: the motion evidence's Stage II
`full/final` folder, downloaded; a tiny model trained on one disc moving on black, which
it samples at a random constant velocity). Its data's world is kept and a camera is added
(`write_camera_shards(scene="discs")`: a black world of discs drawn like the base's,
panned horizontally at `--pan-px` px per frame, zoomed by `--zoom-rate` per frame or held
still, captioned as the base's clips: "a disc moving on black") -> the whole base
continued on the clips of every class (`--camera-steps`: a base that has seen camera
motion, as SVD's has from its curated data; the motion evidence's never saw a disc change
size and samples no zoom, nor can any adapter on it) -> one adapter per motion class
(`pan`, `zoom_in`, `zoom_out`, `static`), each trained on its class's clips only and
added to the previous result (the chain `vdm finetune camera-lora` and the
`finetune-camera-lora` pipeline run) -> the same seeds sampled in full (Heun) with that
base (no adapter) and with each adapter (at each `--strengths`), the global camera motion
of each video measured (model/camera_motion.py) and read as a class.

Each class's comparison samples at that class's motion score in the data (SVD's motion
micro-conditioning), the base as well as the adapter, and again at one score for every
class (`--common-motion`, the default request's 1.0; a list, e.g. `1,0,3`), where the
score does not ask for the class. `--camera-base DIR` keeps the continued base (most of
the run's time) and a later run with it reuses it: adapter experiments on one base.

Prints JSON to stdout (progress to stderr): per class and model, the fraction of its
videos that read as each class, the classes they read as, the mean |horizontal motion|,
|zoom| and signed zoom (px per frame at the frame's corner) and each video's (x, y,
zoom); each comparison's one-sided Fisher exact p-value (`*_p`: the adapter makes its
class more often than the base); the same figures for the data's clips through the
base's VAE (what the estimator reads when the motion is there); whether the base weights
are bit-identical after the adapters trained; wall times. Runs in-process on the model
API (no stack), on the GPU if there is one; docs/evidence/camera-lora.md gives the figures
of the defaults (about 90 minutes on one CPU thread of a 2-core machine, 40 reusing a base).

    OMP_NUM_THREADS=1 python benchmarks/camera_lora_evidence/run.py --base FOLDER [--strengths 1,2]
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

import torch
from scipy.stats import fisher_exact

from components.sample_data.shards import write_camera_shards
from model.camera_lora import MOTION_CLASSES, base_unet
from model.camera_motion import class_report, estimate, motion_class, motions_report
from model.conditioning import LatentCodec
from model.data import ClipDataset
from model.folder import ModelFolder
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train

PROMPT = "a disc moving on black"  # the base's caption, and the camera clips'


def model_report(videos: list[torch.Tensor], pan_px: float) -> dict:
    """How often the videos read as each motion class (and as a pan at least half the
    data's speed: a disc the base moves sideways reads as a pan too, a slower one), what
    they read as, their mean |horizontal motion|, |zoom| and zoom (> 0: in), and each
    one's (x, y, zoom) in px per frame."""
    motions = [estimate(v) for v in videos]  # once: each estimate fits 7 frame pairs
    first = motions_report(motions, next(iter(MOTION_CLASSES)))
    fast = [motion_class(m) == "pan" and abs(m.translation[0]) >= pan_px / 2 for m in motions]
    return {
        "match_rate": {c: first["classes"].get(c, 0) / len(motions) for c in MOTION_CLASSES},
        "fast_pan_rate": sum(fast) / len(fast),
        "classes": first["classes"],
        "abs_pan_px_per_frame": round(first["abs_pan_px_per_frame"], 3),
        "abs_zoom_px_per_frame": round(first["abs_zoom_px_per_frame"], 3),
        "mean_zoom_px_per_frame": round(sum(m.zoom for m in motions) / len(motions), 3),
        "videos_x_y_zoom": [[round(v, 2) for v in (*m.translation, m.zoom)] for m in motions],
    }


def p_more_often(adapter: dict, base: dict, wanted: str) -> float:
    """One-sided Fisher exact p-value of the adapter's videos reading as the class `wanted`
    more often than the base's (`model_report`s); we call the adapter clearly better below
    0.05 (16 videos each: 15 against 10 is 0.04, 13 against 9 is 0.13)."""
    table = [
        [r["classes"].get(wanted, 0), len(r["videos_x_y_zoom"]) - r["classes"].get(wanted, 0)] for r in (adapter, base)
    ]
    return round(float(fisher_exact(table, alternative="greater").pvalue), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the motion evidence's Stage II full/final folder")
    parser.add_argument("--clips-per-label", type=int, default=16)
    parser.add_argument("--pan-px", type=int, default=3, help="pan speed, px per frame at 32 px")
    parser.add_argument("--zoom-rate", type=float, default=1.1, help="magnification per frame")
    parser.add_argument(
        "--labels", default="pan_left,pan_right,zoom_in,zoom_out,static", help="camera labels of the clips written"
    )
    parser.add_argument("--classes", default=",".join(MOTION_CLASSES), help="adapters to train, in chain")
    # A slower, longer adapter: at lr 1e-2 for 600 steps the zoom_out adapter made its class
    # in 11-13 of 16 videos against the base's 9-10, and for 1500 steps it overshot.
    parser.add_argument("--adapter-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--camera-steps", type=int, default=9000, help="steps of the whole base on every class's clips first (0: none)"
    )
    parser.add_argument("--camera-batch-size", type=int, default=None, help="their batch (default: the base's)")
    parser.add_argument(
        "--camera-p-mean", type=float, default=None, help="their noise level (log sigma) mean (default: the base's)"
    )
    parser.add_argument(
        "--camera-base", type=Path, default=None,
        help="keep the continued base in this folder, or reuse the one there (adapter experiments on one base)",
    )  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes (a GPU outruns one)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--p-mean", type=float, default=1.0, help="training noise level (log sigma) mean")
    parser.add_argument("--seed", type=int, default=0, help="the adapters' training seed")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument(
        "--strengths", default="1", help="adapter strengths to sample each adapter at (LoRA multiplier; 1: as trained)"
    )
    parser.add_argument(
        "--common-motion", default="1.0",
        help="also sample every model at these motion scores (comma-separated), the same for every class",
    )  # fmt: skip
    parser.add_argument(
        "--motion-jitter", type=float, default=None,
        help="share of an adapter's clips trained at a random motion score (default: the camera-lora config's)",
    )  # fmt: skip
    parser.add_argument(
        "--motion-jitter-max", type=float, default=None,
        help="those scores' upper end, drawn from 0 (default: the camera-lora config's)",
    )  # fmt: skip
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1: none)")
    args = parser.parse_args()
    common_motions = [float(x) for x in args.common_motion.split(",")]
    wall = {}

    def timed(name, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        wall[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {wall[name]:.0f} s", file=sys.stderr)
        return out

    base_folder = args.base
    vae_folder = ModelFolder(base_folder).vae
    base_config = VideoDiffusion.load(base_folder).config
    clip = base_config.clip
    camera_p_mean = base_config.p_mean if args.camera_p_mean is None else args.camera_p_mean

    with tempfile.TemporaryDirectory(prefix="camera-lora-evidence-") as tmp:
        work = Path(tmp)
        paths, _ = timed(
            "shards", write_camera_shards, work / "shards", clips_per_label=args.clips_per_label, shards=2,
            num_frames=clip.num_frames, fps=clip.fps, size=clip.height, pan_px_per_frame=args.pan_px,
            zoom_rate_per_frame=args.zoom_rate, scene="discs", labels=tuple(args.labels.split(",")),
        )  # fmt: skip
        shards = [str(p) for p in paths]
        kept = args.camera_base and args.camera_base / "final"
        if kept and kept.is_dir():
            print(f"reusing the continued base {kept}", file=sys.stderr)
            base_folder = kept
        elif args.camera_steps:  # a base that has seen camera motion, as SVD's has in its curated data
            print(f"continuing the base on every class for {args.camera_steps} steps", file=sys.stderr)
            config = replace(
                base_config, vae=str(vae_folder), max_steps=args.camera_steps, checkpoint_every=args.camera_steps,
                log_every=max(1, args.camera_steps // 5), sample_every=None, num_workers=args.num_workers,
                batch_size=args.camera_batch_size or base_config.batch_size,
                p_mean=camera_p_mean,
                optim=replace(base_config.optim, lr=5e-4, warmup_steps=20),
            )  # fmt: skip
            base_folder = timed(
                "camera base", train, config, shards, args.camera_base or work / "camera-base", init_from=base_folder,
                on_log=lambda step, m: print(f"    step {step}: loss {m['loss']:.4f}", file=sys.stderr),
            ).final  # fmt: skip
        base_weights = {k: v.clone() for k, v in VideoDiffusion.load(base_folder).unet.state_dict().items()}

        lora = named_config("tiny", "camera-lora")
        if args.motion_jitter is not None:
            lora = lora.with_fields(motion_jitter=args.motion_jitter)
        if args.motion_jitter_max is not None:
            lora = lora.with_fields(motion_jitter_max=args.motion_jitter_max)
        folder, losses = base_folder, {}
        classes = args.classes.split(",")
        for motion_class in classes:
            print(f"training the {motion_class} adapter", file=sys.stderr)
            config = lora.with_fields(
                motion_class=motion_class, vae=str(vae_folder), clip=clip, max_steps=args.adapter_steps,
                checkpoint_every=args.adapter_steps, log_every=max(1, args.adapter_steps // 5),
                batch_size=args.batch_size, cond_dropout=0.0, p_mean=args.p_mean, num_workers=args.num_workers,
                lora_rank=args.rank, lora_alpha=float(args.rank), seed=args.seed,
                optim=replace(lora.optim, lr=args.lr, warmup_steps=10, ema_decay=0.9),
            )  # fmt: skip
            result = timed(
                f"train {motion_class}", train, config, shards, work / motion_class, init_from=folder,
                on_log=lambda step, m: print(f"    step {step}: loss {m['loss']:.4f}", file=sys.stderr),
            )  # fmt: skip
            folder = result.final
            tenth = max(1, len(result.losses) // 10)
            losses[motion_class] = [
                round(sum(part) / len(part), 4) for part in (result.losses[:tenth], result.losses[-tenth:])
            ]
        device = "cuda" if torch.cuda.is_available() else "cpu"  # sample where training ran
        model = VideoDiffusion.load(folder).to(device)
        trained_base = base_unet(model.unet).state_dict()

        report = {
            "base_folder": str(args.base),
            "camera_steps": args.camera_steps,
            "camera_p_mean": camera_p_mean,
            "camera_base": str(args.camera_base) if args.camera_base else None,
            "data": {"scene": "discs", "labels": args.labels, "clips_per_label": args.clips_per_label,
                     "pan_px_per_frame": args.pan_px, "zoom_rate_per_frame": args.zoom_rate,
                     "clip": [clip.num_frames, clip.fps, clip.height]},
            "adapter_steps": args.adapter_steps,
            "batch_size": args.batch_size,
            "camera_batch_size": args.camera_batch_size or base_config.batch_size,
            "lr": args.lr,
            "p_mean": args.p_mean,
            "lora_rank": args.rank,
            "motion_jitter": [lora.options.motion_jitter, lora.options.motion_jitter_max],
            "seed": args.seed,
            "loss_first_last_tenth": losses,
            "samples_per_model": args.samples,
            "sample_steps": args.sample_steps,
            "guidance": args.guidance,
            "strengths": args.strengths,
            "common_motion": common_motions,
            "prompt": PROMPT,
            "base_weights_unchanged": all(torch.equal(v, trained_base[k]) for k, v in base_weights.items()),
        }  # fmt: skip
        codec = LatentCodec.from_folder(vae_folder)
        report["data_through_vae"], motion_score = {}, {}
        written = set(args.labels.split(","))
        for motion_class, labels in MOTION_CLASSES.items():
            if not written & set(labels):
                continue
            data = ClipDataset(shards, clip, camera_motion=labels, random_crop=False, epochs=1)
            clips = list(itertools.islice(data, 6))
            motion_score[motion_class] = round(float(torch.stack([c["motion"] for c in clips]).mean()), 2)
            with torch.no_grad():
                through_vae = [codec.decode(codec.encode(c["video"][None]))[0] for c in clips]
            reading = class_report(through_vae, motion_class)
            report["data_through_vae"][motion_class] = {
                k: round(v, 3) if isinstance(v, float) else v for k, v in reading.items()
            }

        generation = GenerationConfig.for_clip(
            clip, steps=args.sample_steps, guidance_min=args.guidance, guidance_max=args.guidance
        )

        def sample(adapter: str | None, strength: float, motion: float) -> list[torch.Tensor]:
            settings = replace(generation, adapter=adapter, adapter_strength=strength, motion=motion)
            return [generate(model, PROMPT, replace(settings, seed=s)) for s in range(args.samples)]

        # Each class is sampled at its clips' motion score (the micro-conditioning one asks for
        # with that camera motion; a zoom's is not a static clip's 0), and the base at the same
        # score: one setting per comparison, the same seeds.
        strengths = [float(x) for x in args.strengths.split(",")]
        base_at: dict[float, dict] = {}

        def base_report(motion: float) -> dict:
            if motion not in base_at:
                videos = timed(f"sample base at {motion}", sample, None, 1.0, motion)
                base_at[motion] = model_report(videos, args.pan_px)
            return base_at[motion]

        for motion_class in classes:
            motion = motion_score[motion_class]
            entry = {"motion_score": motion, "base": base_report(motion)}
            for strength in strengths:
                name = "adapter" + ("" if strength == 1 else f"_x{strength:g}")
                videos = timed(f"sample {motion_class} {name}", sample, motion_class, strength, motion)
                entry[name] = model_report(videos, args.pan_px)
                entry[f"{name}_p"] = p_more_often(entry[name], entry["base"], motion_class)
            # At a score common to every class the base cannot tell which motion is wanted
            # from the micro-conditioning (at another class's, it is told another): the class
            # then comes from the adapter alone.
            entry["at_common_motion"] = {}
            for common in common_motions:
                videos = timed(f"sample {motion_class} at {common}", sample, motion_class, 1.0, common)
                adapter, base = model_report(videos, args.pan_px), base_report(common)
                entry["at_common_motion"][str(common)] = {
                    "base": base, "adapter": adapter, "adapter_p": p_more_often(adapter, base, motion_class)
                }  # fmt: skip
            report[motion_class] = entry
        report["wall_s"] = wall
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
