"""Evidence that the multi-view finetune does what it is for:
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

and compared view by view with the true renders over the novel views (1..T-1; view 0
is the conditioning image), beside two references: the conditioning view repeated
(what a model that does not turn scores) and the VAE's reconstruction of the true views
(the ceiling of the latent space). Figures, each per condition:

- `psnr_db`, `l1`: over the whole image. The background is black and the object small,
  so a model that does not turn scores well here: read these beside the object ones.
- `object_psnr_db`: PSNR over the object only, the union of the true and the generated
  view's foreground (a pixel whose brightest channel is above `FOREGROUND`, 0.15 of
  white; the darkest lit face is 0.35), so empty background neither helps nor hurts.
- `silhouette_iou`: intersection over union of those two foregrounds.
- `view_retrieval`: the fraction of novel views whose nearest true view of the orbit
  (L1; on the black background that is the L1 over the objects' pixels) is the one at
  its own azimuth; chance is 1/T. The first view repeated scores 0 (it is the true
  view 0 exactly), so a model that does not turn cannot win this one.
- `turn_margin`: per novel view, its L1 to the true view 0 minus its L1 to the true view
  at its azimuth: above 0 the generated view is nearer the view it should be than the
  one it was given; the first view repeated scores minus the mean view change.

Elevation (`elevation`): the true- and wrong-elevation samples share seed and first view,
so they differ only by the elevation told. Per orbit: which of the two is nearer the
true renders (novel-view L1, whole image and object-only; `true_wins`: the fraction
where true elevation is nearer), whether the wrong-elevation sample is nearer the
object rendered at the wrong elevation than at the true one (`follows_wrong`), and the
mean absolute difference between the two samples (`sample_change_l1`; 0: elevation is
ignored). The first view's own elevation shows in the image (boxes seen from 50 degrees
show their tops, from -10 their undersides), so a model can get the elevation from the
view and ignore the slot; these figures measure whether it uses the slot at all.

    python benchmarks/multiview_evidence/run.py [--vae-steps 400] [--i2v-steps 300] [--steps 6000] [--eval-orbits 8]

The defaults are the run in docs/evidence/multiview.md: 3208 s with OMP_NUM_THREADS=1
on a shared 2-core machine (load about 4: VAE 0.6 s a step, i2v and multi-view 0.45-0.5
s); at 2000 multi-view steps (1478 s) the views do not yet turn (view retrieval at
chance).
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
from model.multiview import OrbitDataset, orbit, orbit_l1, orbit_psnr, summarize_views, view_retrieval
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


FOREGROUND = 0.15  # of white: the background is black, the darkest lit face 0.35


def foreground(views: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool: pixels of views (T, 3, H, W) in [-1, 1] whose brightest channel is above FOREGROUND."""
    return (views.float().amax(dim=1) + 1) / 2 > FOREGROUND


def object_psnr(generated: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """PSNR (dB) per view over the union of the generated and the true foreground."""
    union = (foreground(generated) | foreground(truth))[:, None].float()
    squared = (generated.float() - truth.float()).pow(2) * union
    mse = squared.flatten(1).sum(1) / (3 * union.flatten(1).sum(1)).clamp(min=1)
    return (10 * torch.log10(4 / mse.clamp(min=1e-12))).tolist()


def silhouette_iou(generated: torch.Tensor, truth: torch.Tensor) -> list[float]:
    a, b = foreground(generated), foreground(truth)
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp(min=1), torch.ones_like(union)).tolist()


def compare(generated: list[torch.Tensor], truth: list[torch.Tensor]) -> dict:
    pairs = list(zip(generated, truth, strict=True))
    retrieval = view_retrieval(generated, truth)
    return {
        "psnr_db": summarize_views([orbit_psnr(g, t) for g, t in pairs]),
        "l1": summarize_views([orbit_l1(g, t) for g, t in pairs]),
        "object_psnr_db": summarize_views([object_psnr(g, t) for g, t in pairs]),
        "silhouette_iou": summarize_views([silhouette_iou(g, t) for g, t in pairs]),
        "view_retrieval": retrieval["view_retrieval"],
        "turn_margin": retrieval["turn_margin"],
    }


def novel_l1(generated: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean(orbit_l1(generated[1:], truth[1:])))


def novel_object_mse(generated: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([4 / 10 ** (p / 10) for p in object_psnr(generated[1:], truth[1:])]))


