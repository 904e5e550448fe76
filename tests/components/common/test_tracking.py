"""Tracking helpers against the real MLflow server, artifacts landing in the object store."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from components.common.tracking import (
    EXPERIMENT_KIND,
    TAG_CONFIG_HASH,
    TAG_EXPERIMENT_KIND,
    TAG_GIT_COMMIT,
    TAG_INPUTS,
    across_broken_exchanges,
    artifact_object_uri,
    config_hash,
    flatten,
    log_curated_data,
    run_url,
    tracked_run,
)
from vdm.stack import basic_auth


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
    # The UI asks for the login (the stack's MLflow runs its basic-auth app) and opens with it.
    login = basic_auth(settings.mlflow_username, settings.mlflow_password.get_secret_value())
    with urllib.request.urlopen(urllib.request.Request(url.split("#")[0], headers=login), timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.split("#")[0], timeout=10)
    assert refused.value.code == 401


def test_experiments_open_on_the_runs_table_and_keep_a_kind_chosen_in_the_ui(settings):
    with tracked_run("test-tracking-kind", settings=settings) as run:
        pass
    client = mlflow.MlflowClient()
    assert client.get_experiment(run.info.experiment_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    client.set_experiment_tag(run.info.experiment_id, TAG_EXPERIMENT_KIND, "genai_development")
    with tracked_run("test-tracking-kind", settings=settings):
        pass
    assert client.get_experiment(run.info.experiment_id).tags[TAG_EXPERIMENT_KIND] == "genai_development"


def test_training_run_links_curated_shards_with_the_card_digest(settings, store, prefix, tmp_path):
    store.put_bytes(f"{prefix}/dataset_card.json", json.dumps({"digest": "0123456789abcdef", "clips": 3}).encode())
    local = tmp_path / "orbits"
    local.mkdir()
    with tracked_run("test-tracking", settings=settings) as run:
        log_curated_data(f"{prefix}/shards/", store)
        log_curated_data(str(local), store, context="evaluation")

    inputs = {i.dataset.name: i for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    curated = inputs[f"{prefix}/shards/"].dataset
    assert curated.digest == "0123456789abcdef"
    assert curated.source_type == "s3"
    assert json.loads(curated.source) == {"uri": f"{prefix}/shards/"}
    tags = {t.key: t.value for t in inputs[f"{prefix}/shards/"].tags}
    assert tags["mlflow.data.context"] == "training"
    # Data without a card (not curation output) still shows, with a digest MLflow derives.
    plain = inputs[str(local)]
    assert plain.dataset.source_type == "local" and json.loads(plain.dataset.source) == {"uri": str(local)}
    assert plain.dataset.digest and plain.dataset.digest != "0123456789abcdef"
    assert {t.key: t.value for t in plain.tags}["mlflow.data.context"] == "evaluation"


class CutOffOnce:
    """A TCP proxy on 127.0.0.1 in front of the MLflow server that answers the first request
    itself with the headers of a chunked 200 and half a chunk, then closes (as a server
    killed mid-answer does); every later connection goes through to the server."""

    def __init__(self, target: str):
        host, port = target.split("//")[1].split(":")
        self.target = (host, int(port.rstrip("/")))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.cut == 0:
                self.cut += 1
                client.recv(65536)
                client.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"
                )
                client.close()
                continue
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()


def test_logging_goes_on_across_an_answer_cut_off_midway(settings):
    with tracked_run("test-tracking", run_name="cut-off", settings=settings) as run:
        proxy = CutOffOnce(settings.mlflow_tracking_uri)
        mlflow.set_tracking_uri(proxy.uri)
        try:
            with pytest.raises(mlflow.exceptions.MlflowException, match="Connection broken"):
                mlflow.log_metrics({"loss": 1.0}, step=1)  # the client alone gives up on a cut-off answer
            proxy.cut = 0
            across_broken_exchanges(lambda: mlflow.log_metrics({"loss": 0.5}, step=2))
            assert proxy.cut == 1
            # an error the server answers with is not retried
            with pytest.raises(mlflow.exceptions.MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
                across_broken_exchanges(lambda: mlflow.get_run("0" * 32))
        finally:
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]
