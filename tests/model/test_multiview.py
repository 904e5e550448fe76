"""Multi-view (SVD-MV): the orbit renderer against its geometry, orbit shards and their
loader, the elevation in the micro-conditioning (training and sampling), and a short
finetune on orbits after which the denoiser predicts the novel views better than the
image-to-video model it started from and its prediction depends on the elevation."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import replace

import av
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from mlflow import MlflowClient
from PIL import Image
from test_image_to_video import _deterministic_vae

from components.sample_data.orbits import (
    _LIGHT,
    Box,
    boxes_from_truth,
    render_orbit,
    render_view,
    write_orbit_shards,
)
from components.sample_data.shards import write_shapes_shards
from model.conditioning import added_time_ids
from model.data import ClipSpec
from model.evaluation import psnr
from model.multiview import OrbitDataset, orbit, orbit_psnr
from model.pipeline import GenerationConfig, animate
from model.stages import StageConfig, VideoDiffusion, named_config
from model.train import train

CONFIG = named_config("tiny", "multiview")
STEPS = 40
CUBE = [Box((0.0, 0.0, 0.0), (0.4, 0.4, 0.4), (200, 100, 50))]


def _face_pixels(image: np.ndarray, normal: tuple[float, float, float]) -> int:
    """Pixels of exactly the shade the renderer gives CUBE's face with `normal`."""
    shade = 0.35 + 0.65 * max(0.0, float(np.dot(normal, _LIGHT)))
    color = np.array([round(c * shade) for c in CUBE[0].color])
    return int((image == color).all(axis=-1).sum())


def test_the_camera_orbits_a_centred_cube_and_sees_its_top_only_from_above():
    speck = [Box((0.0, 0.0, 0.0), (0.04, 0.04, 0.04), (255, 255, 255))]
    for elevation, azimuth in ((0.0, 0.0), (30.0, 75.0), (-20.0, 200.0)):
        # The world's origin projects to the image centre (pixel centres at i + 0.5).
        weight = render_view(speck, elevation, azimuth, 64).sum(axis=-1).astype(np.float64)
        ys, xs = np.indices(weight.shape)
        centre = (float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum()))
        assert centre == pytest.approx((31.5, 31.5), abs=0.3)
        image = render_view(CUBE, elevation, azimuth, 64)
        np.testing.assert_array_equal(image, render_view(CUBE, elevation, azimuth + 360.0, 64))
    top = (0.0, 1.0, 0.0)
    assert _face_pixels(render_view(CUBE, 0.0, 30.0, 64), top) == 0
    assert _face_pixels(render_view(CUBE, -30.0, 30.0, 64), top) == 0
    assert _face_pixels(render_view(CUBE, 30.0, 30.0, 64), top) < _face_pixels(render_view(CUBE, 60.0, 30.0, 64), top)
    # Head-on from azimuth 0 (the camera on +x) only the +x face shows.
    front = render_view(CUBE, 0.0, 0.0, 64)
    assert _face_pixels(front, (1.0, 0.0, 0.0)) == pytest.approx(front.any(axis=-1).sum(), rel=0.15)


