"""Servers killed during work, on a private stack (the session's is left alone): a training run
whose S3 server is killed outright fails with a one-line error, leaves no checkpoint that a
resume would take half, and the resumed run finishes from the last whole checkpoint; an MLflow
server killed and restarted during a run costs the run nothing (the client retries), and the
run's metrics are all there. Serving killed during a generation: tests/serving/test_limits.py
(nothing is left running) and a restart serves again (tests/serving/test_service.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import stack_env

from components.common.objectstore import MANIFEST_NAME, ObjectStore
from components.common.settings import load_settings
from components.sample_data.shards import write_shapes_shards
from model.stages import NAMED_CONFIGS
from vdm.stack import Stack

STEPS, EVERY = 30, 5  # checkpoints at 5, 10, ...


@pytest.fixture
def private_stack(tmp_path, monkeypatch):
    for key, value in stack_env(tmp_path / "state").items():
        monkeypatch.setenv(key, value)
    stack = Stack(load_settings(), log=lambda _: None)
    stack.up()
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    yield stack
    stack.down()


def _kill_server(stack: Stack, name: str) -> None:
    """kill -9 a server's whole process group (as the OOM killer or a node failure would)."""
    (pid,) = [s.pid for s in stack.status() if s.name == name and s.pid]
    os.killpg(pid, signal.SIGKILL)


def _checkpoints(store: ObjectStore, output: str) -> dict[str, bool]:
    """Checkpoint folder -> whether its manifest (written last) is there."""
    folders: dict[str, bool] = {}
    for info in store.list(f"{output}/checkpoints/"):
        folder, _, name = info.uri.key.split("/checkpoints/")[1].partition("/")
        folders[folder] = folders.get(folder, False) or name == MANIFEST_NAME
    return folders


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _train(config: Path, data: str, output: str, *extra: str) -> subprocess.Popen:
    argv = ["train", "--stage", "image", "--config", str(config), "--data", data, "--output", output, *extra]
    # MLflow's client retries a refused connection (7 times over about 4 minutes by default; the test
    # suite's 2 quick retries are raised here to about a minute).
    env = os.environ | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vdm.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.slow
def test_training_through_an_s3_crash_and_an_mlflow_restart(private_stack, tmp_path):
    stack = private_stack
    store = stack.object_store()
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=3)
    data, output = "s3://vdm/faults/data", "s3://vdm/faults/run"
    store.publish_folder(tmp_path / "shards", data)
    config = tmp_path / "image.yaml"
    text = (NAMED_CONFIGS / "tiny-image.yaml").read_text()
    config.write_text(text.replace("checkpoint_every: 20", f"checkpoint_every: {EVERY}").replace("max_steps: 40", ""))

    # S3 killed once the first checkpoint is whole: the run fails at its next upload, in one line.
    run = _train(config, data, output, "--max-steps", str(STEPS))
    _wait_for(lambda: _checkpoints(store, output).get("step-00000005"), 240, "the first checkpoint")
    _kill_server(stack, "s3")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    stack.up()  # S3 back on its data
    published = _checkpoints(store, output)
    assert published["step-00000005"] is True
    whole = sorted(folder for folder, done in published.items() if done)
    assert not store.exists(f"{output}/final/{MANIFEST_NAME}")  # nothing final published

    # The resumed run starts from the newest whole checkpoint (never one cut off by the crash); MLflow
    # killed and restarted meanwhile: the run goes on (its client retries) and logs every step.
    resumed = _train(config, data, output, "--max-steps", str(STEPS), "--resume")
    _wait_for(lambda: len([d for d in _checkpoints(store, output).values() if d]) > len(whole), 240, "a new checkpoint")
    _kill_server(stack, "mlflow")
    time.sleep(3)
    stack.up()
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from {output}/checkpoints/{whole[-1]}" in stdout
    assert f"done at step {STEPS}" in stdout
    assert store.exists(f"{output}/final/{MANIFEST_NAME}")
    assert all(_checkpoints(store, output).values())  # every checkpoint the resumed run wrote is whole
    mlflow.set_tracking_uri(stack.endpoints()["MLFLOW_TRACKING_URI"])
    (run_id,) = set(re.findall(r"/runs/([0-9a-f]{32})", stdout))
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")]
    assert steps and max(steps) == STEPS
