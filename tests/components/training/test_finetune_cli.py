"""`vdm finetune i2v` against the real local stack: an SVD-format folder (imported weights) finetuned on
shards read from S3, the result published in our format and in
StableVideoDiffusionPipeline's, registered as an image model whose pyfunc animates
PNG bytes."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import av
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from PIL import Image
from tiny_svd import write_tiny_svd_folder

from components.common.weights import import_weights
from components.sample_data.shards import write_shapes_shards


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_i2v_from_an_svd_folder_registers_an_image_model(stack, store, prefix, tmp_path, request):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    # An SVD-format folder imported once by name, as the public SVD weights are (`vdm weights import`).
    svd = f"weights:svd-{prefix[-8:]}"
    import_weights(svd.removeprefix("weights:"), write_tiny_svd_folder(tmp_path / "svd"), store)
    name = f"vdm-test-{request.node.name[:40]}"
    out = f"{prefix}/i2v"
    result = _vdm(
        "finetune", "i2v", "--data", f"{prefix}/data", "--output", out, "--init-from", svd,
        "--max-steps", "2", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm finetune i2v: done at step 2" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout
    assert store.exists(f"{out}/final/stage.json") and store.exists(f"{out}/checkpoints/step-00000002/state.json")
    assert store.exists(f"{out}/svd/model_index.json")  # StableVideoDiffusionPipeline's format

    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert (
        run.data.params["init_from"] == svd
        and run.data.params["stage"] == "i2v"
        and run.data.params["noise_aug_mean"] == "-3.0"
    )
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["vdm.kind"] == "i2v" and tags["vdm.data"] == f"{prefix}/data"
    assert tags["vdm.training_run"] == run.info.run_id and tags["vdm.svd_format"] == f"{out}/svd"

    png = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(png, format="PNG")
    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    videos = model.predict(pd.DataFrame({"image": [png.getvalue()]}), params={"num_frames": 4, "steps": 2})
    with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)  # the model's size: resized and cropped
