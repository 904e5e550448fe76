"""Evidence for the image-only spatial finetune: the motion metric (`vdm eval`)
does not degrade while the image-quality proxy improves on the image set's
distribution. Full sampling on both models, same seeds.

Proxy (known target): the synthetic high-quality image set draws its discs fully
saturated (foreground HSV saturation 1.0), the video data's discs are greyish (about
0.3); `saturation_gap` = |saturation of the generated object - the image set's|,
lower is better (model/spatial.py). Motion: `vdm eval`'s figures (tracked
speed, straightness, jerk) and the promotion gate's `motion_speed_error`, on the
video data, for the base model and the finetune.

The base is a trained video model folder (`--base`, e.g. `make evidence`'s
Stage II `full/final`, downloaded, with the video shards it trained on as
`--video-data`); without one, the script makes a small one here first (a tiny VAE
and Stage II from scratch on moving discs: it moves little, so its motion figures
are a baseline to hold, not a good video model). In-process (model level, no stack),
so it fits a few minutes on a loaded 2-core machine:

    python benchmarks/spatial_hq_evidence/run.py [--steps 150] [--base FOLDER --video-data FOLDER]

The motion evidence's VAE was trained on the greyish video frames alone and decodes
every disc nearly grey (saturation 0.07 for data at 0.31, 0.06 for the image set's 1.0):
no finetune of the UNet could show the proxy through it. `--refine-decoder STEPS`
finetunes a copy of the base's VAE decoder on frames of both sets first (encoder and
scaling frozen, as SD's ft-MSE decoder was: the latents, and so the base model, are
unchanged); the report gives both sets' saturation through the VAE before and after
(the proxy's ceiling). With the base, draw the images at the video data's size
(`--image-size 64`), so the discs differ from the video's in colour, not in size:

    python benchmarks/spatial_hq_evidence/run.py --base FOLDER --video-data FOLDER \
        --image-size 64 --refine-decoder 800 --steps 600 --lr 5e-4

Figures of a run from a trained base: docs/evidence/spatial-hq.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from components.sample_data.palette import write_palette_image_shards
from components.sample_data.shards import write_shapes_shards
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec, added_time_ids
from model.data import ClipDataset, ClipSpec, ImageDataset
from model.evaluation import evaluate_motion, motion_gate_metrics
from model.networks import is_temporal
from model.samplers import SAMPLERS, karras_sigmas
from model.spatial import foreground_saturation, palette_report
from model.stages import VideoDiffusion, named_config
from model.train import train


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quick_base(video: list[str], images: list[str], work: Path, vae_steps: int, video_steps: int, size: int) -> Path:
    """A tiny VAE trained on frames of both sets (a general VAE, as SD's is for the real
    model), then Stage II from scratch on the video clips; returns its model folder."""
    spec = ClipSpec(num_frames=2, fps=8.0, height=size, width=size)
    clips = iter(ClipDataset(video, spec, seed=1))
    pictures = iter(ImageDataset(images, size, size, seed=1))

    def frames():
        while True:
            yield torch.cat([next(clips)["video"] for _ in range(2)] + [next(pictures)["video"] for _ in range(4)])

    vae = train_autoencoder(LatentCodec.tiny().vae, frames(), AutoencoderTraining(steps=vae_steps, batch_frames=8))
    log(f"  vae: reconstruction L1 {reconstruction_error(vae, next(frames())):.3f}")
    vae.save_pretrained(work / "vae", safe_serialization=True)
    config = replace(
        named_config("tiny", "video"),
        clip=ClipSpec(num_frames=8, fps=8.0, height=size, width=size),
        vae=str(work / "vae"),
        max_steps=video_steps,
        checkpoint_every=video_steps,
        log_every=max(1, video_steps // 5),
        optim=replace(named_config("tiny", "video").optim, lr=1e-3, warmup_steps=10, ema_decay=0.99),
    )
    result = train(
        config, video, work / "base", on_log=lambda step, m: log(f"  base step {step}: loss {m['loss']:.3f}")
    )
    return result.final


def refine_decoder(base: Path, video: list[str], images: list[str], spec: ClipSpec, folder: Path, steps: int) -> Path:
    """A copy of the base model folder whose VAE decoder is finetuned on frames of the video
    data and the image set, half each (`decoder_only`: the latents stay the same)."""
    shutil.copytree(base, folder)
    clips = iter(ClipDataset(video, replace(spec, num_frames=2), seed=3))
    pictures = iter(ImageDataset(images, spec.height, spec.width, seed=3))

    def frames():
        while True:
            yield torch.cat([next(clips)["video"] for _ in range(4)] + [next(pictures)["video"] for _ in range(8)])

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    training = AutoencoderTraining(steps=steps, lr=1e-3, decoder_only=True)
    vae = train_autoencoder(
        vae, frames(), training, on_log=lambda step, m: log(f"  decoder step {step}: {m['loss']:.3f}")
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder


@torch.no_grad()
def decoder_ceiling(vae_folder: Path, images: list[torch.Tensor], clips: list[torch.Tensor]) -> dict:
    """Foreground saturation of the held-out images and the video clips through the VAE
    (encode, decode): the most the proxy can show through this decoder."""
    codec = LatentCodec(AutoencoderKL.from_pretrained(vae_folder))
    generator = torch.Generator().manual_seed(0)
    return {
        "image_set": float(
            np.mean([foreground_saturation(codec.decode(codec.encode(i[None], generator))[0]) for i in images])
        ),
        "video_data": float(
            np.mean([foreground_saturation(codec.decode(codec.encode(c[None], generator))[0]) for c in clips])
        ),
    }


@torch.no_grad()
def resampled(model: VideoDiffusion, clip: torch.Tensor, sigma_start: float, steps: int) -> torch.Tensor:
    """SDEdit: the clip's latents noised to `sigma_start` and sampled back to 0 by the model
    (empty prompt, the clip's fps): layout and motion stay the clip's, the appearance is
    the model's. A weak base generates no clean object from pure noise; from here it does."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    latents = model.codec.encode(clip[None], generator)
    sigmas = karras_sigmas(steps, 0.002, sigma_start)
    x = latents + sigma_start * torch.randn(latents.shape, generator=generator)
    text = model.text([""])
    ids = added_time_ids(torch.tensor([model.config.clip.fps]), torch.ones(1), torch.zeros(1))
    x = SAMPLERS["heun"](lambda x, sigma: model.denoiser(x, sigma, text=text, added=ids), x, sigmas)
    return model.codec.decode(x)[0]


def measure(model: VideoDiffusion, video: list[str], images: list[torch.Tensor], clips: int, steps: int) -> dict:
    """Motion on the video data (generated from the empty prompt, as `vdm eval`), the
    image-quality proxy of the same samples and of the data clips resampled from sigma 1."""
    report = evaluate_motion(model, video, clips=clips, steps=steps)
    data_clips = [
        item["video"] for item in itertools.islice(ClipDataset(video, model.config.clip, random_crop=False), clips)
    ]
    return {
        "motion": report["generated"] | motion_gate_metrics(report),
        "data_motion": report["data"],
        "image_quality": palette_report(report["samples"], images, data_clips),
        "image_quality_resampled_from_sigma_1": palette_report(
            [resampled(model, clip, 1.0, steps) for clip in data_clips], images, data_clips
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400, help="spatial-hq finetune steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="spatial-hq learning rate (few steps: high)")
    parser.add_argument("--base", default=None, help="a trained video model folder (default: make a small one)")
    parser.add_argument("--video-data", default=None, help="the base's video shards (folder; with --base)")
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--size", type=int, default=16, help="frame size of the base made here")
    parser.add_argument("--eval-clips", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=32, help="size the image set is drawn at")
    parser.add_argument("--refine-decoder", type=int, default=0, help="steps of a decoder-only VAE finetune first")
    # On a machine shared by many processes, torch's two OpenMP threads spin-wait for each
    # other: a VAE step measured 10 s with 2 threads against 1 s with one. Raise it when quiet.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if bool(args.base) != bool(args.video_data):
        parser.error("--base and --video-data go together")
    torch.set_num_threads(args.threads)

    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="spatial-hq-evidence-") as tmp:
        work = Path(tmp)
        # Discs of radius 5-7 px drawn at 32 px, like the video clips made below; at 64 px,
        # like the motion evidence's data, for its base.
        image_shards = [
            str(p)
            for p in write_palette_image_shards(work / "images", shards=4, images_per_shard=16, size=args.image_size)[0]
        ]
        if args.video_data:
            video = sorted(str(p) for p in Path(args.video_data).rglob("*.tar"))
        else:
            shards = write_shapes_shards(work / "video", shards=4, clips_per_shard=8, height=32, width=32, seed=1)
            video = [str(p) for p in shards[0]]
        start = time.perf_counter()
        base_folder = (
            Path(args.base)
            if args.base
            else quick_base(video, image_shards, work, args.vae_steps, args.base_steps, args.size)
        )
        seconds["base"] = time.perf_counter() - start
        spec = VideoDiffusion.load(base_folder).config.clip
        held_out = write_palette_image_shards(
            work / "held-out", shards=1, images_per_shard=args.eval_clips, size=args.image_size, seed=9
        )[0]
        images = [i["video"] for i in ImageDataset([str(p) for p in held_out], spec.height, spec.width, epochs=1)]
        data_clips = [
            c["video"] for c in itertools.islice(ClipDataset(video, spec, random_crop=False), args.eval_clips)
        ]
        decoder = {"before": decoder_ceiling(base_folder / "vae", images, data_clips)}
        if args.refine_decoder:
            start = time.perf_counter()
            base_folder = refine_decoder(base_folder, video, image_shards, spec, work / "refined", args.refine_decoder)
            seconds["refine_decoder"] = time.perf_counter() - start
            decoder["after"] = decoder_ceiling(base_folder / "vae", images, data_clips)

        base = VideoDiffusion.load(base_folder)
        config = replace(
            named_config("tiny", "spatial-hq"),
            unet=base.config.unet,
            clip=spec,
            max_steps=args.steps,
            checkpoint_every=args.steps,
            log_every=max(1, args.steps // 5),
            optim=replace(named_config("tiny", "spatial-hq").optim, lr=args.lr),
        )
        start = time.perf_counter()
        finetuned = train(
            config,
            image_shards,
            work / "spatial-hq",
            init_from=base_folder,
            on_log=lambda step, m: log(f"  spatial-hq step {step}: loss {m['loss']:.3f}"),
        ).model
        seconds["finetune"] = time.perf_counter() - start

        trained = dict(finetuned.unet.named_parameters())
        temporal_identical = all(
            torch.equal(trained[name], param) for name, param in base.unet.named_parameters() if is_temporal(name)
        )
        start = time.perf_counter()
        report = {
            "finetune_steps": args.steps,
            "base": str(args.base or f"made here: VAE {args.vae_steps} steps, Stage II {args.base_steps} steps"),
            "temporal_weights_bit_identical": temporal_identical,
            "saturation_through_vae": decoder,
            "base_model": measure(base, video, images, args.eval_clips, args.eval_steps),
            "spatial_hq": measure(finetuned, video, images, args.eval_clips, args.eval_steps),
        }
        seconds["evaluation"] = time.perf_counter() - start
    report["wall_s"] = {k: round(v, 1) for k, v in seconds.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
