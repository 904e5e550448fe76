"""Promotion in the MLflow registry: aliases, not stages. A new version is `candidate`;
`promote` moves `champion` to it only if its evaluation metric beats the champion's by
a configured margin, and records the decision on the version; `rollback` returns
`champion` to the version that held it before.

Evaluation metrics live on the version as tags `vdm.eval.<metric>` (written by the
evaluation step with `record_evaluation`), so the gate, the UI and the lineage all
read the same numbers. Each version's description says what it was trained on, how it
evaluated and what the gate decided (`describe_version`). The registered model's tag
`vdm.champion_history` lists the versions that held `champion`, oldest first, so a
rollback finds the previous one even after the alias was moved by hand in the MLflow UI.
"""

from __future__ import annotations

import getpass
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CANDIDATE, CHAMPION = "candidate", "champion"
EVAL_PREFIX = "vdm.eval."
EVAL_RUN, EVAL_RUN_URL = "vdm.eval_run", "vdm.eval_run_url"
PREVIOUS_CHAMPION = "vdm.previous_champion"
# Registered-model tag: JSON list of the versions that held `champion`, oldest first (a stack:
# a promotion pushes, a rollback pops), each with how it got there, who and when vdm recorded it.
CHAMPION_HISTORY = "vdm.champion_history"
HISTORY_LIMIT = 100  # entries kept; far below MLflow's 100 000 characters per tag value
MOVED_OUTSIDE = "moved outside vdm"  # `how` of a champion vdm found but did not set (the MLflow UI, a script)
T = TypeVar("T")


class RegistryError(ValueError):
    """The registry cannot do what was asked: an unknown model or alias, nothing to roll back
    to, an unreachable or refusing server. Its message says what to do. A ValueError: commands
    report it as one line, as any wrong value given."""


class PromotionError(RegistryError):
    """The gate cannot run or the alias cannot move (no candidate, nothing to roll back to, ...)."""


def _tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def check_reachable(timeout: float = 5.0) -> None:
    """Fail fast, not after MLflow's minutes of retries, when the tracking server does not answer."""
    uri = _tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException:
        raise RegistryError(
            f"cannot reach MLflow at {uri}: start the local stack (`vdm stack up`, then "
            '`eval "$(vdm stack env)"`) or set MLFLOW_TRACKING_URI to the tracking server'
        ) from None


@contextmanager
def registry_errors(name: str | None = None) -> Iterator[None]:
    """MLflow's errors for the expected mistakes as RegistryErrors saying what to do: an
    unknown model (with the models there are), a refused login, an unreachable server."""
    try:
        yield
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" and name is not None and "Registered Model" in str(e):
            raise RegistryError(_unknown_model(name)) from None
        if e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or e.get_http_status_code() in (401, 403):
            raise RegistryError(
                f"MLflow at {_tracking_uri()} refused the request ({e.error_code}): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account allowed to use the registry"
            ) from None
        if "Max retries exceeded" in str(e) or "failed with exception" in str(e):
            raise RegistryError(
                f"cannot reach MLflow at {_tracking_uri()}: start the local stack (`vdm stack up`) or set "
                "MLFLOW_TRACKING_URI to the tracking server"
            ) from None
        raise


def registry_call(fn: Callable[..., T], name: str, *args, **kwargs) -> T:
    """`fn(name, ...)` against the registry, its expected failures as one-line RegistryErrors."""
    check_reachable()
    with registry_errors(name):
        return fn(name, *args, **kwargs)


