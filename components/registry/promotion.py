"""Promotion in the MLflow registry: aliases, not stages. A new version is `candidate`;
`promote` moves `champion` to it only if its evaluation metric beats the champion's by
a configured margin, and records the decision on the version; `rollback` returns
`champion` to the version it replaced.

Evaluation metrics live on the version as tags `vdm.eval.<metric>` (written by the
evaluation step with `record_evaluation`), so the gate, the UI and the lineage all
read the same numbers.
"""

from __future__ import annotations

import getpass
import math
import time
from dataclasses import dataclass
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CANDIDATE, CHAMPION = "candidate", "champion"
EVAL_PREFIX = "vdm.eval."
PREVIOUS_CHAMPION = "vdm.previous_champion"


class PromotionError(Exception):
    """The registry cannot do what was asked (no candidate, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class Gate:
    metric: str = "motion_speed_error"
    direction: Literal["minimize", "maximize"] = "minimize"
    min_improvement: float = 0.0  # in the metric's units; the candidate must beat the champion by more
    # A figure that must not get worse than the champion's by more than `guard_tolerance` (its
    # units), e.g. the motion of a spatial-only finetune; None: no guard.
    guard: str | None = None
    guard_direction: Literal["minimize", "maximize"] = "minimize"
    guard_tolerance: float = 0.0


def kind_gate(name: str, min_improvement: float = 0.0) -> Gate:
    """The gate of the candidate's kind (its `vdm.kind` tag; model/tasks): the kind's metric
    and direction."""
    from model.tasks import task_of

    candidate = _by_alias(MlflowClient(), name, CANDIDATE)
    if candidate is None:
        raise PromotionError(f"{name} has no version with the alias {CANDIDATE!r}")
    kind = candidate.tags.get("vdm.kind")
    if kind is None:
        raise PromotionError(f"{name} v{candidate.version} does not say its kind (tag vdm.kind): give the metric")
    task = task_of(kind)
    metric, guard = task.metric, task.guard
    if guard is None:
        return Gate(metric.name, metric.direction, min_improvement)
    return Gate(metric.name, metric.direction, min_improvement, guard.name, guard.direction, task.guard_tolerance)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate: str
    champion: str | None
    candidate_value: float | None
    champion_value: float | None


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, else None."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, MlflowClient().get_model_version_by_alias(name, alias).version
    name, version = ref.rsplit("/", 1)
    return name, version


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_evaluation(name: str, version: str, metrics: dict[str, float], run_id: str | None = None) -> None:
    client = MlflowClient()
    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"{EVAL_PREFIX}{metric}", repr(float(value)))
    if run_id:
        client.set_model_version_tag(name, version, "vdm.eval_run", run_id)


def _by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric(version: ModelVersion, metric: str) -> float | None:
    value = version.tags.get(f"{EVAL_PREFIX}{metric}")
    return float(value) if value is not None else None


def evaluate_gate(name: str, gate: Gate) -> Decision:
    """What `promote` would decide, changing nothing."""
    client = MlflowClient()
    candidate = _by_alias(client, name, CANDIDATE)
    if candidate is None:
        raise PromotionError(f"{name} has no version with the alias {CANDIDATE!r}")
    champion = _by_alias(client, name, CHAMPION)
    value = _metric(candidate, gate.metric)
    current = _metric(champion, gate.metric) if champion else None

    def decide(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, reason, candidate.version, champion.version if champion else None, value, current)

    if value is None:
        return decide(False, f"candidate v{candidate.version} has no {gate.metric} (run the evaluation step first)")
    if math.isnan(value):
        return decide(False, f"candidate v{candidate.version}'s {gate.metric} is not a number: the evaluation measured "
                      "nothing (see its run)")  # fmt: skip
    if champion is None:
        return decide(True, f"no champion yet; candidate v{candidate.version} has {gate.metric}={value:.4g}")
    if champion.version == candidate.version:
        return decide(False, f"v{candidate.version} already is the champion")
    if current is None:
        return decide(True, f"champion v{champion.version} has no {gate.metric}; candidate has {value:.4g}")
    gain = (current - value) if gate.direction == "minimize" else (value - current)
    verdict = f"{gate.metric} {value:.4g} vs champion v{champion.version}'s {current:.4g} ({gate.direction})"
    if gain <= gate.min_improvement:
        return decide(False, f"{verdict}: improvement {gain:.4g} is not more than {gate.min_improvement:g}")
    guarded = _guard_refusal(gate, candidate, champion)
    if guarded:
        return decide(False, f"{verdict} improves, but {guarded}")
    return decide(True, f"{verdict}: improves by {gain:.4g} > {gate.min_improvement:g}")


def _guard_refusal(gate: Gate, candidate: ModelVersion, champion: ModelVersion) -> str | None:
    """Why the guard figure refuses the candidate, or None (no guard, or it holds)."""
    if gate.guard is None:
        return None
    value, current = _metric(candidate, gate.guard), _metric(champion, gate.guard)
    if value is None or math.isnan(value):
        return f"the candidate has no {gate.guard} to guard with"
    if current is None:
        return None
    loss = (value - current) if gate.guard_direction == "minimize" else (current - value)
    if loss > gate.guard_tolerance:
        return (
            f"its {gate.guard} {value:.4g} is worse than the champion's {current:.4g} by {loss:.4g} "
            f"(> {gate.guard_tolerance:g} allowed)"
        )
    return None


def promote(name: str, gate: Gate, actor: str | None = None) -> Decision:
    """Run the gate; on success move `champion` to the candidate and record the decision
    (metric, values, reason, who, when, the replaced champion) in the version's tags."""
    decision = evaluate_gate(name, gate)
    if not decision.promoted:
        return decision
    client = MlflowClient()
    tags = {
        "vdm.promotion.reason": decision.reason,
        "vdm.promotion.metric": gate.metric,
        "vdm.promotion.direction": gate.direction,
        "vdm.promotion.min_improvement": repr(gate.min_improvement),
        "vdm.promotion.by": actor or getpass.getuser(),
        "vdm.promotion.at": _now(),
        PREVIOUS_CHAMPION: decision.champion or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.candidate, key, value)
    client.set_registered_model_alias(name, CHAMPION, decision.candidate)
    return decision


def rollback(name: str, actor: str | None = None) -> tuple[str, str]:
    """Give `champion` back to the version the current champion replaced; returns
    (demoted, restored) version numbers."""
    client = MlflowClient()
    champion = _by_alias(client, name, CHAMPION)
    if champion is None:
        raise PromotionError(f"{name} has no champion")
    previous = champion.tags.get(PREVIOUS_CHAMPION)
    if not previous:
        raise PromotionError(f"champion v{champion.version} replaced no earlier champion: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, champion.version, "vdm.rolled_back_by", actor or getpass.getuser())
    client.set_model_version_tag(name, champion.version, "vdm.rolled_back_at", _now())
    return champion.version, previous


def list_versions(name: str) -> list[dict]:
    """Every version, newest first: aliases, lineage and evaluation tags."""
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version)):
        rows.append(
            {
                "version": v.version,
                "aliases": sorted(aliases.get(v.version, [])),
                "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)),
                "run_id": v.run_id,
                "eval": {k.removeprefix(EVAL_PREFIX): float(x) for k, x in v.tags.items() if k.startswith(EVAL_PREFIX)},
                "tags": {k: x for k, x in v.tags.items() if not k.startswith(EVAL_PREFIX)},
            }
        )
    return rows
