"""A training step's Model artifact, filled from its run's result. Plain Python (kfp's
artifact type only): the step's body imports it, and inside a step kfp.dsl is its runtime
part only, so a module that defines components cannot be imported there."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kfp.dsl import Model

from components.training.request import RunResult


def describe_model(model: Model, result: RunResult) -> None:
    """Fill a step's Model artifact from its RunResult: metadata (where the model is, its
    registered name and version, the run) and a JSON pointer file with the same."""
    model.metadata.update({k: v for k, v in asdict(result).items() if v not in (None, [], {}) and k != "losses"})
    model.metadata["uri"] = result.final
    if result.registered:  # models:/NAME/VERSION
        name, version = result.registered.removeprefix("models:/").rsplit("/", 1)
        model.metadata.update({"registered_name": name, "registered_version": version})
    Path(model.path).write_text(json.dumps(dict(model.metadata), indent=1, sort_keys=True))
