"""Promotion in the MLflow registry: aliases, not stages. A new version is `candidate`;
`promote` moves `champion` to it only if its evaluation figures pass the model's gate
policy (components/registry/policy.py: a primary figure that must improve by a margin,
guard figures that must not get worse, an evaluation size, real evaluation networks, the
same evaluation protocol as the champion's), and records the decision, every check and
figure included, on the version (tag `vdm.decision`); a person may override the gate
with a reason (`force_reason`). `rollback` returns `champion` to the version that held it
before.

Evaluation figures live on the version as tags `vdm.eval.<metric>` (written by the
evaluation step with `record_evaluation`), so the gate, the UI and the lineage all
read the same numbers. Each version's description says what it was trained on, how it
evaluated and what the gate decided (`describe_version`). The registered model's tag
`vdm.champion_history` lists the versions that held `champion`, oldest first, so a
rollback finds the previous one even after the alias was moved by hand in the MLflow UI.
Who promoted, forced or rolled back is the authenticated MLflow user, or inside a pipeline
its run (components/registry/actor.py), unless the caller names someone (`actor`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal, TypeVar

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.registry.actor import LoginError, current_actor
from components.registry.decision import decision_markdown
from components.registry.policy import (
    REGISTERED_MODEL_TAG_LIMIT,
    GatePolicy,
    PolicyError,
    default_policy,
    policy_record,
    policy_yaml,
    set_policy,
)

CANDIDATE, CHAMPION = "candidate", "champion"
EVAL_PREFIX = "vdm.eval."
EVAL_RUN, EVAL_RUN_URL, EVAL_REPORT_URL = "vdm.eval_run", "vdm.eval_run_url", "vdm.eval_report_url"
EVAL_PROTOCOL, EVAL_RANDOM_NETWORKS = "vdm.eval_protocol", "vdm.eval_random_networks"
CLIPS = "clips"  # the figure that is the evaluation's size (vdm.eval.clips)
# Version tag: the gate's last decision on the version (JSON of `Decision`), every attempt.
DECISION = "vdm.decision"
VERSION_TAG_LIMIT = 100_000  # characters MLflow keeps in a version's tag value
PREVIOUS_CHAMPION = "vdm.previous_champion"
# Registered-model tag: JSON list of the versions that held `champion`, oldest first (a stack:
# a promotion pushes, a rollback pops), each with how it got there, who and when vdm recorded it;
# the newest entries that fit in a registered model's tag are kept.
CHAMPION_HISTORY = "vdm.champion_history"
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
class Evaluated:
    """What a version's evaluation recorded on it: every `vdm.eval.*` figure, its run and report,
    its protocol (what makes figures comparable) and the evaluation networks that had random weights."""

    version: str
    figures: dict[str, float]
    run: str | None = None
    run_url: str | None = None
    report_url: str | None = None
    protocol: str | None = None
    random_networks: tuple[str, ...] = ()

    @classmethod
    def of(cls, version: ModelVersion) -> Evaluated:
        tags = version.tags
        random = tags.get(EVAL_RANDOM_NETWORKS, "")
        return cls(
            version=version.version,
            figures={k.removeprefix(EVAL_PREFIX): _float(x) for k, x in tags.items() if k.startswith(EVAL_PREFIX)},
            run=tags.get(EVAL_RUN),
            run_url=tags.get(EVAL_RUN_URL),
            report_url=tags.get(EVAL_REPORT_URL),
            protocol=tags.get(EVAL_PROTOCOL) or None,
            random_networks=tuple(n.strip() for n in random.split(",") if n.strip()),
        )


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # a hand-set tag that is no number counts as none measured
        return math.nan


@dataclass(frozen=True)
class Check:
    """One requirement of the policy on the candidate: the figure, its role, both versions'
    values (a string for the protocol and the random networks), what was required, and whether it held."""

    metric: str
    role: Literal["size", "networks", "protocol", "primary", "guard"]
    candidate: float | str | None
    champion: float | str | None
    requirement: str
    passed: bool


@dataclass(frozen=True)
class Decision:
    """What the gate decided and from what: every check, both versions' evaluations, the policy
    (its text and version; None: given, not stored). A forced promotion says who forced it and
    why, and what the gate itself said (`gate_promoted`, `gate_reason`)."""

    promoted: bool
    reason: str
    candidate: str
    champion: str | None
    checks: tuple[Check, ...] = ()
    candidate_evaluation: Evaluated | None = None
    champion_evaluation: Evaluated | None = None
    policy_text: str = ""
    policy_version: int | None = None
    decided_by: str | None = None
    decided_at: str | None = None
    forced: bool = False
    forced_reason: str | None = None
    gate_promoted: bool | None = None
    gate_reason: str | None = None

    @property
    def candidate_figures(self) -> dict[str, float]:
        return self.candidate_evaluation.figures if self.candidate_evaluation else {}

    @property
    def champion_figures(self) -> dict[str, float]:
        return self.champion_evaluation.figures if self.champion_evaluation else {}

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Decision:
        raw = json.loads(text)
        evaluations = {
            k: Evaluated(**(raw[k] | {"random_networks": tuple(raw[k]["random_networks"])})) if raw.get(k) else None
            for k in ("candidate_evaluation", "champion_evaluation")
        }
        checks = tuple(Check(**c) for c in raw.get("checks", ()))
        return cls(**(raw | evaluations | {"checks": checks}))


def recorded_decision(tags: dict[str, str]) -> Decision | None:
    """The gate's last decision recorded in a version's tags; None if the gate has not run on it."""
    text = tags.get(DECISION)
    if not text:
        return None
    try:
        return Decision.from_json(text)
    except (ValueError, TypeError, KeyError):  # a tag edited by hand: the description shows none
        return None


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


def describe_version(name: str, version: str) -> str:
    """Set the version's description (Markdown, the MLflow UI's version page) from its tags:
    its kind, data and dataset card, evaluation figures with a link to their run, and the
    gate's last decision with its checks."""
    client = MlflowClient()
    v = client.get_model_version(name, version)
    description = version_description(v.tags)
    client.update_model_version(name, version, description=description)
    return description


