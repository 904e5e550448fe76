"""The promotion gate's policy, one per registered model, stored with the registry.

A policy names a primary figure the candidate must improve by more than a margin, guard
figures it must not make worse than a tolerance, the evaluation size it needs, whether
figures measured with random-weight evaluation networks count, and whether candidate and
champion must have been evaluated the same way. It is YAML (`vdm registry policy set`),
kept in the registered model's tags: `vdm.gate_policy` (the current text),
`vdm.gate_policy_version` (1, 2, ...) and every version as `vdm.gate_policy.v<N>` with who
set it, when and why. A model without one gets its kind's default (`default_policy`),
stored as version 1 by the first gate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import yaml
from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.registry.actor import current_actor

POLICY, POLICY_VERSION = "vdm.gate_policy", "vdm.gate_policy_version"
# MLflow keeps registered-model tags in a VARCHAR(5000) column (PostgreSQL enforces it; the
# API's own limit, 100 000, is for version tags): a stored version must fit in it.
REGISTERED_MODEL_TAG_LIMIT = 5000


class PolicyError(ValueError):
    """A policy that is not valid YAML or has a wrong field; the message is one line naming it."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    metric: str = Field(min_length=1)  # a vdm.eval.* figure of the versions
    direction: Literal["minimize", "maximize"]


class PrimaryRule(_Rule):
    """The figure that must get better: by more than `min_improvement` (its units)."""

    min_improvement: float = Field(ge=0.0)


class GuardRule(_Rule):
    """A figure that must not get worse than the champion's by more than `tolerance` (its units)."""

    tolerance: float = Field(ge=0.0)


class GatePolicy(BaseModel):
    """What the gate requires of a candidate against the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: PrimaryRule
    guards: tuple[GuardRule, ...] = ()
    min_clips: int = Field(ge=0)  # the version's vdm.eval.clips
    allow_random_networks: bool = False  # figures from random-weight evaluation networks (vdm.eval_random_networks)
    same_protocol: bool = True  # candidate and champion evaluated alike (vdm.eval_protocol)

    @model_validator(mode="after")
    def _one_rule_per_figure(self) -> GatePolicy:
        metrics = [self.primary.metric, *(g.metric for g in self.guards)]
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named twice: a figure is the primary or one guard")
        return self


def parse_policy(text: str) -> GatePolicy:
    """The policy in YAML `text`; a PolicyError (one line, naming the field) if it is not one."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"the gate policy is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise PolicyError("a gate policy is a YAML mapping: primary, guards, min_clips, allow_random_networks, "
                          "same_protocol (docs/evaluation.md)")  # fmt: skip
    try:
        return GatePolicy.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            # A rule across fields (a figure named twice) has no location: it is about the guards.
            field = ".".join(str(part) for part in error["loc"]) or "guards"
            message = error["msg"].removeprefix("Value error, ")
            shown = error["loc"] and error["type"] not in ("missing", "model_type")
            given = f" (got {error['input']!r})" if shown else ""
            problems.append(f"{field}: {message}{given}")
        raise PolicyError(f"gate policy field {'; '.join(problems)}") from None


def policy_yaml(policy: GatePolicy) -> str:
    """The policy as YAML, one line per rule (what `vdm registry policy show` prints for a default)."""

    def flow(rule: _Rule) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in rule.model_dump().items()) + "}"

    lines = [f"primary: {flow(policy.primary)}"]
    lines += ["guards:", *(f"  - {flow(g)}" for g in policy.guards)] if policy.guards else ["guards: []"]
    lines += [
        f"min_clips: {policy.min_clips}",
        f"allow_random_networks: {str(policy.allow_random_networks).lower()}",
        f"same_protocol: {str(policy.same_protocol).lower()}",
    ]
    return "\n".join(lines) + "\n"


# Starting margins a team would use, in each figure's units. FVD is in the hundreds for current
# models and its estimate over a few hundred clips moves by a few units with the sample: a gain
# must be above that (5), and a finetune may cost at most twice it (10). CLIP text-video scores
# of published models differ by about 0.005, LAION aesthetic scores (1-10) by about 0.1: losing
# more is a visible step back. The motion figure is a relative speed error that is noisy on real
# footage, so as a guard it only catches a model whose videos stop moving right (0.15).
FVD_MARGIN, FVD_TOLERANCE = 5.0, 10.0
CLIP_SCORE_TOLERANCE, AESTHETIC_TOLERANCE, MOTION_TOLERANCE = 0.005, 0.1, 0.15
# FVD's bias falls with the number of clips; below a few hundred, two models' FVDs are not comparable.
MIN_CLIPS_WITH_FVD, MIN_CLIPS = 256, 64


