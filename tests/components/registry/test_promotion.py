"""The promotion gate against the real local MLflow registry: first champion, refusal
that moves no alias, promotion with its recorded decision, the versions' descriptions,
rollback (also after the alias was moved by hand), and the registry commands' one-line errors."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from components.registry.promotion import (
    CANDIDATE,
    CHAMPION,
    MOVED_OUTSIDE,
    PREVIOUS_CHAMPION,
    Gate,
    PromotionError,
    RegistryError,
    champion_history,
    list_versions,
    promote,
    record_evaluation,
    registered_version,
    rollback,
)
from vdm.cli import main


@pytest.fixture
def model(settings, request) -> str:
    name = f"vdm-test-{request.node.name[:40]}"
    MlflowClient().create_registered_model(name)
    return name


def new_candidate(name: str, metrics: dict[str, float] | None) -> str:
    client = MlflowClient()
    version = client.create_model_version(name, source="s3://vdm/models/x", tags={"vdm.data": "s3://vdm/data"})
    if metrics:
        record_evaluation(name, version.version, metrics)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return version.version


def aliases(name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_gate_promotes_refuses_and_rolls_back(model):
    gate = Gate(metric="motion_speed_error", direction="minimize", min_improvement=0.1)
    first = new_candidate(model, {"motion_speed_error": 0.5})
    decision = promote(model, gate, actor="alice")
    assert decision.promoted and "no champion yet" in decision.reason
    assert aliases(model) == {CANDIDATE: first, CHAMPION: first}

    second = new_candidate(model, {"motion_speed_error": 0.45})  # better, but not by more than 0.1
    tags_before = MlflowClient().get_model_version(model, second).tags
    refused = promote(model, gate, actor="alice")
    assert not refused.promoted and "not more than 0.1" in refused.reason
    assert aliases(model)[CHAMPION] == first
    refused_version = MlflowClient().get_model_version(model, second)
    assert refused_version.tags == tags_before  # no tag, no alias changed: only the description says why
    assert "**Gate:** not promoted: motion_speed_error 0.45 vs champion v1's 0.5" in refused_version.description

    third = new_candidate(model, {"motion_speed_error": 0.2})
    promoted = promote(model, gate, actor="bob")
    assert promoted.promoted and promoted.champion_value == 0.5 and promoted.candidate_value == 0.2
    assert aliases(model)[CHAMPION] == third
    tags = MlflowClient().get_model_version(model, third).tags
    assert tags["vdm.promotion.by"] == "bob" and tags[PREVIOUS_CHAMPION] == first
    assert tags["vdm.promotion.metric"] == "motion_speed_error" and "improves by 0.3" in tags["vdm.promotion.reason"]

    assert "**Gate:** promoted to champion by bob" in MlflowClient().get_model_version(model, third).description

    assert rollback(model, actor="carol") == (third, first)
    assert aliases(model)[CHAMPION] == first
    demoted = MlflowClient().get_model_version(model, third)
    assert demoted.tags["vdm.rolled_back_by"] == "carol" and "rolled back by carol" in demoted.description
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(model)

    rows = list_versions(model)
    assert [r["version"] for r in rows] == [third, second, first]
    assert rows[2]["aliases"] == [CHAMPION] and rows[0]["eval"] == {"motion_speed_error": 0.2}


def test_gate_needs_the_metric_and_respects_direction(model):
    new_candidate(model, None)
    missing = promote(model, Gate(metric="straightness", direction="maximize"))
    assert not missing.promoted and "has no straightness" in missing.reason and CHAMPION not in aliases(model)

    first = new_candidate(model, {"straightness": 0.90})
    assert promote(model, Gate(metric="straightness", direction="maximize")).promoted
    new_candidate(model, {"straightness": 0.80})  # lower is worse when maximizing
    assert not promote(model, Gate(metric="straightness", direction="maximize")).promoted
    assert aliases(model)[CHAMPION] == first


def test_promote_without_a_candidate_is_a_clear_error(model):
    with pytest.raises(PromotionError, match="no version with the alias 'candidate'"):
        promote(model, Gate())


def test_a_nan_figure_is_refused_and_changes_nothing(model):
    new_candidate(model, {"motion_speed_error": float("nan")})
    decision = promote(model, Gate())
    assert not decision.promoted and "is not a number" in decision.reason
    assert CHAMPION not in aliases(model)


def test_the_kind_gate_is_the_candidates_kinds_metric_and_guard(model):
    from components.registry.promotion import kind_gate

    version = new_candidate(model, {"saturation_gap": 0.5, "motion_speed_error": 0.10})
    MlflowClient().set_model_version_tag(model, version, "vdm.kind", "spatial-hq")
    gate = kind_gate(model, 0.01)
    assert (gate.metric, gate.direction, gate.min_improvement) == ("saturation_gap", "minimize", 0.01)
    assert (gate.guard, gate.guard_direction, gate.guard_tolerance) == ("motion_speed_error", "minimize", 0.05)
    assert promote(model, gate).promoted  # the first champion
    # Better images but motion worse by more than the tolerance: refused, nothing changes.
    worse = new_candidate(model, {"saturation_gap": 0.3, "motion_speed_error": 0.20})
    decision = promote(model, gate)
    assert not decision.promoted and "motion_speed_error 0.2 is worse than the champion's 0.1" in decision.reason
    assert aliases(model)[CHAMPION] == version
    # Within the tolerance: promoted.
    within = new_candidate(model, {"saturation_gap": 0.3, "motion_speed_error": 0.14})
    assert promote(model, gate).promoted and aliases(model)[CHAMPION] == within != worse


def test_the_kind_gate_needs_the_candidates_kind(model):
    from components.registry.promotion import kind_gate

    new_candidate(model, {"motion_speed_error": 0.1})
    with pytest.raises(PromotionError, match="does not say its kind"):
        kind_gate(model)


def test_a_version_describes_its_data_evaluation_and_gate(model):
    client = MlflowClient()
    version = client.create_model_version(
        model, source="s3://vdm/models/x", tags={"vdm.data": "s3://vdm/curated/day1/shards/", "vdm.kind": "video"}
    ).version
    client.set_registered_model_alias(model, CANDIDATE, version)
    record_evaluation(model, version, {"motion_speed_error": 0.25}, run_id="abc", run_url="http://mlflow/#/runs/abc")
    described = client.get_model_version(model, version).description
    assert described.startswith("**video** model")
    assert "**Data:** `s3://vdm/curated/day1/shards/`; dataset card `s3://vdm/curated/day1/dataset_card.html`" in (
        described
    )
    assert "**Evaluation:** motion_speed_error 0.25 ([evaluation run](http://mlflow/#/runs/abc))" in described
    assert "**Gate:** not decided yet" in described
    promote(model, Gate(), actor="dora")
    described = client.get_model_version(model, version).description
    assert "**Gate:** promoted to champion by dora at 20" in described and "no champion yet" in described


def test_rollback_after_the_alias_was_moved_by_hand(model):
    """The MLflow UI moving `champion` is stood in for by the client call the UI makes."""
    client = MlflowClient()
    first = new_candidate(model, {"motion_speed_error": 0.5})
    assert promote(model, Gate(), actor="alice").promoted
    second = new_candidate(model, {"motion_speed_error": 0.4})
    assert promote(model, Gate(), actor="alice").promoted
    third = new_candidate(model, {"motion_speed_error": 0.45})  # worse: someone promotes it by hand anyway
    client.set_registered_model_alias(model, CHAMPION, third)

    assert rollback(model, actor="bob") == (third, second)  # back to the champion before the hand move
    described = client.get_model_version(model, third).description
    assert "**Gate:** made champion outside vdm, then rolled back by bob" in described
    assert [h["version"] for h in champion_history(model)] == [first, second]
    assert rollback(model, actor="bob") == (second, first)
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(model)

    # A promotion after a hand move records the hand-set champion first: a rollback returns to it.
    client.set_registered_model_alias(model, CHAMPION, third)
    fourth = new_candidate(model, {"motion_speed_error": 0.1})
    assert promote(model, Gate(), actor="carol").promoted
    history = champion_history(model)
    assert [(h["version"], h["how"]) for h in history] == [
        (first, "promoted"), (third, MOVED_OUTSIDE), (fourth, "promoted")
    ]  # fmt: skip
    assert rollback(model) == (fourth, third) and aliases(model)[CHAMPION] == third
    assert rollback(model) == (third, first)


def test_unknown_models_and_aliases_are_registry_errors_naming_what_there_is(model):
    version = new_candidate(model, {"motion_speed_error": 0.5})
    assert registered_version(f"models:/{model}@{CANDIDATE}") == (model, version)
    with pytest.raises(RegistryError, match=rf"{model} has no alias 'champion' \(its aliases: candidate;"):
        registered_version(f"models:/{model}@champion")
    with pytest.raises(RegistryError, match=rf"{model} has no version '7'"):
        registered_version(f"models:/{model}/7")
    with pytest.raises(RegistryError, match=rf"no registered model named 'no-such-model' .*models:.*{model}"):
        registered_version("models:/no-such-model@champion")


def _one_error_line(args: list[str], env: dict[str, str] | None = None) -> str:
    """The only line a `vdm` command writes when it fails as expected (exit code 1, no traceback)."""
    tracking_uri = mlflow.get_tracking_uri()
    try:
        result = CliRunner().invoke(main, args, env=env)
    finally:
        mlflow.set_tracking_uri(tracking_uri)  # the command points the process's client elsewhere
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_registry_commands_fail_in_one_line_with_the_fix(model):
    line = _one_error_line(["registry", "list", "no-such-model"])
    assert line.startswith("error: no registered model named 'no-such-model' in MLflow at http://127.0.0.1:")
    assert model in line  # the models there are
    assert "has no version with the alias 'candidate'" in _one_error_line(["registry", "promote", model])
    assert f"{model} has no champion: nothing to roll back" in _one_error_line(["registry", "rollback", model])
    new_candidate(model, {"motion_speed_error": 0.5})
    assert "not promoted: candidate v1 has no straightness" in _one_error_line(
        ["registry", "promote", model, "--metric", "straightness", "--direction", "maximize"]
    )
    assert CliRunner().invoke(main, ["registry", "promote", model, "--metric", "motion_speed_error",
                                     "--direction", "minimize"]).exit_code == 0  # fmt: skip
    assert "nothing to roll back to" in _one_error_line(["registry", "rollback", model])
    line = _one_error_line(["eval", "--model", f"models:/{model}@production", "--data", "s3://vdm/none"])
    there = f"its aliases: candidate, champion; `vdm registry list {model}`"
    assert line == f"error: {model} has no alias 'production' ({there})"
    unreachable = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    for args in (["registry", "list", model], ["registry", "rollback", model]):
        assert _one_error_line(args, unreachable).startswith("error: cannot reach MLflow at http://127.0.0.1:9: start")


class _RefusingTracking(BaseHTTPRequestHandler):
    """A tracking server behind a login that refuses the client's (an auth proxy's 401)."""

    def do_GET(self):
        if self.path == "/health":
            self._reply(200, b"OK")
        else:
            self._reply(401, b"You are not authenticated. Please provide valid credentials.")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_refused_credentials_are_one_line_naming_the_variables(settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingTracking)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refused = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_address[1]}"}
        line = _one_error_line(["registry", "list", "any-model"], refused)
    finally:
        server.shutdown()
    assert line.startswith(f"error: MLflow at {refused['MLFLOW_TRACKING_URI']} refused the request")
    assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_TOKEN" in line