def version_description(tags: dict[str, str]) -> str:
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
        listed = ", ".join(f"{k} {_float(x):.4g}" for k, x in figures.items())
        run = tags.get(EVAL_RUN_URL) or tags.get(EVAL_RUN)
        link = f" ([evaluation run]({run}))" if tags.get(EVAL_RUN_URL) else f" (evaluation run {run})" if run else ""
        report = f" ([report]({tags[EVAL_REPORT_URL]}))" if tags.get(EVAL_REPORT_URL) else ""
        lines.append(f"**Evaluation:** {listed}{link}{report}")
    else:
        lines.append("**Evaluation:** not evaluated yet (`vdm eval --model models:/NAME/VERSION ...`).")
    decision = recorded_decision(tags)
    rolled_back, promoted_at = tags.get("vdm.rolled_back_at", ""), tags.get("vdm.promotion.at", "")
    if rolled_back and rolled_back >= promoted_at:  # ISO times: a later promotion supersedes the rollback
        how = f"promoted ({tags.get('vdm.promotion.reason', '')})" if promoted_at else "made champion outside vdm"
        lines.append(f"**Gate:** {how}, then rolled back by {tags.get('vdm.rolled_back_by', '?')} at {rolled_back}")
    elif tags.get("vdm.promotion.reason") and (decision is None or decision.promoted):
        lines.append(
            f"**Gate:** promoted to champion by {tags.get('vdm.promotion.by', '?')} at "
            f"{tags.get('vdm.promotion.at', '?')}: {tags['vdm.promotion.reason']}"
        )
    elif decision is not None and not decision.promoted:
        lines.append(f"**Gate:** not promoted: {decision.reason}")
    else:
        lines.append("**Gate:** not decided yet (`vdm registry promote NAME`).")
    if decision is not None:
        lines.append(decision_markdown(decision))
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


