"""Evidence that the temporal-decoder finetune does what it is for: decoded frames
flicker less than with the image decoder, reconstruction not worse.

In one process, on synthetic clips with known ground truth (32x32, 8 frames): static
discs (`moving_shapes` with max_speed 0), slowly moving discs (max speed 0.5 px/frame)
and a slowly panning texture (1 px/frame). A tiny image VAE is trained on their frames
(`train_autoencoder`, as `vdm train-vae`), converted to a temporal decoder
(`temporal_vae`; its starting gap to the image decoder is reported), and the decoder is
finetuned with the tiny config (reconstruction + 3D patch discriminator). Held-out
clips (other seeds) are encoded (posterior mean) and decoded whole by each decoder, with
per-frame latent noise 0 (pure reconstruction) and 0.1 (scaled-latent units: a stand-in
for the frame-to-frame disagreement of a sampler's latents). Prints JSON: per clip kind
and noise, flicker (mean |decoded frame change - true frame change|), L1 and PSNR of
the image decoder, the converted decoder before finetuning, and after.

    python benchmarks/temporal_decoder_evidence/run.py [--vae-steps 300] [--steps 600]

The defaults are the run in docs/evidence/temporal-decoder.md: 8 minutes with
OMP_NUM_THREADS=1 on a shared 2-core machine (the VAE 3.5 of them; the GAN joins at
step 50). `--device` defaults to cuda when there is one; `--trainable` and
`--adversarial-weight` override the tiny config's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from components.sample_data.render import moving_shapes, pan, texture
from model.autoencoder import AutoencoderTraining, train_autoencoder
from model.conditioning import LatentCodec
from model.temporal_decoder import (
    TemporalDecoderTrainer,
    conversion_error,
    decoding_metrics,
    named_config,
    temporal_vae,
    train_temporal_decoder,
)
from model.training import seed_everything

KINDS = ("static", "slow", "pan")
NOISE = (0.0, 0.1)


def clip(kind: str, seed: int, frames: int, size: int) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    if kind == "pan":
        world = texture(rng, 2 * size, 2 * size, tuple(rng.uniform(0.4, 1.0, 3)))
        video = pan(world, size, size, frames, (int(rng.choice([-1, 1])), 0))
    else:
        speed = 0.0 if kind == "static" else 0.5
        video = moving_shapes(frames, size, size, num_shapes=2, max_speed=speed, radius_range=(4, 7), seed=seed).frames
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / 127.5 - 1


def clips(seed: int, per_kind: int, frames: int, size: int) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([clip(k, seed + 7919 * i + j, frames, size) for i in range(per_kind)])
        for j, k in enumerate(KINDS)
    }


def report(vae, held_out: dict[str, torch.Tensor], device) -> dict:
    return {
        kind: {f"noise_{n:g}": decoding_metrics(vae, video.to(device), latent_noise=n) for n in NOISE}
        for kind, video in held_out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-clips", type=int, default=8, help="per kind")
    parser.add_argument("--eval-clips", type=int, default=2, help="per kind")
    parser.add_argument("--trainable", choices=("decoder", "temporal"), default=None, help="default: the tiny config's")
    parser.add_argument("--adversarial-weight", type=float, default=None, help="default: the tiny config's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    seed_everything(0)
    device = torch.device(args.device)
    config = replace(named_config("tiny"), max_steps=args.steps, checkpoint_every=args.steps)
    if args.trainable is not None:
        config = replace(config, trainable=args.trainable)
    if args.adversarial_weight is not None:
        config = replace(config, adversarial_weight=args.adversarial_weight)
    spec = config.clip
    train = torch.cat(list(clips(0, args.train_clips, spec.num_frames, spec.height).values()))
    held_out = clips(10_000, args.eval_clips, spec.num_frames, spec.height)
    generator = torch.Generator().manual_seed(0)

    def frames():
        while True:
            yield train[torch.randint(0, len(train), (4,), generator=generator)].flatten(0, 1).to(device)

    def batches():
        while True:
            yield train[torch.randint(0, len(train), (config.batch_size,), generator=generator)].to(device)

    vae = train_autoencoder(LatentCodec.tiny().vae.to(device), frames(), AutoencoderTraining(args.vae_steps, 32))
    vae_s = time.perf_counter() - start
    temporal, dropped = temporal_vae(vae)
    temporal.to(device)
    result = {
        "vae_steps": args.vae_steps,
        "steps": args.steps,
        "trainable": config.trainable,
        "adversarial_weight": config.adversarial_weight,
        "device": str(device),
        "conversion": {
            "dropped_weights": dropped,
            "difference": conversion_error(vae, temporal, torch.cat(list(held_out.values())).to(device)),
        },
        "image_decoder": report(vae, held_out, device),
        "temporal_decoder_before": report(temporal, held_out, device),
    }
    losses = []
    train_temporal_decoder(
        TemporalDecoderTrainer(temporal, config), batches(), on_log=lambda step, m: losses.append({"step": step, **m})
    )
    result["temporal_decoder"] = report(temporal, held_out, device)
    result["summary"] = {
        f"{kind}_noise_{n:g}": {
            metric: {
                "image": result["image_decoder"][kind][f"noise_{n:g}"][metric],
                "temporal": result["temporal_decoder"][kind][f"noise_{n:g}"][metric],
            }
            for metric in ("flicker", "l1")
        }
        for kind in KINDS
        for n in NOISE
    }
    result["last_losses"] = losses[-2:]
    result["wall_s"] = {"vae": round(vae_s, 1), "total": round(time.perf_counter() - start, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
