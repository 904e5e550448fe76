"""`vdm finetune camera-lora` against the real local stack: a tiny video model gets a
`pan` adapter trained on the pan clips of shards read from S3, registered as a version
holding base + adapter; a second finetune from that version adds `zoom_in` as the next
version; its pyfunc samples with an adapter by name and refuses one it lacks."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import av
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from components.sample_data.shards import write_camera_shards
from model.stages import NAMED_CONFIGS, VideoDiffusion, named_config
from vdm.cli import main


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_camera_lora_registers_base_and_adapters_and_adds_a_class(stack, store, prefix, tmp_path, request):
    write_camera_shards(tmp_path / "shards", clips_per_label=1)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    base = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    name = f"vdm-test-{request.node.name[:40]}"
    # The tiny config with one clip per step and the end-of-run sample cut to two sampler steps.
    config = tmp_path / "camera-lora.yaml"
    tiny = yaml.safe_load((NAMED_CONFIGS / "tiny-camera-lora.yaml").read_text())
    config.write_text(yaml.safe_dump(tiny | {"batch_size": 1, "sample_steps": 2}))
    common = ("--config", str(config), "--data", f"{prefix}/data", "--max-steps", "1", "--register-as", name)

    args = ["finetune", "camera-lora", "--motion-class", "dolly", "--data", "x", "--output", "x", "--init-from", "x"]
    refused = CliRunner().invoke(main, args)  # click refuses it before anything runs: in-process is enough
    assert refused.exit_code == 2 and "'dolly' is not one of 'pan', 'static', 'zoom_in', 'zoom_out'" in refused.output

    result = _vdm(
        "finetune",
        "camera-lora",
        "--motion-class",
        "pan",
        "--output",
        f"{prefix}/pan",
        "--init-from",
        str(base),
        *common,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout
    assert store.exists(f"{prefix}/pan/final/adapters/pan/adapter_model.safetensors")
    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert run.data.params["motion_class"] == "pan" and run.data.params["strategy"] == "lora"
    assert run.info.experiment_id == mlflow.get_experiment_by_name("vdm-finetune-camera-lora").experiment_id

    result = _vdm(
        "finetune", "camera-lora", "--motion-class", "zoom_in", "--output", f"{prefix}/zoom_in",
        "--init-from", f"models:/{name}@candidate", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["vdm.adapters"] == "pan,zoom_in" and tags["vdm.data"] == f"{prefix}/data"
    assert MlflowClient().get_model_version(name, "1").tags["vdm.adapters"] == "pan"

    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")

    def frames(**params) -> list:
        videos = model.predict(pd.DataFrame({"prompt": [""]}), params={"num_frames": 4, "steps": 1} | params)
        with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]

    zoomed = frames(adapter="zoom_in")
    assert len(zoomed) == 4 and zoomed[0].shape == (32, 32, 3)
    # Strength 0 is the base model (its effect in proportion: tests/model/test_camera_lora.py).
    # The same frames, up to the mp4 encoding: a served video is encoded with x264's threads, whose
    # decisions (and so a few pixel values) vary from run to run.
    off, base = np.stack(frames(adapter="zoom_in", adapter_strength=0.0)), np.stack(frames(adapter=""))
    assert np.abs(off.astype(int) - base.astype(int)).mean() < 1.0
    with pytest.raises(Exception, match=r"no camera-motion adapter 'static'; it has \['pan', 'zoom_in'\]"):
        model.predict(pd.DataFrame({"prompt": [""]}), params={"num_frames": 4, "steps": 1, "adapter": "static"})