def gate_policy(name: str, candidate: ModelVersion, actor: str | None = None) -> tuple[GatePolicy, int, str]:
    """The model's policy (policy, version, text); a model without one gets the default of its
    candidate's kind stored as its first version (the demo default for a random-weight model)."""
    record = policy_record(name)
    if record is None:
        kind = candidate.tags.get("vdm.kind")
        if kind is None:
            raise PromotionError(
                f"{name} has no gate policy and v{candidate.version} does not say its kind (tag vdm.kind) to "
                f"take its default from: set one with `vdm registry policy set {name} FILE`"
            )
        demo = candidate.tags.get("vdm.random_weights") == "true"
        try:
            policy = default_policy(kind, demo)
        except ValueError as e:  # an unknown kind
            raise PromotionError(f"{name} v{candidate.version}: {e}") from None
        note = f"{'demo ' if demo else ''}default for {kind}"
        if demo:
            note += f" (v{candidate.version} has random weights)"
        record = set_policy(name, policy, actor, note=note)
    try:
        return record.policy, record.version, record.text
    except PolicyError as e:  # the stored text was edited by hand
        fix = f"`vdm registry policy set {name} FILE`"
        raise PromotionError(f"{name}'s gate policy v{record.version}: {e} ({fix})") from None


def evaluate_gate(
    name: str, policy: GatePolicy | None = None, actor: str | None = None, version: str | None = None
) -> Decision:
    """What `promote` would decide on the model's policy (or `policy`), moving no alias. A model
    without a policy gets its kind's default stored first (`gate_policy`). `version`: the version
    to judge (a pipeline's own model, whatever `candidate` points at meanwhile); None: the
    version `candidate` points at."""
    client = MlflowClient()
    if version is not None:
        with registry_errors(name):
            candidate = client.get_model_version(name, version)
    else:
        candidate = _by_alias(client, name, CANDIDATE)
    if candidate is None:
        raise PromotionError(f"{name} has no version with the alias {CANDIDATE!r}")
    champion = _by_alias(client, name, CHAMPION)
    if policy is None:
        policy, policy_version, text = gate_policy(name, candidate, actor)
    else:
        policy_version, text = None, policy_yaml(policy)
    tried = Evaluated.of(candidate)
    holder = Evaluated.of(champion) if champion else None

    def decide(promoted: bool, reason: str, checks: list[Check] = ()) -> Decision:
        return Decision(promoted, reason, candidate.version, champion.version if champion else None, tuple(checks),
                        tried, holder, text, policy_version)  # fmt: skip

    if champion is not None and champion.version == candidate.version:
        return decide(False, f"v{candidate.version} already is the champion")
    checks, failures = _checks(name, policy, tried, holder)
    if not tried.figures:
        return decide(False, f"candidate v{tried.version} has no evaluation figures (run the evaluation step first: "
                      f"`vdm eval --model models:/{name}/{tried.version} ...`)", checks)  # fmt: skip
    if failures:
        return decide(False, "; ".join(failures), checks)
    primary = policy.primary
    value = tried.figures[primary.metric]
    guarded = f"; guards hold ({', '.join(g.metric for g in policy.guards)})" if policy.guards else ""
    if holder is None:
        return decide(True, f"no champion yet; candidate v{tried.version} has {primary.metric}={value:.4g}{guarded}",
                      checks)  # fmt: skip
    current = holder.figures[primary.metric]
    gain = _gain(primary.direction, value, current)
    return decide(
        True,
        f"{primary.metric} {value:.4g} vs champion v{holder.version}'s {current:.4g} ({primary.direction}): improves "
        f"by {gain:.4g} > {primary.min_improvement:g}{guarded}",
        checks,
    )


def _gain(direction: str, value: float, current: float) -> float:
    return (current - value) if direction == "minimize" else (value - current)


