"""The promotion gate against the real local MLflow registry: the model's gate policy (a kind's
default stored as v1, set and shown with its history), every refusal reason, the decision
recorded on the version, a person's forced promotion, rollback (also after the alias was moved
by hand), and the registry commands' one-line errors. Evaluations are stood in for by the tags
the evaluation step writes on a version."""

from __future__ import annotations

import getpass
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient

from components.registry.policy import (
    GatePolicy,
    GuardRule,
    PolicyError,
    PrimaryRule,
    default_policy,
    get_policy,
    parse_policy,
    policy_history,
    policy_yaml,
    set_policy,
)
from components.registry.promotion import (
    CANDIDATE,
    CHAMPION,
    DECISION,
    MOVED_OUTSIDE,
    PREVIOUS_CHAMPION,
    Check,
    PromotionError,
    RegistryError,
    champion_history,
    evaluate_gate,
    list_versions,
    promote,
    recorded_decision,
    registered_version,
    rollback,
)
from model.tasks import KINDS
from vdm.cli import main

# A production-like policy, small enough for the tests' figures.
POLICY = GatePolicy(
    primary=PrimaryRule(metric="fvd", direction="minimize", min_improvement=2.0),
    guards=(
        GuardRule(metric="clip_score", direction="maximize", tolerance=0.005),
        GuardRule(metric="aesthetic", direction="maximize", tolerance=0.1),
    ),
    min_clips=16,
)
GOOD = {"fvd": 100.0, "clip_score": 0.30, "aesthetic": 5.0, "clips": 16.0}


@pytest.fixture
def model(settings, request) -> str:
    name = f"vdm-test-{request.node.name[:40]}"
    MlflowClient().create_registered_model(name)
    return name


