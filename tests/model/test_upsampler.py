"""The x4 video upsampler (Video LDM): the config, the low-resolution clip on the latent
grid with its noise strength as micro-conditioning, patches of the latents and the matching
low-resolution crop, the per-frame image upsampler that an identity temporal stack leaves
exact (and that image training keeps exact), whole frames of another size than the
patches, PSNR and flicker, and the kind's evaluation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from components.sample_data.shards import write_shapes_shards
from model.conditioning import added_time_ids
from model.networks import is_temporal
from model.pipeline import GenerationConfig
from model.spatial import images_only
from model.stages import VideoDiffusion, named_config
from model.tasks import task_of
from model.train import train
from model.upsampler import bicubic, downscale, flicker, psnr

CONFIG = named_config("tiny", "upsampler")
TASK = task_of("upsampler")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=1, clips_per_shard=3, height=64, width=64)
    return [str(p) for p in paths]


def _batch(frames: int = 4, size: int = 64, seed: int = 0) -> dict:
    video = torch.rand(2, frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"video": video, "fps": torch.tensor([8.0, 8.0]), "motion": torch.tensor([1.0, 1.0]), "caption": ["", ""]}


@torch.no_grad()
def _denoise(model: VideoDiffusion, x: torch.Tensor, low: torch.Tensor, strength: float = 0.0) -> torch.Tensor:
    n = x.shape[0]
    ids = added_time_ids(torch.full((n,), 8.0), torch.ones(n), torch.full((n,), strength))
    text = model.text([""]).expand(n, -1, -1)
    return model.denoiser(x, torch.full((n,), 1.0), text=text, added=ids, low_res=low)


def _inputs(frames: int, latent: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 4, latent, latent, generator=g), torch.rand(1, frames, 3, latent, latent, generator=g)


def _per_frame(model: VideoDiffusion, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Each frame through the network alone, as a one-frame clip."""
    return torch.cat([_denoise(model, x[:, t : t + 1], low[:, t : t + 1]) for t in range(x.shape[1])], dim=1)


def test_the_config_is_a_x4_upsampler_trained_on_patches():
    assert CONFIG.options.patch == 32 and CONFIG.clip.height == 64 and CONFIG.strategy == "full"
    for size in ("small", "svd"):  # the SD x4 upscaler's VAE: it downsamples by 4, as the tiny one
        assert named_config(size, "upsampler").vae == "weights:sd-x4-upscaler"
    with pytest.raises(ValueError, match="image upsampler \\(data: images\\) trains with strategy full"):
        CONFIG.with_fields(data="images", strategy="partial")
    with pytest.raises(ValueError, match="strategy full or partial, not 'spatial'"):
        CONFIG.with_fields(strategy="spatial")
    with pytest.raises(ValueError, match="patch must be a multiple of 16 and fit the clip, not 40"):
        CONFIG.with_fields(patch=40)
    with pytest.raises(ValueError, match="clip.height must be a multiple of 16"):
        replace(CONFIG, clip=replace(CONFIG.clip, height=40))


def test_the_unet_takes_the_low_resolution_frames_beside_the_latents():
    model = VideoDiffusion.create(CONFIG)
    assert model.unet.config.in_channels == 4 + 3 and model.codec.downsampling == 4
    # Widened from a video UNet: the new channels start at zero, so they change nothing yet...
    x, low = _inputs(2, 8)
    assert torch.equal(_denoise(model, x, low), _denoise(model, x, torch.zeros_like(low)))
    # ...and a low-resolution clip off the latent grid is refused.
    with pytest.raises(ValueError, match="off the latent grid"):
        _denoise(model, x, low[..., :4, :4])