def _unknown_model(name: str) -> str:
    try:
        known = sorted(m.name for m in MlflowClient().search_registered_models(max_results=50))
    except MlflowException:  # the name alone still says what is wrong
        return f"no registered model named {name!r} in MLflow at {_tracking_uri()}"
    there = f"registered models: {', '.join(known)}" if known else "no model is registered yet"
    return f"no registered model named {name!r} in MLflow at {_tracking_uri()} ({there})"


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
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, else None. An
    unknown model, alias or version is a RegistryError naming the ones there are."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri.removeprefix("models:/")
    check_reachable()
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        with registry_errors(name):
            aliases = client.get_registered_model(name).aliases
        if alias not in aliases:
            there = f"its aliases: {', '.join(sorted(aliases))}" if aliases else "it has no alias yet"
            raise RegistryError(f"{name} has no alias {alias!r} ({there}; `vdm registry list {name}`)")
        return name, str(aliases[alias])
    name, version = ref.rsplit("/", 1)
    with registry_errors(name):
        client.get_registered_model(name)
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"{name} has no version {version!r} (`vdm registry list {name}`)") from None
    return name, version


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_evaluation(
    name: str, version: str, metrics: dict[str, float], run_id: str | None = None, run_url: str | None = None
) -> None:
    """The figures onto the version (tags `vdm.eval.*`, what the gate reads), the evaluation
    run that measured them, and the version's description updated."""
    client = MlflowClient()
    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"{EVAL_PREFIX}{metric}", repr(float(value)))
    if run_id:
        client.set_model_version_tag(name, version, EVAL_RUN, run_id)
    if run_url:
        client.set_model_version_tag(name, version, EVAL_RUN_URL, run_url)
    describe_version(name, version)


def describe_version(name: str, version: str, refusal: str | None = None) -> str:
    """Set the version's description (Markdown, the MLflow UI's version page) from its tags:
    its kind, data and dataset card, evaluation figures with a link to their run, and the
    gate's decision (`refusal`: why the gate just refused it, which leaves no tag)."""
    client = MlflowClient()
    v = client.get_model_version(name, version)
    description = version_description(v.tags, refusal)
    client.update_model_version(name, version, description=description)
    return description


def version_description(tags: dict[str, str], refusal: str | None = None) -> str:
    """A version's description from its tags (see `describe_version`)."""
    kind = tags.get("vdm.kind", "unknown")
    lines = [f"**{kind}** model (`vdm.kind`)."]
    if tags.get("vdm.random_weights") == "true":
        lines.append(f"Test or demo model: random weights in {tags.get('vdm.random_parts', '?')}; do not promote it.")
    data = tags.get("vdm.data")
    if data:
        card = tags.get("vdm.dataset_card") or _card_beside(data)
        digest = tags.get("vdm.dataset_digest")
        lines.append(
            f"**Data:** `{data}`"
            + (f"; dataset card `{card}`" if card else "")
            + (f" (digest `{digest}`)" if digest else "")
        )
    if tags.get("vdm.image_set"):
        lines.append(f"**Image set:** `{tags['vdm.image_set']}`")
    figures = {k.removeprefix(EVAL_PREFIX): x for k, x in sorted(tags.items()) if k.startswith(EVAL_PREFIX)}
    if figures:
        listed = ", ".join(f"{k} {float(x):.4g}" for k, x in figures.items())
        run = tags.get(EVAL_RUN_URL) or tags.get(EVAL_RUN)
        link = f" ([evaluation run]({run}))" if tags.get(EVAL_RUN_URL) else f" (evaluation run {run})" if run else ""
        lines.append(f"**Evaluation:** {listed}{link}")
    else:
        lines.append("**Evaluation:** not evaluated yet (`vdm eval --model models:/NAME/VERSION ...`).")
    rolled_back, promoted_at = tags.get("vdm.rolled_back_at", ""), tags.get("vdm.promotion.at", "")
    if rolled_back and rolled_back >= promoted_at:  # ISO times: a later promotion supersedes the rollback
        how = f"promoted ({tags.get('vdm.promotion.reason', '')})" if promoted_at else "made champion outside vdm"
        lines.append(f"**Gate:** {how}, then rolled back by {tags.get('vdm.rolled_back_by', '?')} at {rolled_back}")
    elif tags.get("vdm.promotion.reason"):
        lines.append(
            f"**Gate:** promoted to champion by {tags.get('vdm.promotion.by', '?')} at "
            f"{tags.get('vdm.promotion.at', '?')}: {tags['vdm.promotion.reason']}"
        )
    elif refusal:
        lines.append(f"**Gate:** not promoted: {refusal}")
    else:
        lines.append("**Gate:** not decided yet (`vdm registry promote NAME`).")
    return "\n\n".join(lines)


