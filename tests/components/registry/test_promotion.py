"""The promotion gate against the real local MLflow registry: first champion, refusal
that changes nothing, promotion with its recorded decision, rollback."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from components.registry.promotion import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS_CHAMPION,
    Gate,
    PromotionError,
    list_versions,
    promote,
    record_evaluation,
    rollback,
)


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
    assert MlflowClient().get_model_version(model, second).tags == tags_before  # nothing changed

    third = new_candidate(model, {"motion_speed_error": 0.2})
    promoted = promote(model, gate, actor="bob")
    assert promoted.promoted and promoted.champion_value == 0.5 and promoted.candidate_value == 0.2
    assert aliases(model)[CHAMPION] == third
    tags = MlflowClient().get_model_version(model, third).tags
    assert tags["vdm.promotion.by"] == "bob" and tags[PREVIOUS_CHAMPION] == first
    assert tags["vdm.promotion.metric"] == "motion_speed_error" and "improves by 0.3" in tags["vdm.promotion.reason"]

    assert rollback(model, actor="carol") == (third, first)
    assert aliases(model)[CHAMPION] == first
    assert MlflowClient().get_model_version(model, third).tags["vdm.rolled_back_by"] == "carol"
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
