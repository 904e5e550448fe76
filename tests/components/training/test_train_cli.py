"""`vdm train` against the real local stack: shards read from S3, checkpoints published
there, a resumed run picking up the newest complete checkpoint, MLflow tracking."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import pytest
import torch
from PIL import Image

from components.sample_data.shards import write_shapes_shards
from components.training.run import LOSS_CURVE_SIZE
from model.stages import NAMED_CONFIGS, named_config
from model.train import train


@pytest.fixture(scope="module")
def trained_final(tmp_path_factory):
    from dataclasses import replace

    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=2)
    work = tmp_path_factory.mktemp("train")
    return train(replace(named_config("tiny", "video"), max_steps=1), [str(p) for p in paths], work).final


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_train_from_s3_with_checkpoints_and_resume(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=3)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    out = f"{prefix}/stage1"
    first = _vdm("train", "--stage", "image", "--data", f"{prefix}/data", "--output", out, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert store.exists(f"{out}/final/unet/config.json")
    # Registered only when asked (--register-as): nothing in the registry under the old default name.
    assert "registered" not in first.stdout
    assert not mlflow.MlflowClient().search_registered_models("name = 'vdm-image-tiny'")
    published = {o.uri.key.split("/checkpoints/")[1].split("/")[0] for o in store.list(f"{out}/checkpoints/")}
    assert published == {"step-00000002"}

    resumed = _vdm(
        "train", "--stage", "image", "--data", f"{prefix}/data", "--output", out, "--max-steps", "4", "--resume",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-00000002" in resumed.stdout
    assert "done at step 4" in resumed.stdout and "registered" not in resumed.stdout

    # A config from the object store (no image rebuild for a new one): Stage II at a learning rate of its own.
    config = (NAMED_CONFIGS / "tiny-video.yaml").read_text().replace("lr: 0.0005", "lr: 0.0003")
    store.put_bytes(f"{prefix}/configs/my-video.yaml", config.encode())
    video = _vdm(
        "train", "--stage", "video", "--config", f"{prefix}/configs/my-video.yaml", "--data", f"{prefix}/data",
        "--output", f"{prefix}/stage2", "--init-from", f"{out}/final", "--max-steps", "2",
        "--register-as", "vdm-test-cli",
    )  # fmt: skip
    assert video.returncode == 0, video.stderr[-3000:]
    assert "registered  models:/vdm-test-cli/1 (alias candidate)" in video.stdout
    run_id = re.search(r"/runs/([0-9a-f]{32})", video.stdout).group(1)
    run = mlflow.get_run(run_id)
    assert run.data.params["stage"] == "video" and run.data.params["init_from"] == f"{out}/final"
    assert run.data.params["optim.lr"] == "0.0003"
    # The tiny towers and VAE are random: the run and the version say so.
    assert run.data.tags["vdm.random_weights"] == "true" and run.data.tags["vdm.random_parts"] == "text,vae"
    version_tags = mlflow.MlflowClient().get_model_version("vdm-test-cli", "1").tags
    assert version_tags["vdm.random_weights"] == "true" and version_tags["vdm.random_parts"] == "text,vae"
    assert "loss" in run.data.metrics and run.data.tags["vdm.outputs"] == f"{prefix}/stage2/final"
    # samples of the config's prompts at the end of the run, as mp4s
    assert [a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="samples")] == [
        "samples/step-00000002"
    ]
    # The run page's Datasets names the data; the validation loss (held-out clips, fixed noise) falls.
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{prefix}/data"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == [0, 2] and history[1].value < history[0].value
    # Pictures MLflow shows inline: a frame grid per sampling step (one prompt, 8 frames of 32 px at 128) and
    # the loss curve.
    frames = Image.open(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/samples/step-00000002/frames.png"))
    curve = Image.open(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/loss_curve.png"))
    assert (frames.format, frames.size) == ("PNG", (8 * 128, 128)) and frames.getextrema() != ((0, 0),) * 3
    assert (curve.format, curve.size) == ("PNG", LOSS_CURVE_SIZE)
    # Progress on stderr, not a terminal here: a line per log step with the rate and the time left.
    assert "step 0/2  val_loss" in video.stderr
    assert re.search(r"step 2/2  loss [\d.]+ .* [\d.]+ steps/s  eta 0:00:00", video.stderr), video.stderr[-2000:]

    sampled = _vdm(
        "sample", "--model", "models:/vdm-test-cli@candidate", "--prompt", "a", "--output", str(tmp_path / "c.mp4")
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert "8 frames at 8 fps, 32x32" in sampled.stdout


@pytest.mark.parametrize("size", ["small", "svd"])
def test_a_real_size_config_without_its_weights_imported_is_one_clear_error(stack, store, prefix, tmp_path, size):
    write_shapes_shards(tmp_path / "shards", shards=1, clips_per_shard=1)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    result = _vdm("train", "--stage", "video", "--config", size, "--data", f"{prefix}/data", "--output", f"{prefix}/x")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(r"no weights named (sd21|open-clip-vit-h-14) in s3://", line) and "vdm weights import" in line
    assert not list(store.list(f"{prefix}/x/"))  # nothing published


def test_stage_one_from_imported_weights_has_no_random_part(stack, store, prefix, tmp_path):
    """Stage I started from an SD-layout folder (its UNet and VAE) and a text tower, both
    imported by name: a config that refuses random weights trains, and nothing says random."""
    from components.common.weights import import_weights
    from model.conditioning import LatentCodec
    from model.networks import CONFIGS, image_unet
    from model.openclip import TEXT_MODELS, build, register_tiny_models

    register_tiny_models(".vdm/cache/models")
    run = prefix[-8:]  # the prefix's random part: names of this test's own
    sd = tmp_path / "sd"
    image_unet(CONFIGS["tiny"]).save_pretrained(sd / "unet")
    LatentCodec.tiny().vae.save_pretrained(sd / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (sd / "model_index.json").write_text(json.dumps(index | {"vae": ["diffusers", "AutoencoderKL"]}))
    import_weights(f"sd-{run}", sd, store)
    torch.save(build(TEXT_MODELS["tiny"], None).state_dict(), tmp_path / "clip.pt")
    import_weights(f"clip-{run}", tmp_path / "clip.pt", store, kind="open_clip", architecture=TEXT_MODELS["tiny"])
    config = (NAMED_CONFIGS / "tiny-image.yaml").read_text().replace("allow_random_weights: true", "")
    store.put_bytes(f"{prefix}/configs/image.yaml", (config + f"text_weights: weights:clip-{run}\n").encode())
    write_shapes_shards(tmp_path / "shards", shards=1, clips_per_shard=2)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")

    result = _vdm(
        "train", "--stage", "image", "--config", f"{prefix}/configs/image.yaml", "--data", f"{prefix}/data",
        "--output", f"{prefix}/stage1", "--init-from", f"weights:sd-{run}", "--max-steps", "1",
        "--register-as", f"vdm-test-weights-{run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tracked = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert tracked.data.params["init_from"] == f"weights:sd-{run}"
    assert tracked.data.params["text_weights"] == f"weights:clip-{run}" and tracked.data.params["vae"] == "null"
    assert "vdm.random_weights" not in tracked.data.tags
    assert "vdm.random_weights" not in mlflow.MlflowClient().get_model_version(f"vdm-test-weights-{run}", "1").tags
    final = json.loads(store.get_bytes(f"{prefix}/stage1/final/stage.json"))
    assert "random_weights" not in final and final["allow_random_weights"] is False


def test_train_vae_publishes_a_diffusers_vae_that_a_stage_uses(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    trained = _vdm("train-vae", "--data", f"{prefix}/data", "--output", f"{prefix}/vae", "--max-steps", "3")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", trained.stdout).group(1))
    assert run.data.metrics["reconstruction_l1"] > 0 and run.data.tags["vdm.outputs"] == f"{prefix}/vae"

    stage = _vdm(
        "train",
        "--stage",
        "image",
        "--data",
        f"{prefix}/data",
        "--output",
        f"{prefix}/s1",
        "--vae",
        f"{prefix}/vae",
        "--max-steps",
        "1",
    )
    assert stage.returncode == 0, stage.stderr[-3000:]
    store.download_folder(f"{prefix}/s1/final", tmp_path / "final")
    published = store.get_bytes(f"{prefix}/vae/diffusion_pytorch_model.safetensors")
    assert (tmp_path / "final" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == published


def test_cache_latents_then_train_on_them(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    args = ("--stage", "video", "--data")
    cached = _vdm("cache-latents", *args, f"{prefix}/data", "--output", f"{prefix}/latents")
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "1 shards" in cached.stdout and store.exists(f"{prefix}/latents/latents-000000.tar")
    trained = _vdm(
        "train", *args, f"{prefix}/latents", "--data-format", "latents", "--output", f"{prefix}/s2", "--max-steps", "2"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done at step 2" in trained.stdout


def test_sample_writes_a_playable_video(trained_final, tmp_path):
    import av

    out = tmp_path / "clip.mp4"
    result = _vdm(
        "sample",
        "--model",
        str(trained_final),
        "--prompt",
        "a disc",
        "--output",
        str(out),
        "--frames",
        "6",
        "--fps",
        "12",
        "--sample-steps",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == 12.0
        assert sum(1 for _ in container.decode(stream)) == 6


def test_eval_of_a_video_model_logs_its_motion_figures_and_samples(stack, trained_final, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    result = _vdm(
        "eval",
        "--model",
        str(trained_final),
        "--data",
        str(tmp_path / "shards"),
        "--clips",
        "2",
        "--sample-steps",
        "2",
        "--random-networks",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert "warning: random-weight evaluation networks: aesthetic, clip, i3d" in result.stderr
    details = report["details"]
    assert report["kind"] == "video" and report["metric"] == "motion_speed_error" and report["model_version"] is None
    assert details["data"]["straightness"] > 0.9 and "speed_px_per_frame" in details["generated"]
    speed = details["generated"]["speed_px_per_frame"] / details["data"]["speed_px_per_frame"]
    assert report["metrics"]["motion_speed_error"] == pytest.approx(abs(speed - 1))
    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", report["mlflow_run"]).group(1))
    assert run.data.metrics["data_straightness"] == pytest.approx(details["data"]["straightness"])
    assert run.data.metrics["motion_speed_error"] == pytest.approx(report["metrics"]["motion_speed_error"])
    samples = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="samples")
    assert len(samples) == 2
