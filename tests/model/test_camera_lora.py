"""Camera-motion LoRA: synthetic camera clips whose motion is known, the estimator that
reads it back, clips selected by curation's label, LoRA only in the temporal attention,
only the adapter training, adapters saved apart from the unchanged base and switched at
sampling time without reloading; and a short `pan` finetune after which the adapter
denoises pan clips better than the base at a fixed noise level (the cheap proxy; full
sampling and the camera-motion class are in benchmarks/camera_lora_evidence)."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from components.sample_data.shards import write_camera_shards
from model import camera_lora
from model.camera_motion import estimate, motion_class
from model.conditioning import added_time_ids
from model.data import ClipDataset
from model.pipeline import GenerationConfig, generate
from model.stages import VideoDiffusion, named_config
from model.train import train
from model.training import apply_strategy

CONFIG = named_config("tiny", "camera-lora")
CLASS_OF_LABEL = {label: c for c, labels in camera_lora.MOTION_CLASSES.items() for label in labels}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths, truth = write_camera_shards(tmp_path_factory.mktemp("camera"), clips_per_label=1, shards=2)
    return [str(p) for p in paths], truth


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("video") / "final")


def test_synthetic_camera_clips_read_back_as_their_motion(shards):
    paths, truth = shards
    clips = list(ClipDataset(paths, CONFIG.clip, random_crop=False, epochs=1))
    assert len(clips) == 5
    for clip in clips:
        known = truth[clip["key"]]
        motion = estimate(clip["video"])
        assert motion.translation[0] == pytest.approx(known["content_velocity_px_per_frame"][0], abs=0.2)
        assert abs(motion.translation[1]) < 0.2
        corner = (known["zoom_rate_per_frame"] - 1) * (32**2 / 2) ** 0.5  # radial px per frame at the corner
        assert motion.zoom == pytest.approx(corner, abs=0.3)
        assert motion_class(motion) == CLASS_OF_LABEL[known["camera_motion"]]
        # Curation's motion score, mean flow magnitude: a 1.1x zoom moves a pixel 0.1x its
        # distance from the centre, 12.24 px on average in a 32 px frame.
        score = {"pan_left": 4.0, "pan_right": 4.0, "zoom_in": 1.224, "zoom_out": 1.113, "static": 0.0}
        assert float(clip["motion"]) == pytest.approx(score[known["camera_motion"]], abs=0.001)


def test_the_disc_world_reads_as_its_camera_motion(tmp_path):
    paths, truth = write_camera_shards(tmp_path, clips_per_label=1, shards=1, pan_px_per_frame=3, scene="discs")
    clips = list(ClipDataset([str(p) for p in paths], CONFIG.clip, random_crop=False, epochs=1))
    assert len(clips) == 5 and all(c["caption"] == "a disc moving on black" for c in clips)
    for clip in clips:
        known = truth[clip["key"]]
        frames = clip["video"]
        assert ((frames > -0.5).float().mean() < 0.3) and frames.amax() > 0.5  # discs on black
        motion = estimate(frames)
        assert motion.translation[0] == pytest.approx(known["content_velocity_px_per_frame"][0], abs=0.2)
        assert abs(motion.translation[1]) < 0.2
        corner = (known["zoom_rate_per_frame"] - 1) * (32**2 / 2) ** 0.5
        assert motion.zoom == pytest.approx(corner, abs=0.5)
        assert motion_class(motion) == CLASS_OF_LABEL[known["camera_motion"]]


def test_a_motion_class_trains_on_its_labels_only(shards):
    paths, _ = shards
    keys = [c["key"] for c in ClipDataset(paths, CONFIG.clip, camera_motion=("pan_left", "pan_right"), epochs=1)]
    assert sorted(k.split("-")[2] for k in keys) == ["pan_left", "pan_right"]
    assert camera_lora.labels_of("zoom_out") == ("zoom_out",)
    with pytest.raises(ValueError, match="labelled tilt_up"):
        list(ClipDataset(paths, CONFIG.clip, camera_motion=("tilt_up",), epochs=1))
    classes = r"\['pan', 'static', 'zoom_in', 'zoom_out'\]"
    with pytest.raises(ValueError, match=rf"unknown motion class 'dolly'; one of {classes}"):
        CONFIG.with_fields(motion_class="dolly")
    with pytest.raises(ValueError, match="strategy: lora"):
        replace(CONFIG, strategy="full")


def _denoise(model: VideoDiffusion, adapter: str | None, strength: float = 1.0) -> torch.Tensor:
    camera_lora.use_adapter(model.unet, adapter, strength)
    x = torch.randn(1, 8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = added_time_ids(torch.tensor([8.0]), torch.ones(1), torch.zeros(1))
    with torch.no_grad():
        return model.denoiser(x, torch.tensor([2.0]), text=model.text([""]), added=ids)


def _randomize(model: VideoDiffusion, adapter: str, seed: int) -> None:
    """Trained-looking adapter weights (B starts at zero, where the adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if camera_lora.is_adapter_weight(name, adapter):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_motion_jitter_redraws_its_share_of_training_scores_within_its_range(base_folder):
    model = VideoDiffusion.load(base_folder)
    model.config = CONFIG.with_fields(motion_class="pan", motion_jitter=0.5, motion_jitter_max=3.0)
    batch = {"motion": torch.full((4000,), 7.0)}
    model.train()
    motion = CONFIG.task.training_motion(model, batch, torch.Generator().manual_seed(0))
    redrawn = motion != 7.0
    assert 0.46 < redrawn.float().mean() < 0.54
    assert motion[redrawn].min() >= 0 and motion[redrawn].max() <= 3.0
    assert 1.4 < motion[redrawn].mean() < 1.6  # uniform in [0, 3]
    model.eval()  # sampling asks for the score it is given
    assert torch.equal(CONFIG.task.training_motion(model, batch, torch.Generator().manual_seed(0)), batch["motion"])
    assert CONFIG.options.motion_jitter == 0.5  # the camera-lora config trains with it
    with pytest.raises(ValueError, match="motion_jitter"):
        CONFIG.with_fields(motion_jitter=1.5)


def test_lora_wraps_the_temporal_attention_only_starts_as_the_base_and_only_it_trains(base_folder):
    base = VideoDiffusion.load(base_folder)
    model = VideoDiffusion.create(CONFIG.with_fields(motion_class="pan"), init_from=base_folder)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.unet.named_parameters() if ".lora_A.pan." in n}
    blocks = [n for n, _ in base.unet.named_modules() if re.search(r"temporal_transformer_blocks\.\d+$", n)]
    assert len(blocks) == 4 and len(wrapped) == len(blocks) * 2 * 4  # attn1 and attn2: q, k, v, out each
    assert all(".temporal_transformer_blocks." in n and ".attn" in n for n in wrapped)
    torch.testing.assert_close(_denoise(model, "pan"), _denoise(base, None), rtol=0, atol=0)

    params = apply_strategy(model.unet, "lora", "pan")
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert len(params) == len(names) == 2 * len(wrapped) and all(".lora_" in n for n in names)
    assert sum(p.numel() for p in params) < 0.01 * sum(p.numel() for p in base.unet.parameters())


