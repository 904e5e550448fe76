"""The kinds of model, one module each: `KINDS[name]` is the kind's `Task` (base.py says
what a task defines). A new kind is a module here with a `TASKS` tuple (found by
itself), plus its config (model/configs/<size>-<kind>.yaml) and its tests: the
training loop, `vdm finetune`, the KFP finetune pipelines, registration, evaluation and
serving all look kinds up here."""

from __future__ import annotations

import pkgutil
from importlib import import_module

from model.tasks.base import Evaluation, Metric, NoOptions, Task

# Every module of this package that defines kinds (a `TASKS` tuple); pretraining stages first.
_MODULES = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda name: name != "text_to_video")
KINDS: dict[str, Task] = {
    task.name: task for module in _MODULES for task in getattr(import_module(f"model.tasks.{module}"), "TASKS", ())
}
FINETUNES: dict[str, Task] = {name: task for name, task in KINDS.items() if task.finetune}
STAGES: dict[str, Task] = {name: task for name, task in KINDS.items() if not task.finetune}
# The served APIs (serving/service.py), each with the most general kind that answers it (its
# `Inputs`; kinds that refine it, e.g. camera-lora of text-to-video, take the same).
ENDPOINTS: dict[str, Task] = {
    endpoint: min((t for t in KINDS.values() if t.endpoint == endpoint), key=lambda t: len(type(t).__mro__))
    for endpoint in dict.fromkeys(t.endpoint for t in KINDS.values() if t.endpoint)
}


def task_of(kind: str) -> Task:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of model {kind!r}; one of {sorted(KINDS)}")
    return KINDS[kind]


__all__ = ["ENDPOINTS", "FINETUNES", "KINDS", "STAGES", "Evaluation", "Metric", "NoOptions", "Task", "task_of"]