def _checks(name: str, policy: GatePolicy, tried: Evaluated, holder: Evaluated | None) -> tuple[list[Check], list[str]]:
    """Every check of `policy` on the candidate's evaluation against the champion's (None: no
    champion), and why each failing one fails (each naming its figures)."""
    checks: list[Check] = []
    failures: list[str] = []
    them = f"candidate v{tried.version}"
    champion_uri = f"models:/{name}/{holder.version if holder else ''}"
    redo = f"re-evaluate the champion on the same set (`vdm eval --model {champion_uri} ...`)"

    def check(metric: str, role: str, mine, theirs, requirement: str, failure: str | None) -> None:
        checks.append(Check(metric, role, mine, theirs, requirement, failure is None))
        if failure:
            failures.append(failure)

    clips = tried.figures.get(CLIPS)
    if clips is None or math.isnan(clips):
        short = f"{them} does not say its evaluation size (vdm.eval.{CLIPS})" if policy.min_clips > 0 else None
    else:
        short = f"{them} was evaluated on {clips:g} clips; the policy needs at least {policy.min_clips}"
        short = short if clips < policy.min_clips else None
    check(CLIPS, "size", clips, holder.figures.get(CLIPS) if holder else None, f">= {policy.min_clips}", short)

    random = ",".join(tried.random_networks)
    refused = (
        f"{them}'s figures were measured with random-weight evaluation networks ({random}): the policy does not "
        "count them (import their weights, docs/evaluation.md)"
    )
    check("random_networks", "networks", random, ",".join(holder.random_networks) if holder else None,
          "allowed" if policy.allow_random_networks else "none",
          refused if random and not policy.allow_random_networks else None)  # fmt: skip

    if holder is not None and policy.same_protocol:
        differ = (
            f"{them} and champion v{holder.version} were not evaluated alike (protocol "
            f"{tried.protocol or 'not recorded'} vs {holder.protocol or 'not recorded'}): {redo}"
        )
        same = tried.protocol is not None and tried.protocol == holder.protocol
        requirement = "same as the champion's"
        check("protocol", "protocol", tried.protocol, holder.protocol, requirement, None if same else differ)

    rules = [(policy.primary, "primary"), *((g, "guard") for g in policy.guards)]
    for rule, role in rules:
        metric = rule.metric
        value = tried.figures.get(metric)
        current = holder.figures.get(metric) if holder else None
        if role == "primary":
            requirement = f"better by more than {rule.min_improvement:g} ({rule.direction})"
        else:
            requirement = f"not worse by more than {rule.tolerance:g} ({rule.direction})"
        if value is None:
            failure = f"{them} has no {metric} (run the evaluation step first)"
        elif math.isnan(value):
            failure = f"{them}'s {metric} is not a number: the evaluation measured nothing (see its run)"
        elif holder is None:
            failure, requirement = None, "a number (no champion yet)"
        elif current is None or math.isnan(current):
            failure = f"champion v{holder.version} has no {metric} to compare with: {redo}"
        elif role == "primary":
            gain = _gain(rule.direction, value, current)
            failure = (
                f"{metric} {value:.4g} vs champion v{holder.version}'s {current:.4g} ({rule.direction}): "
                f"improvement {gain:.4g} is not more than {rule.min_improvement:g}"
            ) if gain <= rule.min_improvement else None  # fmt: skip
        else:
            loss = -_gain(rule.direction, value, current)
            failure = (
                f"guard {metric} {value:.4g} is worse than champion v{holder.version}'s {current:.4g} by "
                f"{loss:.4g} (> {rule.tolerance:g} allowed)"
            ) if loss > rule.tolerance else None  # fmt: skip
        check(metric, role, value, current, requirement, failure)
    return checks, failures


