"""A trained pipeline registered in the real local MLflow: pyfunc model with the folder
as artifact, `candidate` alias, lineage tags; loaded back by URI and sampled."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace

import av
import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from components.common.tracking import tracked_run
from components.registry.pipeline_model import download_pipeline, register_pipeline
from components.registry.promotion import CANDIDATE
from components.sample_data.shards import write_shapes_shards
from model.stages import VideoDiffusion, named_config
from model.train import train


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=2)
    config = replace(named_config("tiny", "video"), max_steps=1)
    return train(config, [str(p) for p in paths], tmp_path_factory.mktemp("train")).final


def _frames(mp4: bytes) -> tuple[int, float]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


def test_registered_versions_carry_lineage_and_the_candidate_alias(settings, final, request):
    name = f"vdm-test-{request.node.name[:40]}"
    with tracked_run(
        "vdm-test-registry", config={"stage": "video"}, inputs=["s3://vdm/data"], settings=settings
    ) as run:
        first = register_pipeline(final, name, {"vdm.data": "s3://vdm/data"})
        second = register_pipeline(final, name, {"vdm.data": "s3://vdm/data"})
    client = MlflowClient()
    assert (first.version, second.version) == ("1", "2")
    assert client.get_model_version_by_alias(name, CANDIDATE).version == "2"  # the alias moved to the newest
    tags = client.get_model_version(name, "2").tags
    assert tags["vdm.data"] == "s3://vdm/data" and tags["vdm.training_run"] == run.info.run_id
    assert tags["vdm.git_commit"] == run.data.tags["vdm.git_commit"] and "vdm.config_hash" in tags


def test_pyfunc_generates_decodable_videos_with_the_requested_frames(settings, final, request, tmp_path):
    name = f"vdm-test-{request.node.name[:40]}"
    with tracked_run("vdm-test-registry", settings=settings):
        register_pipeline(final, name, {})
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CANDIDATE}")
    out = model.predict(pd.DataFrame({"prompt": ["a disc", "two discs"]}), params={"num_frames": 4, "steps": 2})
    assert [_frames(v) for v in out["video_mp4"]] == [(4, 8.0), (4, 8.0)]

    folder = download_pipeline(f"models:/{name}@{CANDIDATE}", tmp_path)
    loaded, original = VideoDiffusion.load(folder), VideoDiffusion.load(final)
    for a, b in zip(loaded.unet.parameters(), original.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_evaluation_figures_land_on_the_version_and_drive_the_cli_gate(settings, final, request, tmp_path):
    name = f"vdm-test-{request.node.name[:40]}"
    with tracked_run("vdm-test-registry", settings=settings):
        register_pipeline(final, name, {})
    paths, _ = write_shapes_shards(tmp_path / "shapes", shards=1, clips_per_shard=2)
    evaluated = _vdm(
        "eval", "--model", f"models:/{name}@candidate", "--data", str(tmp_path / "shapes"),
        "--clips", "1", "--steps", "2",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    tags = MlflowClient().get_model_version(name, "1").tags
    assert report["model_version"] == f"{name}/1" and report["kind"] == tags["vdm.kind"] == "video"
    assert report["metric"] == "motion_speed_error" and report["direction"] == "minimize"
    assert float(tags["vdm.eval.motion_speed_error"]) == pytest.approx(report["metrics"]["motion_speed_error"])

    promoted = _vdm("registry", "promote", name)  # on the kind's metric
    assert promoted.returncode == 0 and f"promoted {name} v1 to champion" in promoted.stdout
    assert "motion_speed_error=" in promoted.stdout
    listed = _vdm("registry", "list", name)
    assert listed.stdout.split()[:2] == ["v1", "candidate,champion"] and "motion_speed_error=" in listed.stdout
    again = _vdm("registry", "promote", name)
    assert again.returncode == 1 and "already is the champion" in again.stderr
    rolled = _vdm("registry", "rollback", name)
    assert rolled.returncode == 1 and "nothing to roll back to" in rolled.stderr