@torch.no_grad()
def elevation_embedding(model: VideoDiffusion, elevations: list[float], wrong: list[float], strength: float) -> dict:
    """How far the micro-conditioning embedding (`add_embedding`, whose last linear starts
    at zero) moves between the true and the wrong elevation, relative to its size; the
    UNet adds it to the noise-level embedding, whose size (at c_noise 0) is beside it."""
    unet = model.unet

    def embedded(values: list[float]) -> torch.Tensor:
        ids = model.task.time_ids(
            torch.full((len(values),), model.config.clip.fps),
            torch.full((len(values),), strength),
            {"elevation": torch.tensor(values)},
        )
        return unet.add_embedding(unet.add_time_proj(ids.flatten()).reshape(len(values), -1))

    true, other = embedded(elevations), embedded(wrong)
    return {
        "relative_shift": float(((true - other).norm(dim=1) / true.norm(dim=1).clamp(min=1e-12)).mean()),
        "embedding_norm": float(true.norm(dim=1).mean()),
        "timestep_embedding_norm": float(unet.time_embedding(unet.time_proj(torch.zeros(1))).norm()),
        "linear_2_weight_norm": float(unet.add_embedding.linear_2.weight.norm()),
    }


def elevation_test(
    true: list[torch.Tensor], wrong: list[torch.Tensor], truth: list[torch.Tensor], at_wrong: list[torch.Tensor]
) -> dict:
    """Same seed and first view, only the elevation told differs (see the docstring)."""
    rows = list(zip(true, wrong, truth, at_wrong, strict=True))
    l1 = [(novel_l1(t, v), novel_l1(w, v)) for t, w, v, _ in rows]
    obj = [(novel_object_mse(t, v), novel_object_mse(w, v)) for t, w, v, _ in rows]
    follows = [novel_l1(w, a) < novel_l1(w, v) for _, w, v, a in rows]
    return {
        "true_wins_l1": float(np.mean([a < b for a, b in l1])),
        "true_wins_object_mse": float(np.mean([a < b for a, b in obj])),
        "novel_l1_true_vs_wrong": [[round(a, 4), round(b, 4)] for a, b in l1],
        "follows_wrong": float(np.mean(follows)),
        "sample_change_l1": float(np.mean([novel_l1(t, w) for t, w, _, _ in rows])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=32, help="frames per VAE step (half orbits, half discs)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per i2v and multi-view step")
    parser.add_argument("--i2v-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=6000, help="multi-view finetune steps")
    parser.add_argument("--train-orbits", type=int, default=256, help="training orbits (two shards)")
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
        orbits = write_orbit_shards(work / "orbits", shards=2, orbits_per_shard=args.train_orbits // 2, seed=0)[0]
        orbits = [str(p) for p in orbits]
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
        def rendered(record: dict, elevation: float) -> torch.Tensor:
            frames = render_orbit(boxes_from_truth(record), elevation, np.array(record["azimuths"]), spec.height).frames
            return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1

        records = list(truth.values())
        elevations = [r["elevation"] for r in records]
        wrong = [e + (-args.wrong_by if e > 20 else args.wrong_by) for e in elevations]
        true_views = [rendered(r, e) for r, e in zip(records, elevations, strict=True)]
        at_wrong = [rendered(r, e) for r, e in zip(records, wrong, strict=True)]  # the same object, the wrong camera
        generation = GenerationConfig.for_clip(spec, steps=args.eval_steps)
        i2v, multiview = VideoDiffusion.load(base.final), VideoDiffusion.load(finetuned.final)
        generated = {
            "i2v_base": [animate(i2v, v[0], replace(generation, seed=i)) for i, v in enumerate(true_views)],
            "multiview_true_elevation": [
                orbit(multiview, v[0], e, replace(generation, seed=i))
                for i, (v, e) in enumerate(zip(true_views, elevations, strict=True))
            ],
            "multiview_wrong_elevation": [
                orbit(multiview, v[0], e, replace(generation, seed=i))
                for i, (v, e) in enumerate(zip(true_views, wrong, strict=True))
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
                "train_orbits": args.train_orbits,
                "held_out_orbits": len(records),
                "elevations": sorted(set(elevations)),
                "sampler_steps": args.eval_steps,
                "wrong_elevation_off_by_deg": args.wrong_by,
            },
            **{name: compare(videos, true_views) for name, videos in generated.items()},
            "reference_first_view_repeated": compare([v[:1].expand_as(v) for v in true_views], true_views),
            "reference_vae_reconstruction": compare(reconstructed, true_views),
            "elevation": elevation_test(
                generated["multiview_true_elevation"], generated["multiview_wrong_elevation"], true_views, at_wrong
            )
            | {"embedding": elevation_embedding(multiview, elevations, wrong, generation.noise_aug_strength)},
            "wall_s": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