def test_orbit_shards_carry_elevation_and_evenly_spaced_azimuths_of_renders_they_hold(tmp_path):
    paths, truth = write_orbit_shards(tmp_path, shards=1, orbits_per_shard=3, num_views=8, size=32, seed=1)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert len(samples) == 3 and set(truth) == {s["__key__"] for s in samples}
    for sample in samples:
        meta, record = json.loads(sample["json"]), truth[sample["__key__"]]
        assert meta["elevation"] == record["elevation"] and meta["end_frame"] == 8
        steps = np.diff(np.unwrap(np.radians(meta["azimuths"])))
        np.testing.assert_allclose(np.degrees(steps), 45.0, atol=1e-9)
    # The loader returns the whole turn in order, each view the render at its azimuth (H.264 aside).
    items = list(OrbitDataset([str(p) for p in paths], ClipSpec(8, 8.0, 32, 32), random_crop=False, epochs=1))
    for item in items:
        record = truth[item["key"]]
        assert item["elevation"].item() == record["elevation"] and item["video"].shape == (8, 3, 32, 32)
        renders = render_orbit(boxes_from_truth(record), record["elevation"], np.array(record["azimuths"]), 32)
        expected = torch.from_numpy(renders.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert psnr(item["video"], expected) > 25  # H.264 at 32 px blurs the edges a little
        assert psnr(item["video"][1:], expected[:-1]) < psnr(item["video"], expected) - 6  # the order matters
    # 4 views of an 8-view orbit: every other one, still a whole turn.
    half = next(iter(OrbitDataset([str(p) for p in paths], ClipSpec(4, 8.0, 32, 32), random_crop=False)))
    full = next(i for i in items if i["key"] == half["key"])
    torch.testing.assert_close(half["video"], full["video"][::2])


def test_the_orbit_loader_refuses_clips_without_elevation_or_uneven_views(tmp_path):
    shapes, _ = write_shapes_shards(tmp_path / "shapes", shards=1, clips_per_shard=1, num_frames=8)
    with pytest.raises(ValueError, match="no camera elevation"):
        next(iter(OrbitDataset([str(p) for p in shapes], ClipSpec(8, 8.0, 32, 32))))
    orbits, _ = write_orbit_shards(tmp_path / "orbits", shards=1, orbits_per_shard=1, num_views=8)
    with pytest.raises(ValueError, match="8 views do not subsample evenly to 3"):
        next(iter(OrbitDataset([str(p) for p in orbits], ClipSpec(3, 8.0, 32, 32))))


def test_the_config_ties_multiview_to_orbits_and_image_conditioning():
    assert CONFIG.stage == "multiview" and CONFIG.data == "orbits" and CONFIG.task.conditioning == "image"
    with pytest.raises(ValueError, match="multi-view trains on orbits"):
        replace(CONFIG, data="clips")
    with pytest.raises(ValueError, match="orbit data trains the multi-view finetune only"):
        StageConfig.from_dict({"stage": "i2v", "data": "orbits"})


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    video = VideoDiffusion.create(named_config("tiny", "video"))
    video_folder = video.save(tmp_path_factory.mktemp("video") / "final")
    return VideoDiffusion.create(named_config("tiny", "i2v"), init_from=video_folder).save(
        tmp_path_factory.mktemp("i2v") / "final"
    )


@pytest.fixture(scope="module")
def multiview(i2v_folder):
    return VideoDiffusion.create(CONFIG, init_from=i2v_folder)


def test_a_multiview_model_starts_as_the_i2v_model_and_is_told_the_elevation(multiview, i2v_folder):
    i2v = VideoDiffusion.load(i2v_folder)
    assert multiview.image is not None and multiview.text is None
    theirs = i2v.unet.state_dict()
    for name, ours in multiview.unet.state_dict().items():
        torch.testing.assert_close(ours, theirs[name], msg=name)
    fps, strength = torch.full((2,), 8.0), torch.full((2,), 0.02)
    ids = multiview.task.time_ids(fps, strength, {"elevation": torch.tensor([-10.0, 50.0])})
    torch.testing.assert_close(ids, torch.tensor([[8.0, -10.0, 0.02], [8.0, 50.0, 0.02]]))
    motion = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(
        i2v.task.time_ids(fps, strength, {"motion": motion}), added_time_ids(fps, motion, strength)
    )
    with pytest.raises(ValueError, match="conditioned on the camera elevation"):
        multiview.task.time_ids(fps, strength, {"motion": motion})
    # Training takes the elevation from the batch, in the motion bucket's slot.
    batch = {"video": torch.rand(2, 8, 3, 32, 32) * 2 - 1, "fps": fps, "elevation": torch.tensor([30.0, -10.0])}
    cond = multiview.task.condition(multiview, batch, torch.Generator().manual_seed(0))
    assert cond["added"][:, 1].tolist() == [30.0, -10.0]
    # The whole UNet trains (strategy full); the image encoder and the VAE stay frozen.
    assert CONFIG.strategy == "full"
    assert not any(p.requires_grad for p in [*multiview.image.parameters(), *multiview.codec.parameters()])


def test_orbit_is_seeded_and_refuses_models_that_are_not_multiview(multiview, i2v_folder):
    config = GenerationConfig(num_frames=4, height=32, width=32, steps=2)
    image = torch.rand(3, 32, 32) * 2 - 1
    a, b = orbit(multiview, image, 30.0, config), orbit(multiview, image, 30.0, config)
    assert a.shape == (4, 3, 32, 32)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="conditioned on the camera elevation"):
        animate(multiview, image, config)
    with pytest.raises(ValueError, match="orbits come from a multi-view model"):
        orbit(VideoDiffusion.load(i2v_folder), image, 30.0, config)
    truth = torch.zeros(4, 3, 32, 32)
    assert orbit_psnr(truth + 0.2, truth) == pytest.approx([10 * np.log10(4 / 0.04)] * 4)


