"""Stage I -> Stage II inflation: every spatial weight maps, and the untrained video
model is the image model applied frame by frame."""

from __future__ import annotations

import copy

import pytest
import torch

from model.networks import (
    CONFIGS,
    NORMS,
    image_unet,
    inflate,
    is_temporal,
    load_image_unet,
    load_video_unet,
    video_key,
    video_unet,
    widen_input,
)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    unet = image_unet(CONFIGS["tiny"]).eval()
    # Random, not default-initialised, weights: zero-initialised layers would hide mapping errors.
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def test_key_mapping_covers_every_spatial_key(image):
    video = video_unet(CONFIGS["tiny"])
    video_keys = set(video.state_dict())
    mapped = {video_key(k) for k in image.state_dict()}
    assert mapped <= video_keys  # every Stage I weight has a home
    assert {k for k in video_keys - mapped if not is_temporal(k)} == set()  # and only temporal ones are new
    assert any("spatial_res_block" in k for k in mapped)


def test_inflated_model_is_the_image_model_per_frame(image):
    # Compared in float64 (same float32 weights in both), the identity is exact up to
    # rounding, so any leak of the temporal layers would show.
    video = inflate(image).eval().double()
    image = copy.deepcopy(image).double()
    batch, frames, size = 2, 5, 16
    torch.manual_seed(1)
    x = torch.randn(batch, frames, 4, size, size, dtype=torch.float64)
    text = torch.randn(batch, 7, CONFIGS["tiny"].cross_attention_dim, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    with torch.no_grad():
        per_frame = image(
            x.flatten(0, 1), t.repeat_interleave(frames), text.repeat_interleave(frames, dim=0)
        ).sample.unflatten(0, (batch, frames))
        added = torch.randn(
            batch, 3, dtype=torch.float64
        )  # fps, motion bucket, noise strength: zero-initialised, no effect yet
        out = video(x, t, text, added_time_ids=added).sample
    assert per_frame.abs().mean() > 0.01
    torch.testing.assert_close(out, per_frame, rtol=1e-9, atol=1e-9)


def test_temporal_layers_get_gradients_after_inflation(image):
    video = inflate(image)
    x = torch.randn(1, 3, 4, 16, 16)
    loss = video(x, torch.tensor([50.0]), torch.randn(1, 7, 64), added_time_ids=torch.randn(1, 3)).sample.pow(2).mean()
    loss.backward()
    # The zeroed last layer of every temporal branch gets a gradient, so training moves it
    # (and, after that step, the layers before it).
    last_layers = [
        n
        for n, _ in video.named_parameters()
        if n.endswith(
            (
                "temporal_res_block.conv2.weight",
                "attn1.to_out.0.weight",
                "ff.net.2.weight",
                "time_pos_embed.linear_2.weight",
            )
        )
        and is_temporal(n)
    ]
    grads = dict(video.named_parameters())
    assert len(last_layers) > 10
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in last_layers), last_layers


def test_image_to_video_input_channels_start_at_zero(image):
    video = inflate(image, in_channels=8)
    weight = video.conv_in.weight
    assert weight.shape[1] == 8
    torch.testing.assert_close(weight[:, :4], image.conv_in.weight)
    assert weight[:, 4:].abs().sum() == 0


def test_stage_one_weights_load_from_a_diffusers_folder(image, tmp_path):
    image.save_pretrained(tmp_path / "sd" / "unet")
    loaded = load_image_unet(tmp_path / "sd")
    for (name, a), (_, b) in zip(image.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert inflate(loaded) is not None


def test_a_saved_video_unet_reloads_to_the_network_it_was(image, tmp_path):
    """Inflation gives the video blocks the image model's norm epsilons where diffusers
    hard-codes others; the config records them, so the reloaded UNet (widened too)
    computes exactly what the saved one did. A plain diffusers load does not."""
    from diffusers import UNetSpatioTemporalConditionModel

    def epsilons(unet):
        return {name: m.eps for name, m in unet.named_modules() if isinstance(m, NORMS)}

    def output(unet):
        torch.manual_seed(2)
        x = torch.randn(1, 3, 8, 16, 16, dtype=torch.float64)
        text = torch.randn(1, 7, CONFIGS["tiny"].cross_attention_dim, dtype=torch.float64)
        with torch.no_grad():
            return unet(x, torch.tensor([50.0]), text, added_time_ids=torch.randn(1, 3)).sample

    video = widen_input(inflate(image), 8).eval().double()
    video.save_pretrained(tmp_path / "unet")
    plain = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet").eval().double()
    loaded = load_video_unet(tmp_path / "unet").eval().double()
    saved = epsilons(video)
    changed = {name for name, eps in epsilons(plain).items() if eps != saved[name]}
    assert len(changed) == 10 and {saved[n] for n in changed} == {1e-5}  # diffusers: 1e-6
    assert epsilons(loaded) == saved
    assert torch.equal(output(loaded), output(video))
    assert not torch.allclose(output(plain), output(video), rtol=0, atol=1e-9)


def test_checkpointing_each_whole_spatio_temporal_transformer_changes_no_value():
    """The widened checkpointing recomputes each spatio-temporal transformer as one region
    (diffusers' own leaves the temporal blocks' activations saved): same outputs, same grads."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    from model.networks import disable_checkpointing, enable_checkpointing

    torch.manual_seed(0)
    unet = video_unet(CONFIGS["tiny"])
    x, t, ctx, ids = torch.randn(2, 8, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 1, 64), torch.randn(2, 3)

    def step():
        unet.zero_grad()
        out = unet(x, t, ctx, added_time_ids=ids).sample
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in unet.parameters()]

    plain, plain_grads = step()
    regions = []

    def counting(module, *args):
        regions.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    enable_checkpointing(unet, counting)
    checkpointed, checkpointed_grads = step()
    assert torch.equal(plain, checkpointed)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, checkpointed_grads, strict=True))
    transformers = [m for m in unet.modules() if isinstance(m, TransformerSpatioTemporalModel)]
    assert unet.state_dict().keys() == video_unet(CONFIGS["tiny"]).state_dict().keys()
    # one region per transformer (whole) and per resnet; none for the transformer's inner blocks
    assert sum(1 for r in regions if getattr(r, "__name__", "") == "plain_forward") == len(transformers) > 0
    # a copy (EMA, export) runs its own transformers, not the original's
    twin = copy.deepcopy(unet)
    torch.nn.init.zeros_(twin.down_blocks[0].attentions[0].proj_out.weight)
    assert not torch.equal(twin(x, t, ctx, added_time_ids=ids).sample, unet(x, t, ctx, added_time_ids=ids).sample)
    assert not any(type(r).__name__ == "BasicTransformerBlock" for r in regions)
    disable_checkpointing(unet)
    regions.clear()
    assert torch.equal(step()[0], plain) and not regions