def test_an_identity_temporal_stack_is_exactly_the_per_frame_image_upsampler_and_image_training_keeps_it():
    torch.manual_seed(0)
    model = VideoDiffusion.create(CONFIG)
    with torch.no_grad():  # an image upsampler that uses its low-resolution input
        model.unet.conv_in.weight.add_(0.1 * torch.randn_like(model.unet.conv_in.weight))
    x, low = _inputs(4, 8)
    whole = _denoise(model, x, low)
    assert torch.allclose(whole, _per_frame(model, x, low), atol=1e-5)
    with images_only(model.unet):  # the temporal branches off: the image upsampler itself
        assert torch.allclose(whole, _denoise(model, x, low), atol=1e-5)
    # Swapping two frames swaps their outputs: no frame sees another.
    order = [1, 0, 2, 3]
    assert torch.allclose(_denoise(model, x[:, order], low[:, order]), whole[:, order], atol=1e-5)
    # Temporal layers that compute something (as after video training) make the frames interact.
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if is_temporal(name) and name != "add_embedding.linear_2.weight":
                param.add_(0.05 * torch.randn_like(param))
    assert not torch.allclose(_denoise(model, x, low), _per_frame(model, x, low), atol=1e-3)


def test_image_training_leaves_the_temporal_layers_at_identity(tmp_path):
    """The image upsampler (data: images) trains spatial layers and the strength embedding;
    it stays exactly per-frame."""
    import io

    import webdataset as wds
    from PIL import Image

    path = tmp_path / "images-000000.tar"
    with wds.TarWriter(str(path), mtime=0) as tar:
        for i in range(4):
            png = io.BytesIO()
            array = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
            Image.fromarray(array).save(png, format="PNG")
            tar.write({"__key__": f"image-{i}", "png": png.getvalue(), "json": {"caption": ""}})
    images = CONFIG.with_fields(
        data="images", batch_size=2, max_steps=2, checkpoint_every=2, validation_clips=0, sample_steps=1
    )
    before = {k: v.clone() for k, v in VideoDiffusion.create(images).unet.state_dict().items()}
    image_run = train(images, [str(path)], tmp_path / "image")
    after = VideoDiffusion.load(image_run.final)
    state = after.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], state[k])}
    assert any(not is_temporal(k) for k in changed) and "add_embedding.linear_2.weight" in changed
    # The zeroed last layers of every temporal branch are still zero: the identity holds.
    for name, value in state.items():
        if name.endswith("temporal_res_block.conv2.weight") or (
            ".temporal_transformer_blocks." in name and "to_out.0.weight" in name
        ):
            assert not value.any(), name
    x, low = _inputs(4, 8)
    assert torch.allclose(_denoise(after, x, low), _per_frame(after, x, low), atol=1e-5)


