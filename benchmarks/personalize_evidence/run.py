"""Evidence that `vdm personalize` puts a new subject into a video model's videos and keeps
its motion, end to end through the CLI against the local stack (a smaller chain than the
motion evidence's):

moving-shapes shards (solid discs, every channel of their colour >= 96) -> `vdm train-vae`
(also on discs of any colour, standing in for a general pretrained VAE) -> `vdm train --stage
image` -> `vdm train --stage video --strategy partial` (temporal layers only, as Video LDM) ->
`vdm personalize` on 5 images of a subject no clip has (`--subject ring`: a magenta ring;
`stripes`: a disc striped magenta and cyan; with `--realign-steps`, realigned on the shapes
data) -> videos of "a sks disc" (`--class-noun`: the class) from the personalized
model and from the video model it came from, and of "a disc" from both (does the class stay
itself?). Per model and prompt: the ring's hole contrast, the fraction of subject-coloured
pixels, the colour-histogram distance to the subject images, and the tracked motion
(model/evaluation.py) against the data's. Steps whose output exists under `--prefix` are kept.

    OMP_NUM_THREADS=1 python benchmarks/personalize_evidence/run.py [--prefix s3://vdm/evidence/personalize/run-X]

Method and figures: docs/evidence/personalize.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).parent
SIZE = 32
# The subject's stripes: magenta and cyan, each with a channel far below the data's 96.
STRIPES = np.array([[235, 20, 200], [20, 210, 235]], dtype=np.uint8)
STRIPE_PX = 3
RING = (9, 4)  # outer and hole radius of the ring subject, pixels (--ring)
COLOUR_RADIUS = 0.5  # in [-1, 1] units (64/255): a pixel this close to a stripe colour is the subject's
BINS = 4  # per channel, for the colour histogram


def vdm(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"vdm {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    print(f"  vdm {args[0]}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return result.stdout, time.perf_counter() - start


def write_colour_shards(folder: Path, clips: int, seed: int = 11) -> None:
    """Moving discs in colours drawn from the whole RGB cube, for the VAE only: it stands in for a
    general pretrained VAE (SD's), which represents any colour; the diffusion models never see these."""
    import webdataset as wds

    from components.common.media import write_video
    from components.sample_data.render import moving_shapes
    from components.sample_data.shards import clip_metadata
    from model.records import STATIC

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(folder / "colours-000000.tar"), mtime=0) as tar, tempfile.TemporaryDirectory() as tmp:
        for c in range(clips):
            clip = moving_shapes(24, SIZE, SIZE, num_shapes=1, max_speed=1.5, radius_range=(5, 7), seed=seed * 1000 + c)
            colour = rng.integers(0, 256, size=3)
            frames = (clip.frames.astype(np.float32) * colour / clip.colors[0]).clip(0, 255).round().astype(np.uint8)
            key = f"colours-{seed:04d}-{c:04d}"
            video = Path(tmp) / f"{key}.mp4"
            write_video(video, frames, 24.0)
            meta = clip_metadata(key, 24, 24.0, 1.0, STATIC, "a disc moving on black")
            tar.write({"__key__": key, "mp4": video.read_bytes(), "json": meta.to_json()})