@torch.no_grad()
def _novel_view_errors(model: VideoDiffusion, videos: torch.Tensor, elevations: torch.Tensor, sigma: float = 3.0):
    """MSE of the denoised latents of views 1.. (the ones the first view does not show) at a
    high noise level, conditioned on each orbit's first view and its elevation, and on the
    first view and the elevation 40 degrees off."""
    model.eval()
    x0 = model.codec.encode(videos)
    n = len(videos)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    cond = model.image_condition(videos[:, 0], torch.full((n,), 0.02), torch.Generator())
    wrong = torch.where(elevations > 20, elevations - 40, elevations + 40)
    errors = []
    for elevation in (elevations, wrong):
        ids = model.task.time_ids(
            torch.full((n,), 8.0), torch.full((n,), 0.02), {"motion": torch.ones(n), "elevation": elevation}
        )
        denoised = model.denoiser(noisy, torch.full((n,), sigma), **cond, added=ids)
        errors.append(float((denoised[:, 1:] - x0[:, 1:]).pow(2).mean()))
    return errors[0], errors[1]


def test_a_short_finetune_predicts_the_novel_views_from_the_first_view_and_starts_reading_the_elevation(tmp_path):
    paths, _ = write_orbit_shards(tmp_path / "orbits", shards=2, orbits_per_shard=8, num_views=8, size=32)
    shards = [str(p) for p in paths]
    spec = ClipSpec(num_frames=2, fps=8.0, height=32, width=32)  # the first view and the opposite one
    items = list(OrbitDataset(shards, spec, random_crop=False, epochs=1))
    videos, elevations = torch.stack([i["video"] for i in items]), torch.stack([i["elevation"] for i in items])
    vae = str(_deterministic_vae(tmp_path / "vae", videos.flatten(0, 1)))
    video = VideoDiffusion.create(replace(named_config("tiny", "video"), vae=vae)).save(tmp_path / "video")
    i2v = VideoDiffusion.create(replace(named_config("tiny", "i2v"), vae=vae), init_from=video)
    config = replace(
        CONFIG,
        clip=spec,
        vae=vae,
        cond_dropout=0.0,
        batch_size=4,
        max_steps=STEPS,
        checkpoint_every=STEPS,
        optim=replace(CONFIG.optim, lr=5e-3, warmup_steps=2),
    )
    base, _ = _novel_view_errors(i2v, videos, elevations)
    i2v_folder = i2v.save(tmp_path / "i2v")
    true, wrong = _novel_view_errors(VideoDiffusion.create(config, init_from=i2v_folder), videos, elevations)
    assert true == wrong  # the micro-conditioning path of an inflated UNet starts at zero: elevation is ignored
    finetuned = train(config, shards, tmp_path / "work", init_from=i2v_folder).model
    true, wrong = _novel_view_errors(finetuned, videos, elevations)
    assert true < 0.8 * base, (true, base)
    # The elevation now reaches the prediction. Which one is better is not settled this early (one run
    # measured true 0.201315 vs wrong 0.201306): the evidence script needs far longer runs for that.
    assert abs(true - wrong) > 1e-6 * true, (true, wrong)


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_multiview_registers_a_model_whose_pyfunc_orbits_an_image(
    stack, prefix, i2v_folder, tmp_path, request
):
    data = f"{prefix}/orbits"
    result = _vdm("data", "orbits", "--output", data, "--shards", "2", "--orbits-per-shard", "2")
    assert result.returncode == 0 and "wrote 2 shards of 2 orbits" in result.stdout, result.stderr[-3000:]
    name = f"vdm-test-{request.node.name[:40]}"
    out = f"{prefix}/multiview"
    result = _vdm(
        "finetune", "multiview", "--data", data, "--output", out, "--init-from", str(i2v_folder),
        "--max-steps", "2", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm finetune multiview: done at step 2" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout

    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert run.data.params["stage"] == "multiview" and run.data.params["init_from"] == str(i2v_folder)
    assert run.info.experiment_id == mlflow.get_experiment_by_name("vdm-finetune-multiview").experiment_id
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["vdm.kind"] == "multiview" and tags["vdm.data"] == data
    assert tags["vdm.training_run"] == run.info.run_id and tags["vdm.final"] == f"{out}/final"

    png = io.BytesIO()
    Image.fromarray(render_view(CUBE, 30.0, 0.0, 48)).save(png, format="PNG")
    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    inputs = {c["name"]: c for c in model.metadata.get_input_schema().to_dict()}
    assert inputs["elevation"]["type"] == "double" and inputs["elevation"]["required"]  # the view's, no default
    assert inputs["image"]["type"] == "binary"
    videos = model.predict(
        pd.DataFrame({"image": [png.getvalue()], "elevation": [30.0]}), params={"num_frames": 4, "steps": 2}
    )
    with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)

    # Clips without a camera elevation are refused with the reason, not trained on.
    write_shapes_shards(tmp_path / "shapes", shards=1, clips_per_shard=2, num_frames=8)
    result = _vdm(
        "finetune", "multiview", "--data", str(tmp_path / "shapes"), "--output", f"{prefix}/bad",
        "--init-from", str(i2v_folder),
    )  # fmt: skip
    assert result.returncode != 0 and "is not an orbit: its metadata has no camera elevation" in result.stderr
