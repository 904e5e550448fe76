"""Evidence that the camera-motion LoRA (issue: finetunes, item 2) does what it is for,
on synthetic clips whose camera motion is known (`write_camera_shards`: a textured world
panned horizontally, zoomed or held still, labelled as curation labels clips):

a tiny VAE trained on the clips' frames -> a base video model trained `full` on every
clip (all camera motions mixed) -> one adapter per motion class (`pan`, `zoom`,
`static`), each trained on its class's clips only and added to the previous result (the
chain `vdm finetune camera-lora` and the `finetune-camera-lora` pipeline run) -> the
same seeds sampled in full (Heun, guidance) with the base and with each adapter, the
global camera motion of each video measured (model/camera_motion.py) and read as a class.

Prints JSON: per model, the fraction of its videos that read as each class and the mean
|horizontal motion| and |zoom| (px per frame); the same figures for the data's clips
through the VAE (what the estimator reads when the motion is there); whether the base
weights are bit-identical after the three adapters trained. Runs in-process on the
model API (no stack). The one run so far (cut-down arguments, a 2-core machine under
load 16-21) took 35 minutes; the defaults are not yet timed.

    python benchmarks/camera_lora_evidence/run.py [--base-steps 150] [--adapter-steps 60] [--samples 6]
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

from components.sample_data.shards import write_camera_shards
from model.autoencoder import AutoencoderTraining, train_autoencoder
from model.camera_lora import MOTION_CLASSES, base_unet
from model.camera_motion import class_report
from model.conditioning import LatentCodec
from model.data import ClipDataset
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips-per-label", type=int, default=6)
    parser.add_argument("--vae-steps", type=int, default=150)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--adapter-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--sample-steps", type=int, default=12)
    args = parser.parse_args()
    wall = {}

    def timed(name, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        wall[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {wall[name]:.0f} s", file=sys.stderr)
        return out

    with tempfile.TemporaryDirectory(prefix="camera-lora-evidence-") as tmp:
        work = Path(tmp)
        paths, _ = write_camera_shards(work / "shards", clips_per_label=args.clips_per_label, shards=2)
        shards = [str(p) for p in paths]
        video = named_config("tiny", "video")
        clips = ClipDataset(shards, video.clip, random_crop=False)

        def frames():
            stream = iter(clips)
            while True:
                yield torch.cat([next(stream)["video"] for _ in range(4)])

        vae = timed(
            "vae", train_autoencoder, LatentCodec.tiny().vae, frames(), AutoencoderTraining(steps=args.vae_steps)
        )
        vae.save_pretrained(work / "vae")
        codec = LatentCodec(vae)

        base_config = replace(
            video, vae=str(work / "vae"), max_steps=args.base_steps, checkpoint_every=args.base_steps,
            batch_size=args.batch_size, cond_dropout=0.0,
            optim=replace(video.optim, lr=1e-3, warmup_steps=10, ema_decay=0.98),
        )  # fmt: skip
        folder = timed("base", train, base_config, shards, work / "base").final
        base_weights = {k: v.clone() for k, v in VideoDiffusion.load(folder).unet.state_dict().items()}
        lora = named_config("tiny", "camera-lora")
        for motion_class in MOTION_CLASSES:
            config = replace(
                lora, motion_class=motion_class, max_steps=args.adapter_steps, checkpoint_every=args.adapter_steps,
                batch_size=args.batch_size, cond_dropout=0.0,
                optim=replace(lora.optim, lr=5e-3, warmup_steps=5, ema_decay=0.9),
            )  # fmt: skip
            folder = timed(motion_class, train, config, shards, work / motion_class, init_from=folder).final
        model = VideoDiffusion.load(folder)
        unchanged = base_unet(model.unet).state_dict()

        generation = GenerationConfig.for_clip(video.clip, steps=args.sample_steps, guidance_min=1.0, guidance_max=1.0)
        report = {
            "steps": {"vae": args.vae_steps, "base": args.base_steps, "adapter": args.adapter_steps},
            "batch_size": args.batch_size,
            "samples_per_model": args.samples,
            "sample_steps": args.sample_steps,
            "base_weights_unchanged": all(torch.equal(v, unchanged[k]) for k, v in base_weights.items()),
        }
        for labels_class, labels in MOTION_CLASSES.items():
            data = [c["video"] for c in itertools.islice(ClipDataset(shards, video.clip, camera_motion=labels), 4)]
            with torch.no_grad():
                through_vae = [codec.decode(codec.encode(v[None]))[0] for v in data]
            report.setdefault("data_through_vae", {})[labels_class] = class_report(through_vae, labels_class)

        def sample(adapter: str | None) -> list[torch.Tensor]:
            return [generate(model, "", replace(generation, seed=s, adapter=adapter)) for s in range(args.samples)]

        base_videos = timed("sample base", sample, None)
        report["base"] = {c: class_report(base_videos, c)["match_rate"] for c in MOTION_CLASSES}
        report["base"] |= {k: v for k, v in class_report(base_videos, "pan").items() if k != "match_rate"}
        for motion_class in MOTION_CLASSES:
            report[f"adapter_{motion_class}"] = class_report(
                timed(f"sample {motion_class}", sample, motion_class), motion_class
            )
        report["wall_s"] = wall
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
