"""Evidence for the x4 video upsampler (Video LDM): on synthetic clips whose high-resolution
truth is known, the per-frame image upsampler against the video-aware one made from it
(its temporal layers trained, everything else frozen), on PSNR to the truth and flicker.

Data: textured discs moving over a textured background, rendered at 64x64 (8 frames at
8 fps), written as mp4 shards; the held-out clips are downscaled x4 to 16x16 and
upsampled back. Steps, in-process (model level, no stack):

1. a tiny VAE (factor 4) trained on the frames (random VAEs reconstruct nothing);
2. the image upsampler: the `upsampler` kind on the training clips' frames as images
   (`data: images`, `strategy: full`: temporal branches off, temporal layers untouched);
3. the video upsampler from it: `strategy: partial` on the clips (temporal layers and the
   noise-strength embedding train; the spatial layers are the image upsampler's);
4. both evaluated by the kind's own evaluation on the same held-out clips and seeds
   (`upscale_psnr`, `upscale_flicker`), with bicubic interpolation and the VAE's own
   reconstruction (the ceiling of any latent upsampler) beside them.

Flicker: mean |(x̂[t+1] - x̂[t]) - (x[t+1] - x[t])| in 8-bit levels (model/upsampler.py).
About 15 CPU-minutes with the defaults on one thread:

    OMP_NUM_THREADS=1 python benchmarks/upsampler_evidence/run.py [--out report.json]

Figures: docs/evidence/upsampler.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

SIZE, FRAMES, FPS = 64, 8, 8.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def textured_clip(rng: np.random.Generator) -> np.ndarray:
    """(T, 64, 64, 3) uint8: a dim static texture, and 2 discs filled with their own fine
    texture moving with them (1-2 px per frame), so detail lost at 16x16 must be re-made
    the same way in every frame."""
    from components.sample_data.render import texture

    background = (texture(rng, SIZE, SIZE, tuple(rng.uniform(0.3, 0.6, 3))) * 0.6).astype(np.uint8)
    frames = np.repeat(background[None], FRAMES, axis=0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for _ in range(2):
        radius = rng.uniform(8, 13)
        fill = texture(rng, 32, 32, tuple(rng.uniform(0.5, 1.0, 3)))
        velocity = rng.choice([-2, -1, 1, 2], size=2)
        start = rng.uniform(radius, SIZE - radius, size=2)
        for t in range(FRAMES):
            cx, cy = np.clip(start + velocity * t, radius, SIZE - radius)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            # The texture moves with the disc: sampled relative to its (integer) centre.
            u = (xx - int(round(cx)) + 16) % 32
            v = (yy - int(round(cy)) + 16) % 32
            frames[t][inside] = fill[v[inside], u[inside]]
    return frames


def write_shards(folder: Path, clips: int, seed: int, split: str | None, images: bool) -> list[str]:
    """Clip shards (mp4 + record), or (`images`) the same frames as PNG image shards."""
    from PIL import Image

    from components.common.media import write_video
    from components.sample_data.shards import clip_metadata
    from model.records import STATIC

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = folder / "shard-000000.tar"
    with wds.TarWriter(str(path), mtime=0) as tar, tempfile.TemporaryDirectory() as tmp:
        for c in range(clips):
            frames = textured_clip(rng)
            key = f"discs-{seed}-{c:04d}"
            if images:
                for t, frame in enumerate(frames):
                    png = io.BytesIO()
                    Image.fromarray(frame).save(png, format="PNG")
                    tar.write({"__key__": f"{key}-{t}", "png": png.getvalue(), "json": {"caption": ""}})
                continue
            video = Path(tmp) / f"{key}.mp4"
            write_video(video, frames, FPS)
            meta = clip_metadata(key, FRAMES, FPS, 1.5, STATIC, "")
            if split is not None:
                meta = replace(meta, split=split)
            tar.write({"__key__": key, "mp4": video.read_bytes(), "json": meta.to_json()})
    return [str(path)]


def train_vae(shards: list[str], steps: int, folder: Path) -> Path:
    from model.autoencoder import AutoencoderTraining, train_autoencoder
    from model.conditioning import LatentCodec
    from model.data import ClipDataset, ClipSpec

    config = AutoencoderTraining(steps=steps, batch_frames=16)
    clips = iter(ClipDataset(shards, ClipSpec(num_frames=FRAMES, fps=FPS, height=SIZE, width=SIZE), seed=1))

    def frames():
        while True:
            yield torch.cat([next(clips)["video"] for _ in range(config.batch_frames // FRAMES)])

    vae = train_autoencoder(LatentCodec.tiny().vae, frames(), config)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def vae_ceiling(vae: Path, shards: list[str], clips: int) -> dict:
    """PSNR and flicker of the held-out clips through the VAE alone (encode, decode)."""
    import itertools

    from model.conditioning import LatentCodec
    from model.data import ClipDataset, ClipSpec
    from model.upsampler import figures

    codec = LatentCodec.from_folder(vae)
    spec = ClipSpec(num_frames=FRAMES, fps=FPS, height=SIZE, width=SIZE)
    truths = [
        i["video"] for i in itertools.islice(iter(ClipDataset(shards, spec, random_crop=False, heldout=True)), clips)
    ]
    through = [codec.decode(codec.encode(t[None], torch.Generator().manual_seed(0)))[0] for t in truths]
    result = figures(through, truths)
    return {"psnr": result.psnr, "flicker": result.flicker}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--clips", type=int, default=48, help="training clips")
    parser.add_argument("--eval-clips", type=int, default=8)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--image-steps", type=int, default=600)
    parser.add_argument("--video-steps", type=int, default=600)
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="write the report (JSON) here too")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from model.records import HELDOUT
    from model.stages import named_config
    from model.train import train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vdm-upsampler-evidence-") as tmp:
        work = args.workdir or Path(tmp)
        clips = write_shards(work / "clips", args.clips, seed=1, split=None, images=False)
        images = write_shards(work / "images", args.clips, seed=1, split=None, images=True)
        heldout = write_shards(work / "heldout", args.eval_clips, seed=2, split=HELDOUT, images=False)
        seconds = {}

        clock = time.perf_counter()
        vae = train_vae(clips, args.vae_steps, work / "vae")
        seconds["vae"] = time.perf_counter() - clock
        log(f"vae: {seconds['vae']:.0f} s")

        base = named_config("tiny", "upsampler")
        common = {
            "vae": str(vae),
            "validation_clips": 0,
            "sample_prompts": (),
            "optim": replace(base.optim, lr=args.lr),
        }
        clock = time.perf_counter()
        image_config = base.with_fields(
            data="images", strategy="full", batch_size=8, max_steps=args.image_steps,
            checkpoint_every=args.image_steps, log_every=100, **common,
        )  # fmt: skip
        image_run = train(
            image_config, images, work / "image",
            on_log=lambda step, m: log(f"  image step {step}: loss {m['loss']:.3f}") if step % 100 == 0 else None,
        )  # fmt: skip
        seconds["image_upsampler"] = time.perf_counter() - clock
        log(f"image upsampler: {seconds['image_upsampler']:.0f} s")

        clock = time.perf_counter()
        video_config = base.with_fields(
            strategy="partial", max_steps=args.video_steps, checkpoint_every=args.video_steps, log_every=100, **common
        )
        video_run = train(
            video_config, clips, work / "video", init_from=image_run.final,
            on_log=lambda step, m: log(f"  video step {step}: loss {m['loss']:.3f}") if step % 100 == 0 else None,
        )  # fmt: skip
        seconds["video_upsampler"] = time.perf_counter() - clock
        log(f"video upsampler: {seconds['video_upsampler']:.0f} s")

        from model.stages import VideoDiffusion

        report: dict = {"settings": vars(args) | {"out": str(args.out) if args.out else None, "workdir": None}}
        for name, folder in (("image_upsampler", image_run.final), ("video_upsampler", video_run.final)):
            clock = time.perf_counter()
            model = VideoDiffusion.load(folder)
            evaluation = model.task.evaluate(model, heldout, clips=args.eval_clips, steps=args.sample_steps)
            report[name] = evaluation.metrics
            seconds[f"evaluate_{name}"] = time.perf_counter() - clock
            log(f"{name}: {evaluation.metrics}")
        report["vae_reconstruction"] = vae_ceiling(vae, heldout, args.eval_clips)
        report["seconds"] = seconds | {"total": time.perf_counter() - started}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
