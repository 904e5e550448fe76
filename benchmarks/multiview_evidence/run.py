"""Evidence that the multi-view finetune (issue: finetunes, item 7) does what it is for:
given one view of an object and its camera elevation, generate the views of a turn
around it. Known truth: the same procedural objects rendered at the same azimuths and
elevation (components/sample_data/orbits.py).

In one process, CPU-sized (no stack: the CLI path is the test's, tests/model/test_multiview.py):
a tiny VAE trained on the frames -> a Stage II-shaped video model -> the image-to-video
base finetuned on moving discs (`tiny-i2v`) -> that base finetuned as `multiview` on
orbits. Then, on held-out objects, each orbit's first view sampled into a turn by

- the i2v base (`animate`: what it does with a view without the finetune),
- the multi-view model told the true elevation (`orbit`),
- the multi-view model told an elevation 40 degrees off,

and compared view by view with the true renders: PSNR and L1 over the novel views
(1..T-1; view 0 is the conditioning image), per view, beside two references: the
conditioning view repeated (what a model that does not turn scores) and the VAE's
reconstruction of the true views (the ceiling of the latent space).

    python benchmarks/multiview_evidence/run.py [--i2v-steps 150] [--steps 300] [--eval-orbits 8]

The defaults are sized for a quiet machine; on a loaded 2-core one, `--vae-steps 30
--vae-batch 16 --i2v-steps 10 --steps 60 --batch-size 2 --eval-orbits 2 --eval-steps 4`
took 775 s (README, Finetunes, for its figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from components.sample_data.orbits import boxes_from_truth, render_orbit, write_orbit_shards
from components.sample_data.shards import write_shapes_shards
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec
from model.data import ClipDataset, ClipSpec
from model.multiview import OrbitDataset, orbit, orbit_l1, orbit_psnr, summarize_views
from model.pipeline import GenerationConfig, animate
from model.stages import VideoDiffusion, named_config
from model.train import train


def log(message: str, start: float) -> None:
    print(f"  [{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)


def frames_of(shards: list[str], spec: ClipSpec, frames: int, dataset=ClipDataset):
    """Endless batches of `frames` frames (N, 3, H, W) from clips of `shards`."""
    stream = iter(dataset(shards, spec))
    while True:
        yield torch.cat([next(stream)["video"] for _ in range(max(1, frames // spec.num_frames))])


def compare(generated: list[torch.Tensor], truth: list[torch.Tensor]) -> dict:
    return {
        "psnr_db": summarize_views([orbit_psnr(g, t) for g, t in zip(generated, truth, strict=True)]),
        "l1": summarize_views([orbit_l1(g, t) for g, t in zip(generated, truth, strict=True)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae-steps", type=int, default=150)
    parser.add_argument("--vae-batch", type=int, default=32, help="frames per VAE step (half orbits, half discs)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per i2v and multi-view step")
    parser.add_argument("--i2v-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=300, help="multi-view finetune steps")
    parser.add_argument("--eval-orbits", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=12, help="sampler steps")
    parser.add_argument("--wrong-by", type=float, default=40.0, help="degrees off the true elevation")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    multiview_config = named_config("tiny", "multiview")
    spec = multiview_config.clip

    with tempfile.TemporaryDirectory(prefix="vdm-multiview-evidence-") as tmp:
        work = Path(tmp)
        orbits = [str(p) for p in write_orbit_shards(work / "orbits", shards=2, orbits_per_shard=16, seed=0)[0]]
        # Other objects at other cameras; their truth records re-render them exactly.
        _, truth = write_orbit_shards(work / "held-out", shards=1, orbits_per_shard=args.eval_orbits, seed=1)
        discs = write_shapes_shards(work / "discs", shards=2, clips_per_shard=8, height=32, width=32)[0]
        discs = [str(p) for p in discs]
        log("data written", start)

        def mixed():  # the VAE sees both kinds of frames the models will
            half = args.vae_batch // 2
            orbit_frames = frames_of(orbits, spec, half, OrbitDataset)
            disc_frames = frames_of(discs, ClipSpec(4, 8.0, 32, 32), half)
            while True:
                yield torch.cat([next(orbit_frames)[:half], next(disc_frames)[:half]])

        autoencoder = AutoencoderTraining(steps=args.vae_steps, batch_frames=args.vae_batch)
        vae = train_autoencoder(LatentCodec.tiny().vae, mixed(), autoencoder)
        vae.save_pretrained(work / "vae")
        log(f"VAE trained: reconstruction L1 {reconstruction_error(vae, next(mixed())):.3f}", start)

        video = VideoDiffusion.create(replace(named_config("tiny", "video"), vae=str(work / "vae")))
        video_folder = video.save(work / "video")
        i2v_config = replace(
            named_config("tiny", "i2v"), max_steps=args.i2v_steps, checkpoint_every=10**9, batch_size=args.batch_size
        )
        base = train(i2v_config, discs, work / "i2v", init_from=video_folder)
        log(f"i2v base: {args.i2v_steps} steps, loss {np.mean(base.losses[-20:]):.3f}", start)
        config = replace(multiview_config, max_steps=args.steps, checkpoint_every=10**9, batch_size=args.batch_size)
        finetuned = train(config, orbits, work / "multiview", init_from=base.final)
        log(f"multi-view: {args.steps} steps, loss {np.mean(finetuned.losses[-20:]):.3f}", start)

        # The held-out turns rendered afresh (exact pixels, no H.264) at their own cameras.
        renders = [
            render_orbit(boxes_from_truth(r), r["elevation"], np.array(r["azimuths"]), spec.height)
            for r in truth.values()
        ]
        true_views = [torch.from_numpy(r.frames).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in renders]
        elevations = [r.elevation for r in renders]
        generation = GenerationConfig.for_clip(spec, steps=args.eval_steps)
        i2v, multiview = VideoDiffusion.load(base.final), VideoDiffusion.load(finetuned.final)
        generated = {
            "i2v_base": [animate(i2v, v[0], replace(generation, seed=i)) for i, v in enumerate(true_views)],
            "multiview_true_elevation": [
                orbit(multiview, v[0], e, replace(generation, seed=i))
                for i, (v, e) in enumerate(zip(true_views, elevations, strict=True))
            ],
            "multiview_wrong_elevation": [
                orbit(multiview, v[0], e + (-args.wrong_by if e > 20 else args.wrong_by), replace(generation, seed=i))
                for i, (v, e) in enumerate(zip(true_views, elevations, strict=True))
            ],
        }
        log("sampled", start)
        codec = multiview.codec
        reconstructed = [codec.decode(codec.encode(v[None]))[0] for v in true_views]
        report = {
            "setup": {
                "vae_steps": args.vae_steps,
                "i2v_steps": args.i2v_steps,
                "multiview_steps": args.steps,
                "batch_size": args.batch_size,
                "views": spec.num_frames,
                "size": spec.height,
                "held_out_orbits": len(renders),
                "elevations": sorted(set(elevations)),
                "sampler_steps": args.eval_steps,
                "wrong_elevation_off_by_deg": args.wrong_by,
            },
            **{name: compare(videos, true_views) for name, videos in generated.items()},
            "reference_first_view_repeated": compare([v[:1].expand_as(v) for v in true_views], true_views),
            "reference_vae_reconstruction": compare(reconstructed, true_views),
            "wall_s": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