def subject_images(folder: Path, shape: str, ring: tuple[int, int] = RING, count: int = 5) -> Path:
    """`count` PNGs of the subject at different places on black: a disc striped magenta and cyan
    (radius 6, `stripes`) or a magenta ring (`ring`: outer and hole radius, pixels)."""
    import cv2
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    ys = np.arange(SIZE)[:, None, None]
    for i in range(count):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if shape == "ring":
            x, y = (round(v) for v in rng.uniform(ring[0] + 1, SIZE - ring[0] - 1, size=2))
            cv2.circle(mask, (x, y), ring[0], 255, thickness=-1, lineType=cv2.LINE_AA)
            cv2.circle(mask, (x, y), ring[1], 0, thickness=-1, lineType=cv2.LINE_AA)
            colour = np.broadcast_to(STRIPES[0].astype(np.float32), (SIZE, SIZE, 3))
        else:
            x, y = (round(v) for v in rng.uniform(8, SIZE - 8, size=2))
            cv2.circle(mask, (x, y), 6, 255, thickness=-1, lineType=cv2.LINE_AA)
            stripes = np.where((ys // STRIPE_PX) % 2 == 0, STRIPES[0], STRIPES[1]).astype(np.float32)
            colour = np.broadcast_to(stripes, (SIZE, SIZE, 3))
        image = (colour * (mask[..., None] / 255.0)).round().astype(np.uint8)
        Image.fromarray(image).save(folder / f"sks-{i}.png")
    return folder


def hole_contrast(frames: torch.Tensor, ring: tuple[int, int] = RING) -> float:
    """How hollow the tracked object is, per frame, averaged: 1 - (mean brightness within HOLE - 2
    px of its centre, at least 1) / (mean brightness HOLE + 1 to OUTER px from it), for the `ring`
    (OUTER, HOLE): within 2 px and 5 to 9 px for the 9/4 ring. A ring's dark hole gives about 1, a
    solid shape 0 or below."""
    from model.evaluation import track

    luma = (frames.float().mean(dim=-3) + 1) / 2  # (T, H, W) in [0, 1]
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    values = []
    for frame, (cx, cy) in zip(luma, track(frames), strict=True):
        distance = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        centre = frame[distance <= max(ring[1] - 2, 1)].mean()
        band = frame[(distance >= ring[1] + 1) & (distance <= ring[0])].mean()
        values.append(float(1 - centre / band.clamp(min=1e-3)))
    return float(np.mean(values))


def _pixels(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3) pixels of frames (..., 3, H, W) in [-1, 1]."""
    return frames.float().movedim(-3, -1).reshape(-1, 3)


def subject_colour_fraction(frames: torch.Tensor) -> dict[str, float]:
    """Fraction of all pixels near each stripe colour (and either)."""
    pixels = _pixels(frames)
    centres = torch.from_numpy(STRIPES).float() / 127.5 - 1
    near = torch.cdist(pixels, centres) < COLOUR_RADIUS  # (N, 2)
    return {
        "magenta": float(near[:, 0].float().mean()),
        "cyan": float(near[:, 1].float().mean()),
        "subject": float(near.any(dim=1).float().mean()),
    }


def colour_histogram(frames: torch.Tensor) -> torch.Tensor:
    """Normalised BINS^3 RGB histogram of the non-background pixels (brightest channel above 50/255)."""
    pixels = _pixels(frames)
    pixels = pixels[pixels.amax(dim=1) > -0.6]
    if len(pixels) == 0:
        return torch.zeros(BINS**3)
    index = ((pixels.clamp(-1, 1) + 1) / 2 * BINS).long().clamp(max=BINS - 1)
    flat = index[:, 0] * BINS * BINS + index[:, 1] * BINS + index[:, 2]
    counts = torch.bincount(flat, minlength=BINS**3).float()
    return counts / counts.sum()


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance of two colour histograms: 0 the same colours, 1 none shared."""
    return float(0.5 * (colour_histogram(a) - colour_histogram(b)).abs().sum())


def measure(
    model, prompt: str, subject: torch.Tensor, videos: int, steps: int, motion: float, ring: tuple[int, int]
) -> dict:
    from model.evaluation import motion_stats, summarize
    from model.pipeline import GenerationConfig, generate

    config = GenerationConfig.for_clip(model.config.clip, steps=steps, motion=motion)
    generated = [generate(model, prompt, replace(config, seed=seed)) for seed in range(videos)]
    stacked = torch.stack(generated)
    return {
        "colour_fraction": subject_colour_fraction(stacked),
        "histogram_distance_to_subject": histogram_distance(stacked, subject),
        "hole_contrast": float(np.mean([hole_contrast(v, ring) for v in generated])),
        "motion": summarize([motion_stats(v) for v in generated]),
    }, generated


def ring_radii(text: str) -> tuple[int, int]:
    try:
        outer, hole = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"OUTER,HOLE in pixels, such as 9,4; not {text!r}") from None
    if not 0 < hole < outer < SIZE // 2:
        raise argparse.ArgumentTypeError(f"need 0 < HOLE < OUTER < {SIZE // 2}, got {text!r}")
    return outer, hole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", default=f"s3://vdm/evidence/personalize/run-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--image-steps", type=int, default=500)
    parser.add_argument("--video-steps", type=int, default=800)
    parser.add_argument("--personalize-steps", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=8, help="Videos per model and prompt.")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--motion", type=float, default=None, help="Motion score to ask for (default: the data's mean)")
    parser.add_argument("--p-mean", type=float, default=None, help="Stage II's training noise, ln sigma's mean")
    parser.add_argument("--p-std", type=float, default=None, help="and its standard deviation (default: video.yaml's)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--class-images", type=int, default=8, help="vdm personalize --class-images (the prior)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="DreamBooth's.")
    parser.add_argument("--lora-rank", type=int, default=None, help="DreamBooth-LoRA rank (default: every weight)")
    parser.add_argument("--subject", choices=("ring", "stripes"), default="ring")
    parser.add_argument("--ring", type=ring_radii, default=RING, help="OUTER,HOLE radius of the ring, pixels")
    parser.add_argument(
        "--kinds", default="disc", help="Shapes of the training clips, comma-separated (render.py SHAPE_KINDS)"
    )
    parser.add_argument(
        "--class-noun", default="disc", help="vdm personalize --class-noun: the subject's class among --kinds"
    )
    parser.add_argument("--personal", default="personal", help="Folder under --prefix of the personalized model.")
    parser.add_argument("--realign-steps", type=int, default=0, help="vdm personalize --realign-steps on the data")
    parser.add_argument("--realign-stills", type=int, default=1, help="vdm personalize --realign-stills")
    parser.add_argument("--seed", type=int, default=0, help="vdm personalize --seed (DreamBooth, realignment)")
    parser.add_argument("--samples", type=Path, default=Path("/tmp/personalize-evidence.png"), help="A frame grid.")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.sample_data.shards import write_shapes_shards
    from model.data import ClipDataset
    from model.evaluation import motion_stats, summarize
    from model.stages import VideoDiffusion

    vdm("stack", "up")
    store = ObjectStore.from_settings(load_settings())
    p = args.prefix.rstrip("/")
    data = f"{p}/shapes"
    seconds: dict[str, float] = {}

    def done(folder: str) -> bool:  # a step of an earlier run under the same prefix: kept (--prefix to reuse)
        return store.exists(f"{p}/{folder}/_MANIFEST.json")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not done("shapes"):
            write_shapes_shards(tmp / "shapes", shards=4, clips_per_shard=args.clips // 4, num_frames=24,
                                height=SIZE, width=SIZE, seed=3, kinds=tuple(args.kinds.split(",")))  # fmt: skip
            store.publish_folder(tmp / "shapes", data)
        else:
            store.download_folder(data, tmp / "shapes")
        images = subject_images(tmp / "subject", args.subject, args.ring)
        if not done("vae"):
            store.download_folder(data, tmp / "vae-data" / "shapes")
            write_colour_shards(tmp / "vae-data" / "colours", args.clips)
            store.publish_folder(tmp / "vae-data", f"{p}/vae-data")
            _, seconds["vae"] = vdm("train-vae", "--data", f"{p}/vae-data", "--output", f"{p}/vae", "--size",
                                    str(SIZE), "--max-steps", str(args.vae_steps))  # fmt: skip
        if not done("stage1/final"):
            _, seconds["stage_1"] = vdm(
                "train", "--stage", "image", "--config", str(HERE / "image.yaml"), "--data", data,
                "--max-steps", str(args.image_steps), "--output", f"{p}/stage1", "--vae", f"{p}/vae",
            )  # fmt: skip
        if not done("video/final"):
            video_config = yaml.safe_load((HERE / "video.yaml").read_text())
            video_config |= {k: v for k, v in (("p_mean", args.p_mean), ("p_std", args.p_std)) if v is not None}
            (tmp / "video.yaml").write_text(yaml.safe_dump(video_config))
            _, seconds["stage_2_partial"] = vdm(
                "train", "--stage", "video", "--config", str(tmp / "video.yaml"), "--data", data,
                "--init-from", f"{p}/stage1/final", "--max-steps", str(args.video_steps), "--output", f"{p}/video",
            )  # fmt: skip
        personal = f"{p}/{args.personal}"
        if not done(f"{args.personal}/final"):
            out, seconds["personalize"] = vdm(
                "personalize", "--images", str(images), "--token", "sks", "--class-noun", args.class_noun,
                "--image-model", f"{p}/stage1/final", "--video-model", f"{p}/video/final", "--output", personal,
                "--max-steps", str(args.personalize_steps), "--prior-loss-weight", str(args.prior_loss_weight),
                "--class-images", str(args.class_images), "--learning-rate", str(args.learning_rate),
                *(["--lora-rank", str(args.lora_rank)] if args.lora_rank else []),
                "--realign-data", data, "--realign-steps", str(args.realign_steps),
                "--realign-stills", str(args.realign_stills), "--seed", str(args.seed),
            )  # fmt: skip
            print(out, file=sys.stderr)

        from components.training.personalize import read_subject_images, subject_image_files

        subject = read_subject_images(subject_image_files(str(images), store), store, SIZE, SIZE)
        models = {}
        for name, folder in (("base", f"{p}/video/final"), ("personalized", f"{personal}/final")):
            store.download_folder(folder, tmp / name)
            models[name] = VideoDiffusion.load(tmp / name)
        spec = models["base"].config.clip
        shards = [str(x) for x in sorted((tmp / "shapes").rglob("*.tar"))]
        loaded = list(itertools.islice(ClipDataset(shards, spec, random_crop=False), args.videos))
        clips = [item["video"] for item in loaded]
        motion = args.motion if args.motion is not None else float(np.mean([float(item["motion"]) for item in loaded]))
        codec = models["base"].codec
        with torch.no_grad():  # what the VAE can give back of the subject: the ceiling of any generation
            through_vae = codec.decode(codec.encode(subject[:, None]))[:, 0]
        report = {
            "prefix": p,
            "personalized": personal,
            "realign_stills": args.realign_stills,
            "steps": {k: getattr(args, f"{k}_steps") for k in ("vae", "image", "video", "personalize", "realign")},
            "prior_loss_weight": args.prior_loss_weight,
            "class_images": args.class_images,
            "learning_rate": args.learning_rate,
            "lora_rank": args.lora_rank,
            "training_noise": {"p_mean": models["base"].config.p_mean, "p_std": models["base"].config.p_std},
            "motion_requested": motion,
            "wall_s": {k: round(v, 1) for k, v in seconds.items()},
            "subject": args.subject,
            "ring": list(args.ring),
            "kinds": args.kinds.split(","),
            "class_noun": args.class_noun,
            "subject_images": {
                "colour_fraction": subject_colour_fraction(subject),
                "hole_contrast": float(np.mean([hole_contrast(image[None], args.ring) for image in subject])),
            },
            "subject_through_vae": {
                "colour_fraction": subject_colour_fraction(through_vae),
                "histogram_distance_to_subject": histogram_distance(through_vae, subject),
                "hole_contrast": float(np.mean([hole_contrast(image[None], args.ring) for image in through_vae])),
            },
            "data": {
                "colour_fraction": subject_colour_fraction(torch.stack(clips)),
                "histogram_distance_to_subject": histogram_distance(torch.stack(clips), subject),
                "hole_contrast": float(np.mean([hole_contrast(v, args.ring) for v in clips])),
                "motion": summarize([motion_stats(v) for v in clips]),
            },
        }
        from components.training.run import frame_grid, write_png

        rows = [subject, through_vae]
        for name, model in models.items():
            for prompt in (f"a sks {args.class_noun}", f"a {args.class_noun}"):
                figures, videos = measure(model, prompt, subject, args.videos, args.sample_steps, motion, args.ring)
                report[f"{name} / {prompt}"] = figures
                rows += videos[:2]
        # One picture: the subject images, them through the VAE, then two videos per model and prompt (order above).
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        write_png(frame_grid(rows, columns=8, min_side=32), args.samples)
        report["samples"] = str(args.samples)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
