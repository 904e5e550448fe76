"""Tracking helpers against the real MLflow server, artifacts landing in the object store."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import pytest

from components.common.tracking import (
    TAG_CONFIG_HASH,
    TAG_GIT_COMMIT,
    TAG_INPUTS,
    artifact_object_uri,
    config_hash,
    flatten,
    run_url,
    tracked_run,
)


def test_config_hash_ignores_key_order_and_sees_values():
    a = {"stage": {"lr": 1e-4, "steps": 10}, "name": "s2"}
    b = {"name": "s2", "stage": {"steps": 10, "lr": 1e-4}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "name": "s3"})


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "x"}


def test_run_records_lineage_params_and_artifacts_in_the_object_store(settings, store, tmp_path, monkeypatch):
    monkeypatch.delenv("VDM_GIT_COMMIT", raising=False)
    config = {"stage": "II", "optim": {"lr": 0.0001, "warmup": 100}}
    inputs = ["s3://vdm/shards/train-000.tar", "s3://vdm/shards/train-001.tar"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"clips": 42}))

    with tracked_run("test-tracking", run_name="lineage", config=config, inputs=inputs, settings=settings) as run:
        mlflow.log_artifact(str(report), "reports")
        mlflow.log_metric("loss", 0.5)

    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    tags = got.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags[TAG_GIT_COMMIT] == (head or "unknown")
    assert tags[TAG_CONFIG_HASH] == config_hash(config)
    assert json.loads(tags[TAG_INPUTS]) == inputs
    assert got.data.params == {"stage": "II", "optim.lr": "0.0001", "optim.warmup": "100"}
    assert got.data.metrics["loss"] == 0.5

    # The server proxied the artifact into the mlflow bucket of our object store.
    location = artifact_object_uri(run, "reports/report.json", settings)
    assert (
        location
        == f"s3://{settings.mlflow_bucket}/{run.info.experiment_id}/{run.info.run_id}/artifacts/reports/report.json"
    )
    assert json.loads(store.get_bytes(location)) == {"clips": 42}
    assert json.loads(store.get_bytes(artifact_object_uri(run, "config.json", settings))) == config
    # ...and clients read it back through the server.
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="reports/report.json", dst_path=str(tmp_path / "dl")
    )
    assert json.loads(Path(local).read_text()) == {"clips": 42}


def test_image_commit_wins_over_git(settings, monkeypatch):
    monkeypatch.setenv("VDM_GIT_COMMIT", "0123abcd")
    with tracked_run("test-tracking", settings=settings) as run:
        pass
    assert mlflow.get_run(run.info.run_id).data.tags[TAG_GIT_COMMIT] == "0123abcd"


def test_run_that_raises_ends_failed(settings):
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracked_run("test-tracking", run_name="fails", settings=settings) as run,
    ):
        raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_run_url_points_at_the_server(settings):
    with tracked_run("test-tracking", settings=settings) as run:
        pass
    url = run_url(run, settings)
    assert url == f"{settings.mlflow_tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    with urllib.request.urlopen(url.split("#")[0], timeout=10) as response:
        assert response.status == 200