def promote(
    name: str,
    policy: GatePolicy | None = None,
    actor: str | None = None,
    force_reason: str | None = None,
    version: str | None = None,
) -> Decision:
    """Run the gate on the model's policy (or `policy`) and record its decision on the candidate
    (tag `vdm.decision`, description); if it passes, move `champion` to the candidate and record
    the promotion (reason, who, when, the replaced champion) in its tags and the champion history.
    `force_reason`: a person moves `champion` whatever the gate says; the decision records who,
    why and what the gate said. `version`: judge that version, not the one `candidate` points at."""
    if force_reason is not None and not force_reason.strip():
        raise PromotionError("a forced promotion needs a reason (--reason TEXT): it is recorded with who forced it")
    by, at = actor or _actor(), _now()
    gate = replace(evaluate_gate(name, policy, actor=by, version=version), decided_by=by, decided_at=at)
    if gate.champion == gate.candidate:  # "already the champion" keeps its promotion's story
        return gate
    decision = gate
    if force_reason is not None:
        said = "would have promoted it" if gate.promoted else "refused"
        decision = replace(
            gate,
            promoted=True,
            reason=f"forced by {by}: {force_reason.strip()} (the gate {said}: {gate.reason})",
            forced=True,
            forced_reason=force_reason.strip(),
            gate_promoted=gate.promoted,
            gate_reason=gate.reason,
        )
    client = MlflowClient()
    client.set_model_version_tag(name, decision.candidate, DECISION, _fitted(decision))
    if not decision.promoted:
        describe_version(name, decision.candidate)
        return decision
    # Compare and set, as near as MLflow comes (it has no conditional alias update): `champion`
    # moves only if it is still the version the gate compared with, read just before the move;
    # the promotion's record follows the move.
    now = _by_alias(client, name, CHAMPION)
    if (now.version if now else None) != decision.champion:
        seen = f"v{decision.champion}" if decision.champion else "no champion"
        raise PromotionError(
            f"{name}'s champion is now {f'v{now.version}' if now else 'unset'}, not {seen} that v{decision.candidate} "
            "was judged against (another promotion or a hand move meanwhile): nothing moved; run the promotion again"
        )
    history = _history_as_found(client, name, decision.champion)
    client.set_registered_model_alias(name, CHAMPION, decision.candidate)
    tags = {
        "vdm.promotion.reason": decision.reason,
        "vdm.promotion.policy_version": str(decision.policy_version or ""),
        "vdm.promotion.forced": str(decision.forced).lower(),
        "vdm.promotion.by": by,
        "vdm.promotion.at": at,
        PREVIOUS_CHAMPION: decision.champion or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.candidate, key, value)
    how = "forced" if decision.forced else "promoted"
    history.append({"version": decision.candidate, "how": how, "by": by, "at": at})
    _save_history(client, name, history)
    describe_version(name, decision.candidate)
    return decision


def _actor() -> str:
    """Who acts (`components/registry/actor.py`), a refused login as a RegistryError."""
    try:
        return current_actor()
    except LoginError as e:
        raise RegistryError(str(e)) from None


def _fitted(decision: Decision) -> str:
    """The decision as the version tag's JSON, within MLflow's limit. The policy text fits a
    registered model's tag (5000 characters), so only many figures can overflow: then the
    figures no check reads are left out (every check keeps its values)."""
    text = decision.to_json()
    if len(text) <= VERSION_TAG_LIMIT:
        return text
    read = {c.metric for c in decision.checks}

    def checked(evaluation: Evaluated | None) -> Evaluated | None:
        if evaluation is None:
            return None
        return replace(evaluation, figures={k: v for k, v in evaluation.figures.items() if k in read})

    slim = replace(decision, candidate_evaluation=checked(decision.candidate_evaluation),
                   champion_evaluation=checked(decision.champion_evaluation))  # fmt: skip
    return slim.to_json()


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
    kept = list(history)
    while len(json.dumps(kept)) > REGISTERED_MODEL_TAG_LIMIT and len(kept) > 1:
        kept.pop(0)
    client.set_registered_model_tag(name, CHAMPION_HISTORY, json.dumps(kept))


def rollback(name: str, actor: str | None = None) -> tuple[str, str]:
    """Give `champion` back to the version that held it before the current one (from the
    champion history, which also notices a champion moved by hand in the MLflow UI); returns
    (demoted, restored) version numbers. Versions deleted since are skipped. The demoted
    version loses `candidate` too, so the next `promote` cannot make it champion again."""
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
    candidate = _by_alias(client, name, CANDIDATE)
    if candidate is not None and candidate.version == champion.version:
        client.delete_registered_model_alias(name, CANDIDATE)
    client.set_model_version_tag(name, champion.version, "vdm.rolled_back_by", actor or _actor())
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