def new_candidate(
    name: str,
    figures: dict[str, float] | None,
    protocol: str = "p1",
    random_networks: str = "",
    kind: str = "video",
    random_weights: bool = False,
) -> str:
    """A new version holding `candidate`, evaluated as the evaluation step records it (its tags)."""
    tags = {"vdm.data": "s3://vdm/data", "vdm.kind": kind} | ({"vdm.random_weights": "true"} if random_weights else {})
    if figures is not None:
        tags |= {f"vdm.eval.{metric}": repr(float(value)) for metric, value in figures.items()}
        tags |= {"vdm.eval_protocol": protocol, "vdm.eval_random_networks": random_networks}
    client = MlflowClient()
    version = client.create_model_version(name, source="s3://vdm/models/x", tags=tags).version
    if figures is not None:  # the evaluation run is named after the version
        client.set_model_version_tag(name, version, "vdm.eval_run", f"run{version}")
        client.set_model_version_tag(name, version, "vdm.eval_run_url", f"http://mlflow/#/runs/run{version}")
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def aliases(name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_the_first_gate_stores_the_kinds_default_policy_as_version_one(model):
    first = new_candidate(model, {**GOOD, "clips": 256.0, "motion_speed_error": 0.2})
    decision = promote(model, actor="alice")
    assert decision.promoted and decision.policy_version == 1 and "no champion yet" in decision.reason
    (record,) = policy_history(model)
    assert (record.version, record.by, record.note) == (1, "alice", "default for video")
    assert get_policy(model) == (default_policy("video"), 1)
    assert [(c.metric, c.role, c.passed) for c in decision.checks] == [
        ("clips", "size", True), ("random_networks", "networks", True), ("fvd", "primary", True),
        ("clip_score", "guard", True), ("aesthetic", "guard", True), ("motion_speed_error", "guard", True),
    ]  # fmt: skip
    assert aliases(model) == {CANDIDATE: first, CHAMPION: first}
    rows = list_versions(model)
    assert rows[0]["eval"]["fvd"] == 100.0


def test_kinds_default_policies_follow_their_definitions():
    for kind in ("video", "hq", "temporal-decoder"):
        policy = default_policy(kind)
        assert (policy.primary.metric, policy.primary.min_improvement) == ("fvd", 5.0)
        assert [g.metric for g in policy.guards] == ["clip_score", "aesthetic", "motion_speed_error"]
        assert (policy.min_clips, policy.allow_random_networks, policy.same_protocol) == (256, False, True)
    assert [g.metric for g in default_policy("i2v").guards] == ["aesthetic", "motion_speed_error"]  # no text
    image = default_policy("image")  # Stage I makes images: no FVD
    assert image.primary.metric == "clip_score" and [g.metric for g in image.guards] == ["aesthetic"]
    for kind in ("interpolation", "prediction", "camera-lora"):
        policy = default_policy(kind)
        assert (policy.primary.metric, policy.primary.direction) == (
            KINDS[kind].metric.name,
            KINDS[kind].metric.direction,
        )
        assert [g.metric for g in policy.guards] == ["fvd"]
    spatial = default_policy("spatial-hq")
    assert [(g.metric, g.tolerance) for g in spatial.guards] == [("fvd", 10.0), ("motion_speed_error", 0.05)]
    multiview = default_policy("multiview")  # evaluated on orbits: no FVD reference
    assert multiview.primary.metric == "view_retrieval" and multiview.guards == () and multiview.min_clips == 64
    for kind in KINDS:
        demo = default_policy(kind, demo=True)
        assert demo.primary.metric == KINDS[kind].metric.name and demo.primary.min_improvement == 0.0
        assert (demo.min_clips, demo.allow_random_networks, demo.same_protocol) == (1, True, False)
        assert parse_policy(policy_yaml(demo)) == demo  # its YAML reads back
    assert [(g.metric, g.tolerance) for g in default_policy("spatial-hq", demo=True).guards] == [
        ("motion_speed_error", 0.05)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("primary: {metric: fvd, direction: minimize, min_improvement: 2}\nguards: [\n", "not valid YAML at line 3"),
        ("- fvd\n", "a gate policy is a YAML mapping"),
        ("primary: {metric: fvd, direction: down, min_improvement: 2}\nmin_clips: 1\n",
         "field primary.direction: Input should be 'minimize' or 'maximize' (got 'down')"),
        ("primary: {metric: fvd, direction: minimize, min_improvement: 2}\nmin_clips: 1\n"
         "guards: [{metric: aesthetic, direction: maximize, tolerance: -1}]\n",
         "field guards.0.tolerance: Input should be greater than or equal to 0 (got -1)"),
        ("primary: {metric: fvd, direction: minimize, min_improvement: 2}\nmin_clip: 1\n",
         "field min_clips: Field required; min_clip: Extra inputs are not permitted (got 1)"),
        ("primary: {metric: fvd, direction: minimize, min_improvement: 2}\nmin_clips: 1\n"
         "guards: [{metric: fvd, direction: minimize, tolerance: 1}]\n",
         "field guards: fvd named twice: a figure is the primary or one guard"),
    ],
)  # fmt: skip
def test_an_invalid_policy_is_one_line_naming_the_field(text, message):
    with pytest.raises(PolicyError) as raised:
        parse_policy(text)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_policy_set_and_show_keep_every_version(model, tmp_path):
    first = tmp_path / "policy.yaml"
    first.write_text("# FVD at our clip count varies by about 2\n" + policy_yaml(POLICY))
    assert _vdm_ok(["registry", "policy", "set", model, str(first)]).endswith(f"{model}: gate policy v1 set by "
                                                                              f"{_user()}")  # fmt: skip
    second = tmp_path / "stricter.yaml"
    second.write_text(first.read_text().replace("min_clips: 16", "min_clips: 32"))
    assert f"{model}: gate policy v2" in _vdm_ok(["registry", "policy", "set", model, str(second)])
    shown = _vdm_ok(["registry", "policy", "show", model]).splitlines()
    assert shown[0].startswith(f"# {model} gate policy v2, set by {_user()} at 20")
    assert "# FVD at our clip count varies by about 2" in shown and "min_clips: 32" in shown  # as written
    assert shown[-1].startswith(f"# v1: set by {_user()} at 20")
    assert get_policy(model) == (POLICY.model_copy(update={"min_clips": 32}), 2)
    assert [r.policy.min_clips for r in policy_history(model)] == [16, 32]
    assert _vdm_ok(["registry", "list", model]).startswith(f"{model}: gate policy v2, set by {_user()}")

    bad = tmp_path / "bad.yaml"
    bad.write_text(first.read_text().replace("direction: maximize", "direction: upward", 1))
    line = _one_error_line(["registry", "policy", "set", model, str(bad)])
    assert line == (f"error: {bad}: gate policy field guards.0.direction: Input should be 'minimize' or 'maximize' "
                    "(got 'upward')")  # fmt: skip
    assert _one_error_line(["registry", "policy", "set", model, str(tmp_path / "none.yaml")]) == (
        f"error: cannot read the policy file {tmp_path / 'none.yaml'}: No such file or directory"
    )
    assert get_policy(model)[1] == 2  # nothing stored
    MlflowClient().create_registered_model(f"{model}-new")
    assert "no gate policy yet" in _vdm_ok(["registry", "policy", "show", f"{model}-new"])


