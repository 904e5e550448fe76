"""`vdm finetune temporal-decoder` against the real local stack: a tiny text-to-video
model folder gets a temporal VAE decoder trained on shards read from S3; the result
is the same folder with the new `vae/`, registered as a candidate version whose pyfunc
loads and generates (decoding with the temporal decoder)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from components.sample_data.shards import write_shapes_shards
from model.stages import VideoDiffusion, named_config


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_temporal_decoder_registers_the_model_with_its_new_decoder(stack, store, prefix, tmp_path, request):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2, height=32, width=32, max_speed=0.5)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    init = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "model")
    name = f"vdm-test-{request.node.name[:40]}"
    out = f"{prefix}/temporal-decoder"
    result = _vdm(
        "finetune", "temporal-decoder", "--data", f"{prefix}/data", "--output", out, "--init-from", str(init),
        "--max-steps", "2", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm finetune temporal-decoder: done at step 2" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout
    assert store.exists(f"{out}/checkpoints/step-00000002/decoder.safetensors")
    final = Path(tmp_path / "final")
    store.download_folder(f"{out}/final", final)
    assert json.loads((final / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLTemporalDecoder"
    assert (final / "unet" / "config.json").read_text() == (init / "unet" / "config.json").read_text()

    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert run.info.experiment_id == mlflow.get_experiment_by_name("vdm-finetune-temporal-decoder").experiment_id
    assert run.data.params["init_from"] == str(init)
    assert {"before_flicker_noise_0.1", "after_flicker_noise_0.1"} <= set(run.data.metrics)
    history = MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 2] and all(m.value > 0 for m in history)  # the start and the end
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["vdm.kind"] == "video" and tags["vdm.data"] == f"{prefix}/data"
    assert tags["vdm.training_run"] == run.info.run_id and tags["vdm.final"] == f"{out}/final"

    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    videos = model.predict(pd.DataFrame({"prompt": ["a disc"]}), params={"num_frames": 4, "steps": 2})
    with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)


def test_finetuning_something_that_is_not_a_model_folder_is_a_clear_error(tmp_path):
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.training.entrypoint import run_request
    from components.training.request import TrainingRequest

    write_shapes_shards(tmp_path / "shards", shards=1, clips_per_shard=1, num_frames=8, height=32, width=32)
    (tmp_path / "empty").mkdir()
    settings = load_settings()
    request = TrainingRequest(
        "temporal-decoder", str(tmp_path / "shards"), "s3://vdm/x", init_from=str(tmp_path / "empty")
    )
    with pytest.raises(ValueError, match="not a model folder with stage.json and vae/"):
        run_request(request, ObjectStore.from_settings(settings), settings)
