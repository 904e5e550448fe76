"""`vdm finetune spatial-hq` against the real local stack: a video model folder finetuned
on an image set read from S3; the published model keeps every temporal weight of the
model it started from, and is registered as a text-to-video version whose lineage names
the image set and whose pyfunc still generates video."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import av
import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from components.sample_data.palette import write_palette_image_shards
from model.networks import is_temporal
from model.stages import VideoDiffusion, named_config


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_spatial_hq_keeps_the_temporal_layers_and_registers_with_the_image_set(
    stack, store, prefix, tmp_path, request
):
    write_palette_image_shards(tmp_path / "images", shards=2, images_per_shard=4)
    images = f"{prefix}/images"
    store.publish_folder(tmp_path / "images", images)
    video = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    name = f"vdm-test-{request.node.name[:40]}"
    out = f"{prefix}/spatial-hq"
    result = _vdm(
        "finetune", "spatial-hq", "--data", images, "--output", out, "--init-from", str(video),
        "--max-steps", "2", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm finetune spatial-hq: done at step 2" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout
    assert store.exists(f"{out}/checkpoints/step-00000002/state.json")

    store.download_folder(f"{out}/final", tmp_path / "final")
    before = dict(VideoDiffusion.load(video).unet.named_parameters())
    after = VideoDiffusion.load(tmp_path / "final")
    assert after.config.stage == "spatial-hq" and after.config.strategy == "spatial"
    for key, param in after.unet.named_parameters():
        assert torch.equal(param, before[key]) == is_temporal(key), key  # temporal kept, spatial trained

    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert run.info.experiment_id == mlflow.get_experiment_by_name("vdm-finetune-spatial-hq").experiment_id
    assert run.data.params["init_from"] == str(video) and run.data.params["strategy"] == "spatial"
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["vdm.image_set"] == images and tags["vdm.data"] == images
    assert tags["vdm.training_run"] == run.info.run_id and tags["vdm.kind"] == "spatial-hq"

    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    videos = model.predict(pd.DataFrame({"prompt": ["a disc"]}), params={"num_frames": 3, "steps": 1})
    with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3)  # video at the model's size
