"""`vdm pipeline submit|schedule` through kfp.Client against a recording stub of the
KFP REST API (no KFP API server can run here): first upload creates the pipeline,
the next one a new version; runs carry the typed parameters and the version."""

from __future__ import annotations

import json

import pytest
from kfp_stub import KfpStub

from pipelines.submit import connect, parse_params, schedule, submit


@pytest.fixture
def stub():
    server = KfpStub()
    yield server
    server.close()


def test_submit_uploads_then_versions_and_runs_with_the_parameters(stub):
    client = connect(stub.host)
    first = submit(client, "curation", "vdm", parse_params(["videos_per_shard=2", "random_weights=true"], "curation"))
    second = submit(client, "curation", "vdm", {"input_uri": "s3://vdm/raw"})
    assert first["pipeline_id"] == second["pipeline_id"] == "pipeline-1"
    assert (first["version_id"], second["version_id"]) == ("pipeline-1-v1", "pipeline-1-v2")

    uploads = stub.posted("/apis/v2beta1/pipelines/upload")
    assert len(uploads) == 1 and uploads[0]["query"]["name"] == "curation"
    assert b"pipelineInfo" in uploads[0]["body"] and b"input-shards" in uploads[0]["body"]  # the compiled YAML
    assert len(stub.posted("/apis/v2beta1/pipelines/upload_version")) == 1
    assert len(stub.posted("/apis/v2beta1/experiments")) == 1  # created once, then found

    runs = [json.loads(r["body"]) for r in stub.posted("/apis/v2beta1/runs")]
    assert runs[0]["runtime_config"]["parameters"] == {"videos_per_shard": 2, "random_weights": True}
    assert runs[1]["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "pipeline-1-v2",
    }
    assert runs[0]["experiment_id"] == "experiment-1"


def test_schedule_creates_a_recurring_run(stub):
    result = schedule(connect(stub.host), "end-to-end", "nightly", "0 0 3 * * *", {"image_steps": 10})
    assert result["recurring_run_id"].startswith("recurring-")
    job = json.loads(stub.posted("/apis/v2beta1/recurringruns")[0]["body"])
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *" and int(job["max_concurrency"]) == 1
    assert job["runtime_config"]["parameters"] == {"image_steps": 10}


def test_unknown_pipeline_and_bad_parameters_are_clear_errors(stub):
    with pytest.raises(ValueError, match="unknown pipeline 'nope'; known: curation, pretraining, "):
        submit(connect(stub.host), "nope", "vdm", {})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["oops"], "curation")
    with pytest.raises(ValueError, match="curation has no parameter 'gpus'; its parameters: input_uri, "):
        parse_params(["gpus=2"], "curation")
    with pytest.raises(ValueError, match="--param nodes: 'two' is not a valid Integer"):
        parse_params(["nodes=two"], "pretraining")


def test_parameters_take_the_types_the_run_form_declares():
    # KFP resolves resources into pods from strings: a GPU count given as 4 stays "4".
    assert parse_params(["gpus_per_node=4", "nodes=2", "config=svd", "image_steps=10"], "pretraining") == {
        "gpus_per_node": "4",
        "nodes": 2,
        "config": "svd",
        "image_steps": 10,
    }
    assert parse_params(["random_weights=TRUE", "videos_per_shard=3"], "curation") == {
        "random_weights": True,
        "videos_per_shard": 3,
    }
    assert parse_params(["random_networks=true", "prompts=16"], "evaluate-and-promote") == {
        "random_networks": True,
        "prompts": 16,
    }