def test_adapters_are_saved_apart_added_to_and_switched_without_reloading(base_folder, tmp_path):
    base = VideoDiffusion.load(base_folder)
    pan = VideoDiffusion.create(CONFIG.with_fields(motion_class="pan"), init_from=base_folder)
    _randomize(pan, "pan", seed=1)
    first = pan.save(tmp_path / "pan")
    weights = first / "adapters" / "pan" / camera_lora.ADAPTER_WEIGHTS
    assert (first / "adapters" / "pan" / camera_lora.ADAPTER_CONFIG).exists()
    assert weights.stat().st_size < 0.05 * (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    saved_base = UNetSpatioTemporalConditionModel.from_pretrained(first / "unet").state_dict()
    assert all(torch.equal(v, saved_base[k]) for k, v in base.unet.state_dict().items())  # unet/ is the base

    # A later finetune adds its class next to the first one's.
    zoom = VideoDiffusion.create(CONFIG.with_fields(motion_class="zoom_in"), init_from=first)
    assert camera_lora.adapter_names(zoom.unet) == ["pan", "zoom_in"]
    _randomize(zoom, "zoom_in", seed=2)
    both = VideoDiffusion.load(zoom.save(tmp_path / "both"))
    assert camera_lora.saved_adapters(tmp_path / "both") == ["pan", "zoom_in"]

    base_out, pan_out, zoom_out = _denoise(base, None), _denoise(pan, "pan"), _denoise(zoom, "zoom_in")
    apply_strategy(both.unet, "lora", "zoom_in")
    trains = {n for n, p in both.unet.named_parameters() if p.requires_grad}
    for adapter, expected in (("pan", pan_out), (None, base_out), ("zoom_in", zoom_out), ("pan", pan_out)):
        torch.testing.assert_close(_denoise(both, adapter), expected)
    assert not torch.allclose(pan_out, base_out) and not torch.allclose(zoom_out, pan_out)
    assert {n for n, p in both.unet.named_parameters() if p.requires_grad} == trains  # sampling left training alone

    # Strength scales the adapter's update: 0 is the base, 1 as trained again after 2.
    torch.testing.assert_close(_denoise(both, "zoom_in", strength=0.0), base_out)
    layer = next(m for n, m in both.unet.named_modules() if n.endswith("attn1.to_q") and hasattr(m, "lora_A"))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(3))
    update = {}
    for strength in (1.0, 2.0):
        camera_lora.use_adapter(both.unet, "zoom_in", strength)
        update[strength] = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(update[2.0], 2 * update[1.0])
    assert not torch.allclose(_denoise(both, "zoom_in", strength=2.0), zoom_out)
    torch.testing.assert_close(_denoise(both, "zoom_in"), zoom_out)

    config = GenerationConfig(num_frames=4, steps=1)
    with pytest.raises(ValueError, match=r"no camera-motion adapter 'static'; it has \['pan', 'zoom_in'\]"):
        generate(both, "", replace(config, adapter="static"))
    assert generate(both, "", replace(config, adapter="zoom_in")).shape == (4, 3, 32, 32)


