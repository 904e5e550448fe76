"""The kinds of model, one module each: `KINDS[name]` is the kind's `Task` (base.py says
what a task defines). A new kind is a module here with a `TASKS` tuple, named in
`_MODULES`, plus its config (model/configs/<size>-<kind>.yaml) and its tests: the
training loop, `vdm finetune`, the KFP finetune pipelines, registration, evaluation and
serving all look kinds up here."""

from __future__ import annotations

from importlib import import_module

from model.tasks.base import Evaluation, Metric, NoOptions, Task

_MODULES = (
    "text_to_video",
    "image_to_video",
    "camera_lora",
    "interpolation",
    "prediction",
    "multiview",
    "spatial_hq",
    "temporal_decoder",
)
KINDS: dict[str, Task] = {
    task.name: task for module in _MODULES for task in import_module(f"model.tasks.{module}").TASKS
}
FINETUNES: dict[str, Task] = {name: task for name, task in KINDS.items() if task.finetune}
STAGES: dict[str, Task] = {name: task for name, task in KINDS.items() if not task.finetune}
# The served APIs (serving/service.py), each with the first kind that answers it (its `Inputs`).
ENDPOINTS: dict[str, Task] = {}
for _task in KINDS.values():
    if _task.endpoint:
        ENDPOINTS.setdefault(_task.endpoint, _task)


def task_of(kind: str) -> Task:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of model {kind!r}; one of {sorted(KINDS)}")
    return KINDS[kind]


__all__ = ["ENDPOINTS", "FINETUNES", "KINDS", "STAGES", "Evaluation", "Metric", "NoOptions", "Task", "task_of"]