def test_each_refusal_names_its_figures(model):
    set_policy(model, POLICY, actor="alice")
    new_candidate(model, None)
    assert promote(model).reason == (
        "candidate v1 has no evaluation figures (run the evaluation step first: "
        f"`vdm eval --model models:/{model}/1 ...`)"
    )
    new_candidate(model, GOOD | {"fvd": float("nan")})
    assert promote(model).reason == "candidate v2's fvd is not a number: the evaluation measured nothing (see its run)"
    new_candidate(model, GOOD | {"clips": 8.0})
    assert promote(model).reason == "candidate v3 was evaluated on 8 clips; the policy needs at least 16"
    new_candidate(model, GOOD, random_networks="i3d,clip")
    assert promote(model).reason.startswith(
        "candidate v4's figures were measured with random-weight evaluation networks (i3d,clip): the policy does not "
        "count them"
    )
    assert CHAMPION not in aliases(model)  # none of them became the first champion

    first = new_candidate(model, GOOD)
    assert promote(model).promoted and aliases(model)[CHAMPION] == first
    new_candidate(model, GOOD | {"fvd": 90.0}, protocol="p2")
    assert promote(model).reason == (
        "candidate v6 and champion v5 were not evaluated alike (protocol p2 vs p1): re-evaluate the champion on the "
        f"same set (`vdm eval --model models:/{model}/5 ...`)"
    )
    new_candidate(model, GOOD | {"fvd": 99.0})
    assert promote(model).reason == "fvd 99 vs champion v5's 100 (minimize): improvement 1 is not more than 2"
    # The primary improves but both guards get worse by more than their tolerances: every failing guard is listed.
    new_candidate(model, GOOD | {"fvd": 80.0, "clip_score": 0.29, "aesthetic": 4.8})
    refused = promote(model)
    assert refused.reason == (
        "guard clip_score 0.29 is worse than champion v5's 0.3 by 0.01 (> 0.005 allowed); "
        "guard aesthetic 4.8 is worse than champion v5's 5 by 0.2 (> 0.1 allowed)"
    )
    assert [(c.metric, c.passed) for c in refused.checks if c.role in ("primary", "guard")] == [
        ("fvd", True), ("clip_score", False), ("aesthetic", False)
    ]  # fmt: skip
    new_candidate(model, {k: v for k, v in GOOD.items() if k != "aesthetic"} | {"fvd": 80.0})
    assert promote(model).reason == "candidate v9 has no aesthetic (run the evaluation step first)"
    assert aliases(model)[CHAMPION] == first  # no refusal moved it
    # Within the tolerances and better by more than the margin: promoted.
    better = new_candidate(model, GOOD | {"fvd": 90.0, "clip_score": 0.296, "aesthetic": 4.95})
    decision = promote(model, actor="bob")
    assert decision.promoted and aliases(model)[CHAMPION] == better
    assert decision.reason == (
        "fvd 90 vs champion v5's 100 (minimize): improves by 10 > 2; guards hold (clip_score, aesthetic)"
    )
    assert "already is the champion" in promote(model).reason