@torch.no_grad()
def _pan_error(model: VideoDiffusion, adapter: str | None, videos: torch.Tensor, sigma: float = 1.0) -> float:
    """MSE of the denoised latents of pan clips at one noise level, the same noise for every model."""
    model.eval()
    camera_lora.use_adapter(model.unet, adapter)
    x0 = model.codec.encode(videos, torch.Generator().manual_seed(0))
    n = len(videos)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    ids = added_time_ids(torch.full((n,), 8.0), torch.ones(n), torch.zeros(n))
    denoised = model.denoiser(noisy, torch.full((n,), sigma), text=model.text([""] * n), added=ids)
    return float((denoised - x0).pow(2).mean())


def test_a_short_pan_finetune_denoises_pan_clips_better_and_leaves_the_base_untouched(base_folder, tmp_path):
    paths, _ = write_camera_shards(tmp_path / "shards", clips_per_label=4, shards=2)
    shards = [str(p) for p in paths]
    config = CONFIG.with_fields(
        motion_class="pan", batch_size=2, max_steps=15, checkpoint_every=15, cond_dropout=0.0,
        optim=replace(CONFIG.optim, lr=2e-2, warmup_steps=2, ema_decay=0.0),
    )  # fmt: skip
    pans = ClipDataset(
        shards, config.clip, camera_motion=camera_lora.labels_of(config.options.motion_class), random_crop=False, seed=1
    )
    videos = torch.stack([c["video"] for c in itertools.islice(pans, 4)])
    model = train(config, shards, tmp_path / "work", init_from=base_folder).model
    base, pan = _pan_error(model, None, videos), _pan_error(model, "pan", videos)
    assert pan < 0.9 * base, (pan, base)  # 0.82 on this seed
    trained_base = camera_lora.base_unet(model.unet).state_dict()
    saved = UNetSpatioTemporalConditionModel.from_pretrained(base_folder / "unet").state_dict()
    assert all(torch.equal(v, trained_base[k]) for k, v in saved.items())  # only the adapter trained
