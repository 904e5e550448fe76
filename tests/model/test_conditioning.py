"""Conditioning pieces: the text tower's penultimate tokens, micro-conditioning, dropout, the VAE codec."""

from __future__ import annotations

import pytest
import torch

from model.conditioning import LatentCodec, TextEncoder, added_time_ids, drop_conditions, motion_bucket
from model.openclip import TINY_CLIP_MODEL, register_tiny_models
from model.records import MAX_MOTION


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    register_tiny_models(tmp_path_factory.mktemp("openclip"))
    return TextEncoder(TINY_CLIP_MODEL, None)


def test_text_tokens_shape_determinism_and_frozen(text):
    out = text(["a red disc moves right", "a red disc moves right", "static grey wall"])
    assert out.shape == (3, 77, text.width)
    torch.testing.assert_close(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-3
    assert not any(p.requires_grad for p in text.parameters())


def test_text_encoder_uses_the_penultimate_layer(text, tmp_path):
    """Weights saved from the full model load into the encoder; its last block is not used."""
    import open_clip

    clip = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded = TextEncoder(TINY_CLIP_MODEL, tmp_path / "clip.pt")
    tokens = open_clip.get_tokenizer(TINY_CLIP_MODEL)(["a caption"])
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for block in clip.transformer.resblocks[:-1]:
        x = block(x, attn_mask=clip.attn_mask)
    torch.testing.assert_close(loaded(["a caption"]), clip.ln_final(x).detach())


def test_micro_conditioning():
    buckets = motion_bucket(torch.tensor([0.0, 0.5, 2.0, 100.0]))
    assert buckets.tolist() == [0.0, 32.0, 128.0, 255.0]
    # The largest motion the API and `vdm sample` take is the first with the last bucket.
    edge = motion_bucket(torch.tensor([MAX_MOTION - 1 / 64, MAX_MOTION, MAX_MOTION + 1 / 64]))
    assert edge.tolist() == [254.0, 255.0, 255.0]
    ids = added_time_ids(torch.tensor([8, 24]), torch.tensor([0.1, 3.0]), torch.tensor([0.02, 0.0]))
    torch.testing.assert_close(ids, torch.tensor([[8.0, 6.0, 0.02], [24.0, 192.0, 0.0]]))


@pytest.mark.parametrize("probability,expected", [(0.0, 0), (1.0, 1000), (0.1, 100)])
def test_condition_dropout(probability, expected):
    embeddings = torch.ones(1000, 5, 4)
    empty = torch.zeros(1, 5, 4)
    out = drop_conditions(embeddings, empty, probability, torch.Generator().manual_seed(0))
    dropped = int((out.abs().sum(dim=(1, 2)) == 0).sum())
    assert dropped == pytest.approx(expected, abs=30)
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_latent_codec_shapes_and_round_trip_of_an_untrained_vae():
    codec = LatentCodec.tiny()
    video = torch.rand(2, 3, 3, 32, 48) * 2 - 1
    latents = codec.encode(video, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 3, 4, 8, 12)
    frames = codec.decode(latents)
    assert frames.shape == video.shape and frames.min() >= -1 and frames.max() <= 1
    assert not any(p.requires_grad for p in codec.parameters())


def test_vae_loads_from_a_pipeline_folder(tmp_path):
    codec = LatentCodec.tiny()
    codec.vae.save_pretrained(tmp_path / "sd" / "vae")
    loaded = LatentCodec.from_folder(tmp_path / "sd")
    video = torch.zeros(1, 1, 3, 16, 16)
    torch.testing.assert_close(
        loaded.vae.encode(video[0]).latent_dist.mean, codec.vae.encode(video[0]).latent_dist.mean
    )


def test_clips_drawn_at_several_rates_condition_on_their_rate_and_motion_bucket(tmp_path):
    """Known truth: discs at a known speed per source frame, drawn at whole strides of a 24 fps clip."""
    from torch.utils.data import default_collate

    from components.sample_data.shards import write_shapes_shards
    from model.data import ClipDataset, ClipSpec

    paths, truth = write_shapes_shards(tmp_path, shards=1, clips_per_shard=6, num_frames=24, fps=24.0, max_speed=0.5)
    spec = ClipSpec(num_frames=4, fps=8.0, fps_choices=(4.0, 8.0, 12.0), height=32, width=32)
    batch = default_collate(list(ClipDataset([str(p) for p in paths], spec, epochs=2)))
    ids = added_time_ids(batch["fps"], batch["motion"], torch.zeros(len(batch["fps"])))
    strides = torch.tensor([24.0 / fps for fps in batch["fps"].tolist()]).round()
    assert set(strides.tolist()) == {2.0, 3.0, 6.0}
    speeds = torch.tensor([float(torch.tensor(truth[key]["velocities"][0]).norm()) for key in batch["key"]])
    torch.testing.assert_close(ids[:, 0], 24.0 / strides)
    torch.testing.assert_close(ids[:, 1], (64 * speeds * strides).round())  # bucket of the motion per drawn frame


def test_generation_conditions_the_network_on_the_requested_fps_and_motion():
    from model.pipeline import GenerationConfig, generate
    from model.stages import VideoDiffusion, named_config

    torch.manual_seed(0)
    model = VideoDiffusion.create(named_config("tiny", "video"))
    seen: list[torch.Tensor] = []
    model.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["added_time_ids"]), with_kwargs=True
    )
    config = GenerationConfig(num_frames=2, height=16, width=16, steps=1, sampler="euler", fps=4.0, motion=2.0)
    first = generate(model, "a disc", config)
    assert seen and all(ids.tolist() == [[4.0, 128.0, 0.0]] * len(ids) for ids in seen)
    # The inflated model starts blind to them (its micro-conditioning embedding is zero) ...
    torch.testing.assert_close(generate(model, "a disc", GenerationConfig(**{**config.__dict__, "fps": 8.0})), first)
    # ... and a trained one reads them: the same noise at another fps or motion gives another video.
    torch.nn.init.normal_(model.unet.add_embedding.linear_2.weight, std=0.5)
    again = generate(model, "a disc", config)
    for other in ({"fps": 8.0}, {"motion": 1.0}):
        changed = generate(model, "a disc", GenerationConfig(**{**config.__dict__, **other}))
        assert (changed - again).abs().max() > 1e-3