def test_random_evaluation_networks_are_refused_by_a_production_policy_and_allowed_by_the_demo(model):
    new_candidate(model, GOOD | {"clips": 256.0, "motion_speed_error": 0.2}, random_networks="i3d")
    refused = promote(model)
    assert "random-weight evaluation networks (i3d)" in refused.reason
    (failed,) = [c for c in refused.checks if not c.passed]
    assert failed == Check("random_networks", "networks", "i3d", None, "none", False)
    assert policy_history(model)[0].note == "default for video" and CHAMPION not in aliases(model)

    demo_model = f"{model}-demo"
    MlflowClient().create_registered_model(demo_model)
    new_candidate(demo_model, {"motion_speed_error": 0.5, "clips": 2.0}, random_networks="i3d,clip,aesthetic",
                  random_weights=True)  # fmt: skip
    assert promote(demo_model).promoted
    assert policy_history(demo_model)[0].note == "demo default for video (v1 has random weights)"
    # The demo compares the motion figure whatever the protocol (each demo run curates fresh clips).
    second = new_candidate(demo_model, {"motion_speed_error": 0.4, "clips": 2.0}, protocol="p2",
                           random_networks="i3d", random_weights=True)  # fmt: skip
    assert promote(demo_model).promoted and aliases(demo_model)[CHAMPION] == second


def test_the_decision_is_recorded_on_the_version_with_every_figure(model):
    set_policy(model, POLICY, actor="alice")
    first = new_candidate(model, GOOD | {"motion_speed_error": 0.2})
    promote(model, actor="alice")
    second = new_candidate(model, GOOD | {"fvd": 99.5, "motion_speed_error": 0.1})
    refused = promote(model, actor="bob")
    version = MlflowClient().get_model_version(model, second)
    recorded = recorded_decision(version.tags)
    assert recorded == refused and not recorded.promoted
    stored = json.loads(version.tags[DECISION])
    assert stored["candidate_evaluation"]["figures"] == GOOD | {"fvd": 99.5, "motion_speed_error": 0.1}
    assert stored["champion_evaluation"]["figures"] == GOOD | {"motion_speed_error": 0.2}
    assert (stored["candidate_evaluation"]["run"], stored["champion_evaluation"]["run"]) == (f"run{second}", "run1")
    assert stored["policy_version"] == 1 and "min_clips: 16" in stored["policy_text"] and stored["decided_by"] == "bob"
    assert {c["metric"]: c["passed"] for c in stored["checks"]} == {
        "clips": True, "random_networks": True, "protocol": True, "fvd": False, "clip_score": True, "aesthetic": True
    }  # fmt: skip
    description = version.description
    assert "**Gate:** not promoted: fvd 99.5 vs champion v1's 100 (minimize): improvement 0.5" in description
    assert f"| check | figure | candidate v{second} | champion v{first} | requirement | |" in description
    assert "| primary | fvd | 99.5 | 100 | better by more than 2 (minimize) | **fail** |" in description
    assert "Gate policy v1, decided by bob at 20" in description
    assert f"[candidate's evaluation run](http://mlflow/#/runs/run{second})" in description
    # A gate that finds the candidate already champion keeps the promotion's record.
    MlflowClient().set_registered_model_alias(model, CANDIDATE, first)
    promote(model)
    assert recorded_decision(MlflowClient().get_model_version(model, first).tags).promoted


def test_a_forced_promotion_records_who_why_and_what_the_gate_said(model):
    set_policy(model, POLICY, actor="alice")
    first = new_candidate(model, GOOD)
    promote(model)
    worse = new_candidate(model, GOOD | {"fvd": 150.0})
    assert "--force needs --reason TEXT" in _one_error_line(["registry", "promote", model, "--force"])
    assert "--reason goes with --force" in _one_error_line(["registry", "promote", model, "--reason", "why"])
    with pytest.raises(PromotionError, match="a forced promotion needs a reason"):
        promote(model, force_reason=" ")
    assert aliases(model)[CHAMPION] == first

    out = _vdm_ok(["registry", "promote", model, "--force", "--reason", "hotfix for customer X"])
    gate_said = "fvd 150 vs champion v1's 100 (minimize): improvement -50 is not more than 2"
    assert f"promoted {model} v{worse} to champion: forced by {_user()}: hotfix for customer X (the gate refused: " \
           f"{gate_said})" in out  # fmt: skip
    assert "FAIL  primary" in out and "the gate refused:" in out
    assert aliases(model)[CHAMPION] == worse
    version = MlflowClient().get_model_version(model, worse)
    decision = recorded_decision(version.tags)
    assert (decision.forced, decision.decided_by, decision.forced_reason) == (True, _user(), "hotfix for customer X")
    assert (decision.gate_promoted, decision.gate_reason) == (False, gate_said)
    assert version.tags["vdm.promotion.forced"] == "true" and version.tags[PREVIOUS_CHAMPION] == first
    assert f"**forced** by {_user()}: hotfix for customer X; the gate refused:" in version.description
    assert [(h["version"], h["how"]) for h in champion_history(model)] == [(first, "promoted"), (worse, "forced")]
    # ... and is undone like any promotion.
    assert _vdm_ok(["registry", "rollback", model]) == f"{model}: champion back to v{first} (was v{worse})"
    assert aliases(model)[CHAMPION] == first