def default_policy(kind: str, demo: bool = False) -> GatePolicy:
    """The policy a model of `kind` starts with (model/tasks says its own figure and guard).

    Kinds that generate whole videos from text or an image (text-to-video stages,
    image-to-video, and the temporal decoder, a new version of a text-to-video model) are
    judged by FVD, guarded by the CLIP score (text kinds), the aesthetic score and their
    motion figure; Stage I (images) by the CLIP score and the aesthetic score; the other
    finetunes by their own figure, guarded by FVD where the held-out clips are its reference
    and by the kind's guard. The kinds' own figures are measured on the same clips and seeds
    for both versions, so any gain counts (margin 0).

    `demo`: a tiny test or demo model (random weights): its own figure (the motion figures
    on synthetic data), its guard, any evaluation size, random evaluation networks allowed
    (FVD with random networks means nothing), and no protocol match, since a demo run curates
    fresh synthetic clips each time."""
    from model.tasks import task_of
    from model.tasks.base import MOTION_SPEED_ERROR

    task = task_of(kind)
    own = PrimaryRule(metric=task.metric.name, direction=task.metric.direction, min_improvement=0.0)
    own_guard = (
        [GuardRule(metric=task.guard.name, direction=task.guard.direction, tolerance=task.guard_tolerance)]
        if task.guard
        else []
    )
    if demo:
        return GatePolicy(primary=own, guards=own_guard, min_clips=1, allow_random_networks=True, same_protocol=False)
    clip_score = GuardRule(metric="clip_score", direction="maximize", tolerance=CLIP_SCORE_TOLERANCE)
    aesthetic = GuardRule(metric="aesthetic", direction="maximize", tolerance=AESTHETIC_TOLERANCE)
    text = [clip_score] if task.conditioning == "text" else []
    if not task.video:
        primary = PrimaryRule(metric="clip_score", direction="maximize", min_improvement=0.0)
        return GatePolicy(primary=primary, guards=[aesthetic], min_clips=MIN_CLIPS_WITH_FVD)
    if task.metric == MOTION_SPEED_ERROR:  # no figure of its own: a generator of whole videos
        fvd = PrimaryRule(metric="fvd", direction="minimize", min_improvement=FVD_MARGIN)
        motion = GuardRule(metric=MOTION_SPEED_ERROR.name, direction="minimize", tolerance=MOTION_TOLERANCE)
        return GatePolicy(primary=fvd, guards=[*text, aesthetic, motion], min_clips=MIN_CLIPS_WITH_FVD)
    # FVD's reference is curation's held-out split; a kind evaluated on other data (multi-view's
    # rendered orbits) has none.
    if "/curated/" in task.evaluation_data:
        fvd_guard = GuardRule(metric="fvd", direction="minimize", tolerance=FVD_TOLERANCE)
        return GatePolicy(primary=own, guards=[fvd_guard, *own_guard], min_clips=MIN_CLIPS_WITH_FVD)
    return GatePolicy(primary=own, guards=own_guard, min_clips=MIN_CLIPS)


@dataclass(frozen=True)
class PolicyRecord:
    """One stored version of a model's policy: its text, who set it, when, and a note (a default's kind)."""

    version: int
    text: str
    by: str
    at: str
    note: str

    @property
    def policy(self) -> GatePolicy:
        return parse_policy(self.text)


def _key(version: int) -> str:
    return f"{POLICY}.v{version}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def set_policy(name: str, policy: GatePolicy | str, actor: str | None = None, note: str = "") -> PolicyRecord:
    """Store `policy` (a GatePolicy, or YAML text kept as written, comments included) as the
    model's next policy version; earlier versions stay. A PolicyError if it is not valid."""
    text = policy if isinstance(policy, str) else policy_yaml(policy)
    parse_policy(text)
    client = MlflowClient()
    current = client.get_registered_model(name).tags.get(POLICY_VERSION)
    record = PolicyRecord(int(current or 0) + 1, text, actor or current_actor(), _now(), note)
    stored = json.dumps({"text": record.text, "by": record.by, "at": record.at, "note": record.note})
    if len(stored) > REGISTERED_MODEL_TAG_LIMIT:
        raise PolicyError(
            f"the gate policy is {len(text)} characters; MLflow keeps at most about "
            f"{REGISTERED_MODEL_TAG_LIMIT - 200} in a registered model's tag (shorten its comments)"
        )
    client.set_registered_model_tag(name, _key(record.version), stored)
    client.set_registered_model_tag(name, POLICY, text)
    client.set_registered_model_tag(name, POLICY_VERSION, str(record.version))
    return record


def _record(tags: dict[str, str], version: int) -> PolicyRecord | None:
    stored = tags.get(_key(version))
    if stored is None:
        return None
    saved = json.loads(stored)
    return PolicyRecord(version, saved["text"], saved["by"], saved["at"], saved.get("note", ""))


def policy_record(name: str, version: int | None = None) -> PolicyRecord | None:
    """A stored version of the model's policy (default: the current one); None if there is none."""
    tags = MlflowClient().get_registered_model(name).tags
    if version is None and POLICY_VERSION not in tags:
        return None
    return _record(tags, int(tags[POLICY_VERSION]) if version is None else version)


def get_policy(name: str) -> tuple[GatePolicy, int] | None:
    """The model's current policy and its version; None if none is stored yet."""
    record = policy_record(name)
    return (record.policy, record.version) if record else None


def policy_history(name: str) -> list[PolicyRecord]:
    """Every stored version of the model's policy, oldest first."""
    tags = MlflowClient().get_registered_model(name).tags
    versions = sorted(int(k.removeprefix(f"{POLICY}.v")) for k in tags if k.startswith(f"{POLICY}.v"))
    return [r for r in (_record(tags, v) for v in versions) if r is not None]