def test_patches_crop_the_latents_and_the_matching_low_resolution_frames():
    model = VideoDiffusion.create(CONFIG.with_fields(noise_aug_max=0.0))
    batch = _batch(frames=2)
    latents = torch.randn(2, 2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cropped, cond = TASK.training_inputs(model, batch, latents, torch.Generator().manual_seed(4))
    assert cropped.shape == (2, 2, 4, 8, 8) and cond["low_res"].shape == (2, 2, 3, 8, 8)
    low = downscale(batch["video"])  # (2, 2, 3, 16, 16): the latent grid
    offsets = set()
    for b in range(2):  # find where the latent patch came from; the low-resolution crop is the same place
        (top, left), *_ = [
            (i, j) for i in range(9) for j in range(9) if torch.equal(latents[b, ..., i : i + 8, j : j + 8], cropped[b])
        ]
        assert torch.equal(cond["low_res"][b], low[b, ..., top : top + 8, left : left + 8])
        offsets.add((top, left))
    assert torch.equal(cond["added"][:, 2], torch.zeros(2))


def test_the_low_resolution_clip_is_noise_augmented_at_the_strength_the_model_is_told():
    model = VideoDiffusion.create(CONFIG.with_fields(noise_aug_max=0.5, patch=None))
    batch = _batch(frames=2)
    latents = torch.zeros(2, 2, 4, 16, 16)
    _, cond = TASK.training_inputs(model, batch, latents, torch.Generator().manual_seed(5))
    strength = cond["added"][:, 2]
    assert ((strength >= 0) & (strength <= 0.5)).all() and strength[0] != strength[1]
    noise = cond["low_res"] - downscale(batch["video"])
    for b in range(2):
        assert abs(float(noise[b].std()) - float(strength[b])) < 0.1 * float(strength[b]) + 1e-3


def test_trained_on_patches_it_upsamples_whole_frames_of_another_size(tmp_path, shards):
    clip = replace(CONFIG.clip, num_frames=4)
    config = CONFIG.with_fields(clip=clip, max_steps=2, checkpoint_every=2, validation_clips=0, sample_steps=1)
    folder = train(config, shards, tmp_path / "run").final
    model = VideoDiffusion.load(folder)
    assert model.config.stage == "upsampler" and model.unet.config.in_channels == 7
    clip = torch.rand(3, 3, 12, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1  # not the patch's 8x8
    settings = GenerationConfig(steps=3, seed=7)
    out = TASK.sample(model, TASK.Inputs(video=clip), settings)
    assert out.shape == (3, 3, 48, 80) and out.abs().max() <= 1
    assert torch.equal(out, TASK.sample(model, TASK.Inputs(video=clip), settings))  # seeded
    with pytest.raises(ValueError, match="4x its sides must be multiples of 8"):
        TASK.sample(model, TASK.Inputs(video=clip[..., :11, :]), settings)


def test_psnr_and_flicker_measure_what_they_say():
    truth = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    assert flicker(truth, truth) == 0 and psnr(truth, truth) > 100
    # An error that is the same in every frame does not flicker; one that changes does.
    steady = truth + 0.1
    assert flicker(steady, truth) < 1e-4 and abs(psnr(steady, truth) - 10 * torch.log10(torch.tensor(4 / 0.01))) < 0.1
    noisy = truth + 0.1 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert flicker(noisy, truth) > 5
    assert downscale(truth).shape == (4, 3, 4, 4) and bicubic(downscale(truth)).shape == truth.shape


def test_the_evaluation_upsamples_held_out_clips_downscaled_x4(shards):
    model = VideoDiffusion.create(CONFIG)
    evaluation = TASK.evaluate(model, shards, clips=2, steps=2)
    metrics = evaluation.metrics
    assert set(metrics) == {"upscale_flicker", "upscale_psnr", "bicubic_flicker", "bicubic_psnr"}
    assert TASK.metric.name == "upscale_flicker" and TASK.guard.name == "upscale_psnr"
    # An untrained upsampler is far from the truth; bicubic interpolation of these smooth discs is close.
    assert metrics["bicubic_psnr"] > 25 > metrics["upscale_psnr"]
    assert len(evaluation.samples) == 2 and evaluation.samples[0].shape == (8, 3, 64, 64)
    assert len(evaluation.references) == 2 and evaluation.references[0].shape == (8, 3, 64, 64)


def test_partial_training_starts_from_an_upsampler_not_a_plain_video_model(tmp_path):
    video = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    with pytest.raises(ValueError, match="strategy partial trains the temporal layers of an image upsampler"):
        VideoDiffusion.create(CONFIG.with_fields(strategy="partial"), init_from=video)
    widened = VideoDiffusion.create(CONFIG, init_from=video)  # full: any video model is a start
    assert widened.unet.config.in_channels == 7


def test_the_cascade_generates_then_upsamples_the_same_frames():
    from model.pipeline import generate, generate_and_upscale

    base = VideoDiffusion.create(named_config("tiny", "video"))
    upsampler = VideoDiffusion.create(CONFIG)
    settings = GenerationConfig(num_frames=2, height=16, width=24, steps=1, seed=3)
    low, high = generate_and_upscale(base, upsampler, "a disc", settings)
    assert torch.equal(low, generate(base, "a disc", settings))
    assert low.shape == (2, 3, 16, 24) and high.shape == (2, 3, 64, 96)
    with pytest.raises(ValueError, match="the cascade's upsampler must be an upsampler model, not a 'video' one"):
        generate_and_upscale(base, base, "a disc", settings)


# SD's x4 upscaler's UNet config (stabilityai/stable-diffusion-x4-upscaler, unet/config.json).
SD_X4_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 7,
    "layers_per_block": 2,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def test_the_sd_x4_upscalers_unet_is_refused_as_a_start_with_the_reason():
    """Built at full size on the meta device: its noise-level class embedding and
    cross-attention-only blocks have no place in the spatio-temporal UNet."""
    from diffusers import UNet2DConditionModel

    from model.networks import inflate

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD_X4_UNET)
        assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 473  # SD x4 upscaler's UNet
        with pytest.raises(ValueError, match="class embedding or cross-attention-only blocks"):
            inflate(unet)