def test_the_pipeline_gate_step_writes_every_check_into_its_outputs(model, tmp_path, monkeypatch):
    """The step's body as a pipeline runs it: the version becomes the candidate, the model's policy decides,
    and the decision is the pipeline run's."""
    from kfp.dsl import HTML, Artifact

    from components.registry.component import promote_candidate

    set_policy(model, POLICY, actor="alice")
    first = new_candidate(model, GOOD)
    assert promote(model).promoted
    worse = new_candidate(model, GOOD | {"fvd": 101.0})
    MlflowClient().set_registered_model_alias(model, CANDIDATE, first)  # the step moves it to the version given
    decision, report = Artifact(uri=str(tmp_path / "decision")), HTML(uri=str(tmp_path / "report.html"))
    # The pipeline hands the step its run's id (dsl.PIPELINE_JOB_ID_PLACEHOLDER).
    assert promote_candidate.python_func(f"models:/{model}/{worse}", "0b7e-run", decision, report) is False
    assert aliases(model) == {CANDIDATE: worse, CHAMPION: first}
    metadata = decision.metadata
    assert (metadata["model"], metadata["promoted"], metadata["policy_version"]) == (model, False, 1)
    assert metadata["reason"] == "fvd 101 vs champion v1's 100 (minimize): improvement -1 is not more than 2"
    assert [(c["metric"], c["passed"]) for c in metadata["checks"]] == [
        ("clips", True), ("random_networks", True), ("protocol", True), ("fvd", False), ("clip_score", True),
        ("aesthetic", True),
    ]  # fmt: skip
    assert metadata["champion_evaluation"]["figures"] == GOOD and metadata["decided_by"] == "pipeline run 0b7e-run"
    page = (tmp_path / "report.html").read_text()
    assert f"{model}: version {worse} not promoted" in page and "Gate policy (policy v1)" in page
    assert "<tr class=fail><td>FAIL</td><td>primary</td><td>fvd</td><td>101</td><td>100</td>" in page
    assert f"href='http://mlflow/#/runs/run{worse}'" in page and "href='http://mlflow/#/runs/run1'" in page
    assert report.metadata == {"model": model, "promoted": False, "policy_version": 1}


def test_promote_without_a_candidate_is_a_clear_error(model):
    with pytest.raises(PromotionError, match="no version with the alias 'candidate'"):
        promote(model)


def test_a_model_without_policy_or_kind_says_how_to_set_one(model):
    version = MlflowClient().create_model_version(model, source="s3://vdm/models/x").version
    MlflowClient().set_registered_model_alias(model, CANDIDATE, version)
    with pytest.raises(PromotionError, match=f"{model} has no gate policy and v1 does not say its kind"):
        evaluate_gate(model)


def test_promote_moves_champion_only_if_it_is_where_the_gate_saw_it(model, monkeypatch):
    """A second promotion (or a hand move) between the gate's judgement and the move: stood in for
    by moving `champion` right after the gate has read it."""
    import components.registry.promotion as promotion

    client = MlflowClient()
    set_policy(model, POLICY)
    first = new_candidate(model, GOOD)
    assert promote(model, actor="alice").promoted
    other = new_candidate(model, GOOD | {"fvd": 60.0})
    candidate = new_candidate(model, GOOD | {"fvd": 80.0})  # better than v1, worse than `other`
    judge = promotion.evaluate_gate

    def judged_then_moved(*args, **kwargs):
        gate = judge(*args, **kwargs)
        client.set_registered_model_alias(model, CHAMPION, other)
        return gate

    monkeypatch.setattr(promotion, "evaluate_gate", judged_then_moved)
    with pytest.raises(PromotionError, match=rf"champion is now v{other}, not v{first} that v{candidate} was judged"):
        promote(model, actor="alice")
    assert aliases(model)[CHAMPION] == other  # nothing moved back or on
    assert "vdm.promotion.by" not in client.get_model_version(model, candidate).tags
    assert [h["version"] for h in champion_history(model)] == [first]


