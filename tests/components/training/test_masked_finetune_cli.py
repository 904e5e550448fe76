"""`vdm finetune interpolation|prediction` against the real local stack: a tiny video
model folder finetuned on shards read from S3, registered as a candidate whose tags say
which frames it is given and whose pyfunc takes an mp4 of them."""

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
from mlflow import MlflowClient

from components.common.media import video_bytes
from components.sample_data.shards import write_shapes_shards
from model.stages import NAMED_CONFIGS, VideoDiffusion, named_config


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def _frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


@pytest.mark.parametrize(("kind", "given", "expected"), [("interpolation", 3, 9), ("prediction", 2, 6)])
def test_a_masked_finetune_registers_a_model_that_takes_known_frames(
    stack, store, prefix, tmp_path, kind, given, expected
):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2, height=32, width=32)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    video = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    name = f"vdm-test-masked-{kind}"  # one model per kind: the session's stack is shared
    out = f"{prefix}/{kind}"
    # The tiny config on the shortest clips and a one-step end-of-run sample: the CLI is under test.
    config = yaml.safe_load((NAMED_CONFIGS / f"tiny-{kind}.yaml").read_text())
    frames = 5 if kind == "interpolation" else 4
    config |= {"clip": config["clip"] | {"num_frames": frames}, "batch_size": 1, "sample_steps": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = _vdm(
        "finetune", kind, "--config", str(tmp_path / "config.yaml"), "--data", f"{prefix}/data", "--output", out,
        "--init-from", str(video),
        "--max-steps", "1", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"vdm finetune {kind}: done at step 1" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout
    assert store.exists(f"{out}/final/stage.json") and store.exists(f"{out}/checkpoints/step-00000001/state.json")

    run = mlflow.get_run(re.search(r"/runs/([0-9a-f]{32})", result.stdout).group(1))
    assert run.data.params["stage"] == kind and run.data.params["init_from"] == str(video)
    assert run.info.experiment_id == mlflow.get_experiment_by_name(f"vdm-finetune-{kind}").experiment_id
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["vdm.kind"] == kind
    assert tags["vdm.data"] == f"{prefix}/data" and tags["vdm.training_run"] == run.info.run_id

    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    assert "frames" in model.metadata.get_input_schema().input_names()
    known = (np.random.default_rng(0).random((given, 40, 48, 3)) * 255).astype(np.uint8)
    row = {"frames": [video_bytes(known, 3.0)], "prompt": ["a disc"]}
    if kind == "prediction":
        row["video_frames"] = [6]  # windows of the model's clip (5 or 4 frames)
    videos = model.predict(pd.DataFrame(row), params={"steps": 1})
    frames = _frames(videos["video_mp4"][0])
    # Interpolation: 4T - 3 frames; prediction: `video_frames`, the context first. The model's size.
    assert len(frames) == expected and frames[0].shape == (32, 32, 3)

    # `vdm sample` takes what the kind takes: the known frames as an mp4 (a one-line error without them).
    (tmp_path / "known.mp4").write_bytes(video_bytes(known, 3.0))
    extra = ["--length", str(expected)] if kind == "prediction" else []
    sampled = _vdm(
        "sample", "--model", f"models:/{name}@candidate", "--video", str(tmp_path / "known.mp4"), *extra,
        "--sample-steps", "1", "--output", str(tmp_path / "sampled.mp4"),
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert len(_frames((tmp_path / "sampled.mp4").read_bytes())) == expected
    missing = _vdm("sample", "--model", f"models:/{name}@candidate", "--output", str(tmp_path / "x.mp4"))
    assert missing.returncode == 1 and missing.stderr.splitlines()[-1] == f"error: this {kind} model needs --video"
