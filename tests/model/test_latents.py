"""Latent caching: the cached posterior gives the same training loss as encoding on the
fly (same crop, same draws), and latents from another VAE or stage are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from components.sample_data.shards import write_shapes_shards
from model.data import ClipDataset
from model.latents import LatentDataset, write_latent_shards
from model.stages import VideoDiffusion, named_config
from model.train import train


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=3)
    config = named_config("tiny", "video")
    model = VideoDiffusion.create(config)
    clips = ClipDataset([str(p) for p in paths], config.clip, seed=config.seed, epochs=1)
    latent_shards = list(write_latent_shards(clips, model.codec, tmp_path_factory.mktemp("latents"), per_shard=4))
    return [str(p) for p in paths], [str(p) for p in latent_shards], model, config


def test_every_clip_is_cached_once_in_shards_of_the_requested_size(cached):
    _, latent_shards, _, config = cached
    assert len(latent_shards) == 2  # 6 clips, 4 per shard
    items = list(LatentDataset(latent_shards, config.clip, epochs=1))
    assert len({item["key"] for item in items}) == 6
    assert items[0]["latent_mean"].shape == (8, 4, 8, 8) and items[0]["latent_std"].min() > 0


def test_cached_latents_give_the_loss_of_encoding_on_the_fly(cached):
    clip_shards, latent_shards, model, config = cached
    model.eval()  # no condition dropout: the comparison is of the latents only
    video = next(iter(DataLoader(ClipDataset(clip_shards, config.clip, seed=config.seed), batch_size=3)))
    by_key = {item["key"]: item for item in LatentDataset(latent_shards, config.clip, epochs=1)}
    latent = default_collate([by_key[key] for key in video["key"]])  # the same clips, epoch 0's crops
    on_the_fly = model.loss(video, torch.Generator().manual_seed(5))
    from_cache = model.loss(latent, torch.Generator().manual_seed(5))
    assert from_cache.item() == pytest.approx(on_the_fly.item(), rel=2e-2)


def test_training_on_cached_latents_and_refusals(cached, tmp_path):
    _, latent_shards, _, config = cached
    result = train(replace(config, data="latents", max_steps=2), latent_shards, tmp_path)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ValueError, match="cache again"):
        next(iter(LatentDataset(latent_shards, replace(config.clip, num_frames=4))))
    other_vae = VideoDiffusion.create(config)
    torch.nn.init.normal_(other_vae.codec.vae.encoder.conv_in.weight)
    batch = next(iter(DataLoader(LatentDataset(latent_shards, config.clip), batch_size=2)))
    with pytest.raises(ValueError, match="cached with VAE"):
        other_vae.loss(batch, torch.Generator())


def test_a_cache_of_several_rates_keeps_each_clips_drawn_rate_and_refuses_other_rates(cached, tmp_path):
    clip_shards, single_rate_shards, model, config = cached
    spec = replace(config.clip, fps_choices=(8.0, 12.0, 24.0))  # strides 3, 2, 1 of the 24 fps clips
    clips = ClipDataset(clip_shards, spec, seed=config.seed, epochs=1)
    written = [str(p) for p in write_latent_shards(clips, model.codec, tmp_path / "latents", per_shard=8)]
    drawn = {item["key"]: item for item in ClipDataset(clip_shards, spec, seed=config.seed, epochs=1)}
    items = list(LatentDataset(written, spec, epochs=1))
    assert len(items) == 6 and len({item["fps"].item() for item in items}) > 1  # the clips span the rates
    for item in items:  # each clip at the rate and motion the loader drew for it
        assert item["fps"].item() == drawn[item["key"]]["fps"].item()
        assert item["motion"].item() == pytest.approx(drawn[item["key"]]["motion"].item())
    with pytest.raises(ValueError, match=r"at \[8.0, 12.0, 24.0\] fps; this stage wants 8 at clip.fps \[8.0\]"):
        next(iter(LatentDataset(written, config.clip)))
    with pytest.raises(ValueError, match=r"wants 8 at clip.fps_choices \[4.0, 8.0\]: cache again"):
        next(iter(LatentDataset(written, replace(config.clip, fps_choices=(4.0, 8.0)))))
    with pytest.raises(ValueError, match=r"at \[8.0\] fps; this stage wants 8 at clip.fps_choices"):
        next(iter(LatentDataset(single_rate_shards, spec)))
