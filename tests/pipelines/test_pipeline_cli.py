"""`vdm pipeline list` and `vdm pipeline params NAME` show what the Kubeflow UI's run form
shows, read from the compiled spec; the pipeline commands' expected failures (an unknown
pipeline or parameter, a host that is not a reachable KFP API, a refused request) are one
`error:` line. And the HTML reports and Model artifacts the steps write say what they should."""

from __future__ import annotations

import json
import re
import socket

import pytest
from click.testing import CliRunner
from kfp.dsl import Model
from kfp_stub import KfpStub

from components.registry.decision import decision_html
from components.registry.promotion import Check, Decision, Evaluated
from components.training.model_artifact import describe_model
from components.training.request import RunResult
from pipelines.kubeflow import PIPELINES
from vdm.cli import main

KNOWN = ", ".join(PIPELINES)


def vdm(*args: str):
    return CliRunner().invoke(main, list(args))


def test_pipeline_list_shows_each_pipeline_with_its_parameter_count_and_description():
    result = vdm("pipeline", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PARAMS", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == list(PIPELINES)
    for name, pipeline in PIPELINES.items():
        count, description = re.match(rf"{re.escape(name)}\s+(\d+)  (.*)$", rows[name]).groups()
        assert int(count) == len(pipeline.component_spec.inputs)
        assert description == pipeline.pipeline_spec.pipeline_info.description
    assert re.match(r"end-to-end\s+31  Curation -> Stage I/II/III", rows["end-to-end"])


def test_pipeline_params_shows_each_fields_type_default_and_description():
    result = vdm("pipeline", "params", "end-to-end")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("end-to-end: Curation -> Stage I/II/III")
    fields = dict(re.findall(r"^(\w+)  (\w+  .*)$", text, flags=re.M))
    assert len(fields) == len(PIPELINES["end-to-end"].component_spec.inputs) == 31
    assert fields["random_weights"] == "BOOLEAN  default false"
    assert fields["eval_clips"] == "NUMBER_INTEGER  default 256"  # an integer, not the spec's 256.0
    assert "min_improvement" not in fields  # the gate's margins are the model's policy (vdm registry policy)
    assert fields["gpus_per_node"] == "STRING  default 8"
    assert fields["vae"] == 'STRING  default ""'
    assert fields["input_uri"] == "STRING  default s3://vdm/samples/seed-0"
    # each description in full, under its field (wrapped)
    flat = " ".join(text.split())
    assert "image_steps NUMBER_INTEGER default 0 Stage I (image) training steps; 0: the config's max_steps." in flat


def test_an_unknown_pipeline_is_one_error_line_naming_the_known_ones():
    for args in (["params", "nope"], ["submit", "nope", "--host", "http://127.0.0.1:9"]):
        result = vdm("pipeline", *args)
        assert result.exit_code == 1
        assert result.stderr == f"error: unknown pipeline 'nope'; known: {KNOWN}\n"


def test_a_bad_parameter_is_refused_before_any_host_is_asked():
    result = vdm("pipeline", "submit", "curation", "--host", "http://127.0.0.1:9", "--param", "gpus=2")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: curation has no parameter 'gpus'; its parameters: input_uri, ")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_an_unreachable_or_refusing_host_is_one_error_line(command):
    cron = ["--cron", "0 0 3 * * *"] if command == "schedule" else []
    host = f"http://127.0.0.1:{_closed_port()}"
    result = vdm("pipeline", command, "curation", "--host", host, *cron)
    assert result.exit_code == 1
    assert re.fullmatch(rf"error: cannot reach the Kubeflow Pipelines API at {host} \(.*refused\); check --host\n",
                        result.stderr), result.stderr  # fmt: skip
    for status, hint in ((403, "check your credentials"), (404, "is --host the Kubeflow Pipelines API?")):
        stub = KfpStub(refuse=status)
        try:
            result = vdm("pipeline", command, "curation", "--host", stub.host, *cron)
        finally:
            stub.close()
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: the Kubeflow Pipelines API at {stub.host} answered {status} ")
        assert result.stderr.endswith(f"; {hint}\n") and result.stderr.count("\n") == 1
        assert not stub.posted("/apis/v2beta1/pipelines/upload")


def test_the_gate_report_shows_every_check_the_policy_and_both_evaluations():
    candidate = Evaluated("2", {"fvd": 120.0, "clip_score": 0.29, "clips": 256.0}, "r2", "http://mlflow/#/runs/r2",
                          "http://mlflow/#/runs/r2/artifacts/report.html", "abc", ())  # fmt: skip
    champion = Evaluated("1", {"fvd": 130.0, "clip_score": 0.3, "clips": 256.0}, "r1", "http://mlflow/#/runs/r1")
    checks = (
        Check("fvd", "primary", 120.0, 130.0, "better by more than 5 (minimize)", True),
        Check("clip_score", "guard", 0.29, 0.3, "not worse by more than 0.005 (maximize)", False),
    )
    decision = Decision(False, "guard clip_score 0.29 is worse than champion v1's 0.3", "2", "1", checks, candidate,
                        champion, "primary: {metric: fvd}  # <why>\n", 3)  # fmt: skip
    page = decision_html("vdm-t<2v>", decision)
    assert "vdm-t&lt;2v&gt;: version 2 not promoted" in page and "worse than champion v1&#x27;s 0.3" in page
    assert "<tr class=pass><td>pass</td><td>primary</td><td>fvd</td><td>120</td><td>130</td>" in page
    assert "<tr class=fail><td>FAIL</td><td>guard</td><td>clip_score</td><td>0.29</td><td>0.3</td>" in page
    assert "Gate policy (policy v3)" in page and "primary: {metric: fvd}  # &lt;why&gt;" in page
    assert "href='http://mlflow/#/runs/r2'" in page and "href='http://mlflow/#/runs/r1'" in page
    assert "href='http://mlflow/#/runs/r2/artifacts/report.html'" in page
    first = decision_html("m", Decision(True, "no champion yet", "1", None, (), candidate))
    assert "m: version 1 promoted to champion" in first and "<li>champion: none</li>" in first


def test_a_training_steps_model_artifact_points_at_the_model_and_its_version(tmp_path):
    model = Model(name="model", uri=str(tmp_path / "model"), metadata={})
    result = RunResult(steps=40, final="s3://vdm/runs/x/stage3/final", registered="models:/vdm-text-to-video/7",
                       mlflow_run="http://mlflow/#/runs/r", mlflow_run_id="r", losses=[0.5, 0.4])  # fmt: skip
    describe_model(model, result)
    assert model.metadata["uri"] == "s3://vdm/runs/x/stage3/final"
    assert (model.metadata["registered_name"], model.metadata["registered_version"]) == ("vdm-text-to-video", "7")
    assert model.metadata["registered"] == "models:/vdm-text-to-video/7" and model.metadata["steps"] == 40
    assert "losses" not in model.metadata and "resumed_from" not in model.metadata
    assert json.loads((tmp_path / "model").read_text()) == model.metadata
    unregistered = Model(name="model", uri=str(tmp_path / "stage1"), metadata={})
    describe_model(unregistered, RunResult(steps=3, final="s3://vdm/runs/x/stage1/final"))
    assert unregistered.metadata == {"steps": 3, "final": "s3://vdm/runs/x/stage1/final",
                                     "uri": "s3://vdm/runs/x/stage1/final"}  # fmt: skip
