"""Latent caching: encode each training clip once with the frozen VAE and train on the
cached latents (the VAE encoder is a large share of a step at SVD's resolutions).

A cached sample stores the VAE's posterior (mean and std, float16) rather than one
draw from it, so training still samples a fresh latent every time it sees the clip.
What caching fixes is the clip's window and crop, and with several training frame rates
(`clip.fps_choices`) its rate: one per clip, chosen when the cache is written (the clips
still span the rates, each at its own). Each sample records the VAE's fingerprint; training refuses latents made
by another VAE.

Shards: `<key>.mean.npy`, `<key>.std.npy`, `<key>.json` (the clip's metadata plus
`vae`, `num_frames`, the `fps` and `motion` of the frames cached and the stage's
`fps_choices`), readable by `LatentDataset` with the clip loader's ordering, sharding and
resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from model.conditioning import LatentCodec
from model.data import ClipDataset


def vae_fingerprint(codec: LatentCodec) -> str:
    """sha256 (first 16 hex digits) of the VAE's config and weights."""
    # Underscored entries are diffusers' bookkeeping (one is a set: its order varies by process).
    config = {k: v for k, v in codec.vae.config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(codec.vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.to(torch.float16).cpu().numpy())
    return buffer.getvalue()


@torch.no_grad()
def write_latent_shards(
    clips: ClipDataset, codec: LatentCodec, folder: Path, *, per_shard: int = 256, batch: int = 8
) -> Iterator[Path]:
    """Encode every clip `clips` yields (give it `epochs=1`) into latent shards under
    `folder`; yields each shard's path once it is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = vae_fingerprint(codec)
    device = next(codec.vae.parameters()).device
    stream, written, shard = iter(clips), 0, 0
    tar: wds.TarWriter | None = None
    while items := [item for _, item in zip(range(batch), stream, strict=False)]:
        video = torch.stack([item["video"] for item in items]).to(device)
        posterior = codec.vae.encode(video.flatten(0, 1)).latent_dist
        means, stds = posterior.mean.unflatten(0, video.shape[:2]), posterior.std.unflatten(0, video.shape[:2])
        for item, mean, std in zip(items, means, stds, strict=True):
            if tar is None:
                path = folder / f"latents-{shard:06d}.tar"
                tar = wds.TarWriter(str(path), mtime=0)
            meta = {
                "key": item["key"],
                "caption": item["caption"],
                "fps": float(item["fps"]),
                "motion": float(item["motion"]),
                "num_frames": clips.spec.num_frames,
                "fps_choices": sorted(set(clips.spec.rates)) if clips.spec.several_rates else None,
                "vae": fingerprint,
            }
            tar.write({"__key__": item["key"], "mean.npy": _npy(mean), "std.npy": _npy(std), "json": meta})
            written += 1
            if written % per_shard == 0:
                tar.close()
                tar, shard = None, shard + 1
                yield path
    if tar is not None:
        tar.close()
        yield path


class LatentDataset(ClipDataset):
    """Cached latents in the clip loader's order; items carry `latent_mean`,
    `latent_std` (T, C, h, w) and the VAE fingerprint instead of `video`."""

    def _plan(self, epoch: int, raw: dict) -> tuple[dict, list[int], random.Random] | None:
        meta = json.loads(raw["json"])
        cached = sorted(meta.get("fps_choices") or [meta["fps"]])  # caches of one rate have none
        wanted = sorted(set(self.spec.rates)) if self.spec.several_rates else [self.spec.fps]
        if meta["num_frames"] != self.spec.num_frames or cached != wanted:
            rates = "fps_choices" if self.spec.several_rates else "fps"
            raise ValueError(
                f"latents cached for {meta['num_frames']} frames at {cached} fps; this stage wants "
                f"{self.spec.num_frames} at clip.{rates} {wanted}: cache again for this stage"
            )
        return meta, [], random.Random(0)

    def _decode(self, raw: dict, meta: dict, indices: list[int], rng: random.Random) -> dict:
        return {
            "key": raw["__key__"],
            "latent_mean": torch.from_numpy(np.load(io.BytesIO(raw["mean.npy"]))).float(),
            "latent_std": torch.from_numpy(np.load(io.BytesIO(raw["std.npy"]))).float(),
            "vae": meta["vae"],
            "fps": torch.tensor(meta["fps"]),
            "motion": torch.tensor(meta["motion"]),
            "caption": meta["caption"],
        }
