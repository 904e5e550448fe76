"""A trained pipeline registered in the real local MLflow: pyfunc model with the folder
as artifact and an input example, `candidate` alias, lineage tags, a description; loaded
back by URI and sampled; evaluated, promoted and rolled back through the CLI."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings
from dataclasses import replace

import av
import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model

from components.common.tracking import tracked_run
from components.registry.pipeline_model import (
    download_pipeline,
    input_example,
    inputs_from_row,
    register_pipeline,
    signature_of,
)
from components.registry.promotion import CANDIDATE
from components.sample_data.shards import write_shapes_shards
from model.stages import VideoDiffusion, named_config
from model.tasks import KINDS
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


def test_registered_versions_carry_lineage_and_the_candidate_alias(settings, final, request, caplog):
    name = f"vdm-test-{request.node.name[:40]}"
    with (
        tracked_run("vdm-test-registry", config={"stage": "video"}, inputs=["s3://vdm/data"], settings=settings) as run,
        warnings.catch_warnings(record=True) as warned,
        caplog.at_level(logging.WARNING, logger="mlflow"),
    ):
        warnings.simplefilter("always")
        first = register_pipeline(final, name, {"vdm.data": "s3://vdm/data"})
        second = register_pipeline(final, name, {"vdm.data": "s3://vdm/data"})
    # MLflow warns of a missing input example, and of one that fails to serve (it samples it once).
    assert not [w for w in warned if "input example" in str(w.message).lower()]
    assert not [r for r in caplog.records if "input example" in r.getMessage().lower()]
    client = MlflowClient()
    assert (first.version, second.version) == ("1", "2")
    assert client.get_model_version_by_alias(name, CANDIDATE).version == "2"  # the alias moved to the newest
    version = client.get_model_version(name, "2")
    tags = version.tags
    assert tags["vdm.data"] == "s3://vdm/data" and tags["vdm.training_run"] == run.info.run_id
    assert tags["vdm.git_commit"] == run.data.tags["vdm.git_commit"] and "vdm.config_hash" in tags
    assert version.description.startswith("**video** model")
    assert "**Data:** `s3://vdm/data`" in version.description and "not evaluated yet" in version.description
    example = Model.load(f"models:/{name}/2").load_input_example()
    assert list(example.columns) == ["prompt"] and example["prompt"][0] == "a red disc moving to the right"


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
        "--clips", "1", "--sample-steps", "2", "--random-networks",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    tags = MlflowClient().get_model_version(name, "1").tags
    assert report["model_version"] == f"{name}/1" and report["kind"] == tags["vdm.kind"] == "video"
    assert report["metric"] == "motion_speed_error" and report["direction"] == "minimize"
    assert float(tags["vdm.eval.motion_speed_error"]) == pytest.approx(report["metrics"]["motion_speed_error"])
    # The figures are metrics of the evaluation run, linked to the version's logged model and its description.
    version = MlflowClient().get_model_version(name, "1")
    eval_run = MlflowClient().get_run(tags["vdm.eval_run"])
    assert eval_run.data.metrics["motion_speed_error"] == pytest.approx(report["metrics"]["motion_speed_error"])
    logged_model = MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key: (m.value, m.run_id) for m in logged_model.metrics}["motion_speed_error"] == (
        pytest.approx(report["metrics"]["motion_speed_error"]),
        eval_run.info.run_id,
    )
    assert tags["vdm.eval_run_url"] == report["mlflow_run"] and f"]({report['mlflow_run']})" in version.description

    # A tiny random-weight model: the gate stores and uses the demo policy (its kind's motion figure).
    promoted = _vdm("registry", "promote", name)
    assert promoted.returncode == 0 and f"promoted {name} v1 to champion" in promoted.stdout
    assert "**Gate:** promoted to champion" in MlflowClient().get_model_version(name, "1").description
    assert "motion_speed_error=" in promoted.stdout and re.search(r"ok\s+primary\s+motion_speed_error", promoted.stdout)
    # The evaluation ran random networks; the demo policy allows them, and says it checked.
    assert re.search(r"ok\s+networks\s+", promoted.stdout)
    policy = _vdm("registry", "policy", "show", name).stdout
    assert f"# {name} gate policy v1, set by" in policy and "(demo default for video (v1 has random weights))" in policy
    listed = _vdm("registry", "list", name).stdout.splitlines()
    assert listed[0].startswith(f"{name}: gate policy v1")
    assert listed[1].split()[:2] == ["v1", "candidate,champion"] and "motion_speed_error=" in listed[1]
    again = _vdm("registry", "promote", name)
    assert again.returncode == 1 and "already is the champion" in again.stderr
    rolled = _vdm("registry", "rollback", name)
    assert rolled.returncode == 1 and "nothing to roll back to" in rolled.stderr


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kinds_input_example_is_a_valid_request_of_its_kind(kind):
    """What MLflow checks when it logs the example, and what `predict` decodes it into."""
    from mlflow.models.utils import _Example
    from mlflow.pyfunc import _validate_prediction_input

    task = KINDS[kind]
    frame, params = input_example(task)
    example = _Example((frame, params))
    signature = signature_of(task)
    _validate_prediction_input(example.inference_data, example.inference_params, signature.inputs, signature.params)
    inputs = inputs_from_row(task, frame.to_dict("records")[0])  # media decoded, required fields present
    for name in ("image", "frames"):
        if hasattr(inputs, name):
            assert getattr(inputs, name).shape[-3:] == (3, 32, 32)
    assert params == {"steps": 25, "seed": 0}