def test_the_gate_judges_the_version_it_is_given_whatever_candidate_points_at(model):
    set_policy(model, POLICY)
    first = new_candidate(model, GOOD)
    assert promote(model, actor="alice").promoted
    mine = new_candidate(model, GOOD | {"fvd": 80.0})
    theirs = new_candidate(model, GOOD | {"fvd": 60.0})  # a concurrent run set `candidate` last
    assert aliases(model)[CANDIDATE] == theirs
    decision = promote(model, actor="kubeflow-pipelines", version=mine)
    assert (decision.candidate, decision.champion, decision.promoted) == (mine, first, True)
    assert aliases(model)[CHAMPION] == mine
    assert json.loads(MlflowClient().get_model_version(model, mine).tags["vdm.decision"])["candidate"] == mine


def test_a_promote_after_a_rollback_does_not_bring_back_the_demoted_version(model):
    set_policy(model, POLICY)
    first = new_candidate(model, GOOD)
    assert promote(model, actor="alice").promoted
    second = new_candidate(model, GOOD | {"fvd": 90.0})
    assert promote(model, actor="alice").promoted
    assert aliases(model) == {CANDIDATE: second, CHAMPION: second}
    assert rollback(model, actor="bob") == (second, first)
    assert aliases(model) == {CHAMPION: first}  # the demoted version is no candidate any more
    with pytest.raises(PromotionError, match="no version with the alias 'candidate'"):
        promote(model, actor="alice")
    assert aliases(model) == {CHAMPION: first}
    third = new_candidate(model, GOOD | {"fvd": 80.0})  # a new candidate is promoted as before
    assert promote(model, actor="alice").promoted and aliases(model) == {CANDIDATE: third, CHAMPION: third}


def test_rollback_after_the_alias_was_moved_by_hand(model):
    """The MLflow UI moving `champion` is stood in for by the client call the UI makes."""
    client = MlflowClient()
    set_policy(model, POLICY)
    first = new_candidate(model, GOOD)
    assert promote(model, actor="alice").promoted
    second = new_candidate(model, GOOD | {"fvd": 90.0})
    assert promote(model, actor="alice").promoted
    third = new_candidate(model, GOOD | {"fvd": 95.0})  # worse: someone promotes it by hand anyway
    client.set_registered_model_alias(model, CHAMPION, third)

    assert rollback(model, actor="bob") == (third, second)  # back to the champion before the hand move
    described = client.get_model_version(model, third).description
    assert "**Gate:** made champion outside vdm, then rolled back by bob" in described
    assert [h["version"] for h in champion_history(model)] == [first, second]
    assert rollback(model, actor="bob") == (second, first)
    demoted = client.get_model_version(model, second)
    assert demoted.tags["vdm.rolled_back_by"] == "bob" and "promoted (fvd 90 vs champion" in demoted.description
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(model)

    # A promotion after a hand move records the hand-set champion first: a rollback returns to it.
    client.set_registered_model_alias(model, CHAMPION, third)
    fourth = new_candidate(model, GOOD | {"fvd": 50.0})
    assert promote(model, actor="carol").promoted
    history = champion_history(model)
    assert [(h["version"], h["how"]) for h in history] == [
        (first, "promoted"), (third, MOVED_OUTSIDE), (fourth, "promoted")
    ]  # fmt: skip
    assert rollback(model) == (fourth, third) and aliases(model)[CHAMPION] == third
    assert rollback(model) == (third, first)


def test_unknown_models_and_aliases_are_registry_errors_naming_what_there_is(model):
    version = new_candidate(model, GOOD)
    assert registered_version(f"models:/{model}@{CANDIDATE}") == (model, version)
    with pytest.raises(RegistryError, match=rf"{model} has no alias 'champion' \(its aliases: candidate;"):
        registered_version(f"models:/{model}@champion")
    with pytest.raises(RegistryError, match=rf"{model} has no version '7'"):
        registered_version(f"models:/{model}/7")
    with pytest.raises(RegistryError, match=rf"no registered model named 'no-such-model' .*models:.*{model}"):
        registered_version("models:/no-such-model@champion")