def _card_beside(data: str) -> str | None:
    """The dataset card `vdm curate` writes beside its `shards/` folder, for data that is one."""
    stripped = data.rstrip("/")
    if stripped.endswith("/shards"):
        return f"{stripped.removesuffix('/shards')}/dataset_card.html"
    return None


def _by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, None if no version does; an unknown model is a RegistryError."""
    with registry_errors(name):
        aliases = client.get_registered_model(name).aliases
        return client.get_model_version(name, str(aliases[alias])) if alias in aliases else None


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
    (metric, values, reason, who, when, the replaced champion) in the version's tags and the
    champion history. Either way the candidate's description says what the gate decided."""
    decision = evaluate_gate(name, gate)
    if not decision.promoted:
        if decision.champion != decision.candidate:  # "already the champion" keeps its promotion's story
            describe_version(name, decision.candidate, refusal=decision.reason)
        return decision
    client = MlflowClient()
    by, at = actor or getpass.getuser(), _now()
    tags = {
        "vdm.promotion.reason": decision.reason,
        "vdm.promotion.metric": gate.metric,
        "vdm.promotion.direction": gate.direction,
        "vdm.promotion.min_improvement": repr(gate.min_improvement),
        "vdm.promotion.by": by,
        "vdm.promotion.at": at,
        PREVIOUS_CHAMPION: decision.champion or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.candidate, key, value)
    history = _history_as_found(client, name, decision.champion)
    history.append({"version": decision.candidate, "how": "promoted", "by": by, "at": at})
    _save_history(client, name, history)
    client.set_registered_model_alias(name, CHAMPION, decision.candidate)
    describe_version(name, decision.candidate)
    return decision


def champion_history(name: str) -> list[dict[str, str]]:
    """The versions that held `champion`, oldest first, as recorded: each with `version`,
    `how` (promoted, moved outside vdm), `by` and `at`."""
    with registry_errors(name):
        return _history(MlflowClient(), name)


def _history(client: MlflowClient, name: str) -> list[dict[str, str]]:
    recorded = client.get_registered_model(name).tags.get(CHAMPION_HISTORY)
    return json.loads(recorded) if recorded else []


def _history_as_found(client: MlflowClient, name: str, champion: str | None) -> list[dict[str, str]]:
    """The recorded history, ending with the current `champion`: a champion set outside vdm
    (the MLflow UI, a script) since the last record is added as such."""
    history = _history(client, name)
    if champion is not None and (not history or history[-1]["version"] != champion):
        history.append({"version": champion, "how": MOVED_OUTSIDE, "by": "unknown", "at": _now()})
    return history


def _save_history(client: MlflowClient, name: str, history: list[dict[str, str]]) -> None:
    client.set_registered_model_tag(name, CHAMPION_HISTORY, json.dumps(history[-HISTORY_LIMIT:]))


def rollback(name: str, actor: str | None = None) -> tuple[str, str]:
    """Give `champion` back to the version that held it before the current one (from the
    champion history, which also notices a champion moved by hand in the MLflow UI); returns
    (demoted, restored) version numbers. Versions deleted since are skipped."""
    client = MlflowClient()
    champion = _by_alias(client, name, CHAMPION)
    if champion is None:
        raise PromotionError(f"{name} has no champion: nothing to roll back (`vdm registry promote {name}` sets one)")
    history = _history_as_found(client, name, champion.version)
    history.pop()  # the current champion
    while history and not _exists(client, name, history[-1]["version"]):
        history.pop()
    if not history:
        raise PromotionError(
            f"no version held champion before v{champion.version} (as recorded in the registered model's tag "
            f"{CHAMPION_HISTORY}): nothing to roll back to; move the alias with `vdm registry promote` instead"
        )
    previous = history[-1]["version"]
    _save_history(client, name, history)
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, champion.version, "vdm.rolled_back_by", actor or getpass.getuser())
    client.set_model_version_tag(name, champion.version, "vdm.rolled_back_at", _now())
    describe_version(name, champion.version)
    return champion.version, previous


def _exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True


def list_versions(name: str) -> list[dict]:
    """Every version, newest first: aliases, lineage and evaluation tags."""
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    with registry_errors(name):
        registered = client.get_registered_model(name)
    for alias, version in registered.aliases.items():
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
