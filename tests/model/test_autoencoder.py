"""The frame VAE for CPU-sized models learns to reconstruct the synthetic frames and
is scaled to unit-variance latents."""

from __future__ import annotations

import itertools

import torch

from components.sample_data.shards import write_shapes_shards
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec
from model.data import ClipDataset, ClipSpec


def shape_frames(folder, shards: int):
    """Batches of 16 frames (4 clips of 4) from moving-shapes shards, and 8 held-out clips' frames."""
    paths, _ = write_shapes_shards(folder, shards=shards, clips_per_shard=4)
    clips = ClipDataset([str(p) for p in paths], ClipSpec(num_frames=4, fps=8.0, height=32, width=32))

    def batches():
        stream = iter(clips)
        while True:
            yield torch.cat([next(stream)["video"] for _ in range(4)])

    return batches, torch.cat([item["video"] for item in itertools.islice(iter(clips), 8)])


def test_training_reconstructs_frames_and_scales_latents_to_unit_variance(tmp_path):
    batches, held_out = shape_frames(tmp_path, shards=2)
    untrained = LatentCodec.tiny()
    before = reconstruction_error(untrained.vae, held_out)
    vae = train_autoencoder(LatentCodec.tiny().vae, batches(), AutoencoderTraining(steps=60, batch_frames=16))
    after = reconstruction_error(vae, held_out)
    assert after < 0.4 * before, (before, after)
    codec = LatentCodec(vae)
    latents = codec.encode(held_out[None], torch.Generator().manual_seed(0))
    assert 0.7 < latents.std().item() < 1.4


def test_decoder_only_finetune_keeps_the_latent_space_and_improves_reconstruction(tmp_path):
    batches, held_out = shape_frames(tmp_path, shards=1)
    vae = train_autoencoder(LatentCodec.tiny().vae, batches(), AutoencoderTraining(steps=20, batch_frames=16))
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    scaling, before = vae.config.scaling_factor, reconstruction_error(vae, held_out)
    vae = train_autoencoder(vae, batches(), AutoencoderTraining(steps=20, lr=1e-3, decoder_only=True))
    assert vae.config.scaling_factor == scaling
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in encoder.items())
    after = reconstruction_error(vae, held_out)
    assert after < 0.9 * before, (before, after)