def _user() -> str:
    """Who the registry commands record: the MLflow user the session's stack logs its clients in as."""
    return os.environ["MLFLOW_TRACKING_USERNAME"]


def _auth_api(method: str, path: str, login: tuple[str, str], **params) -> requests.Response:
    uri = mlflow.get_tracking_uri().rstrip("/")
    return requests.request(method, f"{uri}/api/2.0/mlflow/{path}", json=params, auth=login, timeout=30)


def test_who_is_the_authenticated_mlflow_user_or_the_pipeline_run(model, stack, monkeypatch):
    """Against the stack's MLflow with its auth app: a second account made through MLflow's auth API
    promotes as itself; the OS user appears nowhere."""
    admin = (stack.credentials()["MLFLOW_TRACKING_USERNAME"], stack.credentials()["MLFLOW_TRACKING_PASSWORD"])
    assert admin[0] != getpass.getuser()
    set_policy(model, POLICY)
    assert policy_history(model)[0].by == admin[0]  # the session's own login
    first = new_candidate(model, GOOD)
    assert promote(model).decided_by == admin[0]

    alice = (f"alice-{os.getpid()}", "correct horse battery staple")
    assert _auth_api("POST", "users/create", admin, username=alice[0], password=alice[1]).status_code == 200
    granted = _auth_api("PATCH", "users/update-admin", admin, username=alice[0], is_admin=True)
    assert granted.status_code == 200, granted.text
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", alice[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice[1])
    second = new_candidate(model, GOOD | {"fvd": 90.0})
    decision = promote(model)
    assert decision.promoted and decision.decided_by == alice[0]
    tags = MlflowClient().get_model_version(model, second).tags
    assert tags["vdm.promotion.by"] == alice[0]
    assert [(h["version"], h["by"]) for h in champion_history(model)] == [(first, admin[0]), (second, alice[0])]

    # Inside a pipeline the run acts, whoever the login is.
    monkeypatch.setenv("KFP_RUN_ID", "4f1c-run")
    assert rollback(model) == (second, first)
    assert MlflowClient().get_model_version(model, second).tags["vdm.rolled_back_by"] == "pipeline run 4f1c-run"
    monkeypatch.delenv("KFP_RUN_ID")

    # A login the server refuses is a one-line error before anything is written.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-her-password")
    with pytest.raises(RegistryError, match=r"refused the login \(401\): set MLFLOW_TRACKING_USERNAME"):
        promote(model, force_reason="hotfix")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    assert aliases(model)[CHAMPION] == first
    assert [h["version"] for h in champion_history(model)] == [first]


def _invoke(args: list[str], env: dict[str, str] | None = None):
    tracking_uri = mlflow.get_tracking_uri()
    try:
        return CliRunner().invoke(main, args, env=env)
    finally:
        mlflow.set_tracking_uri(tracking_uri)  # the command points the process's client elsewhere


def _vdm_ok(args: list[str]) -> str:
    """A `vdm` command's output when it succeeds."""
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def _one_error_line(args: list[str], env: dict[str, str] | None = None) -> str:
    """The only line a `vdm` command writes on stderr when it fails as expected (exit code 1, no traceback)."""
    result = _invoke(args, env)
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
    assert "no registered model named 'no-such-model'" in _one_error_line(
        ["registry", "policy", "show", "no-such-model"]
    )
    new_candidate(model, {"motion_speed_error": 0.5, "clips": 4.0})
    refused = _invoke(["registry", "promote", model])  # the video default: no fvd among the figures
    assert refused.exit_code == 1 and refused.stderr.strip().splitlines() == [
        "error: not promoted: candidate v1 was evaluated on 4 clips; the policy needs at least 256; candidate v1 has "
        "no fvd (run the evaluation step first); candidate v1 has no clip_score (run the evaluation step first); "
        "candidate v1 has no aesthetic (run the evaluation step first)"
    ]
    assert "FAIL  primary" in refused.stdout and "policy v1; candidate v1 against champion (none)" in refused.stdout
    assert CHAMPION not in aliases(model)
    unreachable = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    for args in (["registry", "list", model], ["registry", "rollback", model], ["registry", "policy", "show", model]):
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
