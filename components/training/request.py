"""The typed contract of a training run, both ways: a `TrainingRequest` travels from the
KFP step (or the CLI) through TorchX to every rank, and the `RunResult` comes back
(rank 0 writes it to `result_uri`, else `<output>/result.json`, which a launcher that cannot
see the ranks, TorchX on a cluster, reads)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainingRequest:
    kind: str  # a pretraining stage (image, video, hq) or a finetune kind (model/tasks)
    data: str  # s3:// prefix or folder of shards
    output: str  # s3:// prefix for checkpoints, the final model and result.json
    config: str = "tiny"  # a shipped config name or a YAML file
    init_from: str | None = None  # a model folder, s3:// or models:/NAME@ALIAS
    vae: str | None = None  # a diffusers VAE folder (s3:// or local)
    # Config fields to replace: max_steps, strategy, data (the format), a kind's run options.
    overrides: dict[str, Any] = field(default_factory=dict)
    register_as: str | None = None  # the registered model to add the result to (None: not registered)
    resume: bool = False  # continue from the newest complete checkpoint under `output`, if this run's
    # The run this is (a KFP run's id; None: a CLI run): recorded in its checkpoints, which only it resumes.
    run_id: str | None = None
    resume_from: str | None = None  # a checkpoint folder (s3://) to continue from, of any run: named on purpose
    result_uri: str | None = None  # where rank 0 writes the RunResult (None: <output>/result.json)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingRequest:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunResult:
    steps: int
    final: str | None  # the published model folder (None on ranks other than 0)
    registered: str | None = None  # models:/NAME/VERSION, the new candidate
    mlflow_run: str | None = None  # the run's URL in the MLflow UI
    mlflow_run_id: str | None = None
    resumed_from: str | None = None  # the checkpoint the run continued from
    metrics: dict[str, float] = field(default_factory=dict)  # a run's closing figures, where it has some
    losses: list[float] = field(default_factory=list, compare=False)  # this process's steps; not in result.json

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "losses"}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunResult:
        return cls(**json.loads(text))

    def lines(self, what: str) -> list[str]:
        """What a run prints when it ends (rank 0)."""
        resumed = f" (resumed from {self.resumed_from})" if self.resumed_from else ""
        lines = [f"\nvdm {what}: done at step {self.steps}{resumed}", f"  final       {self.final}"]
        lines.append(f"  mlflow_run  {self.mlflow_run}")
        if self.registered:
            lines.append(f"  registered  {self.registered} (alias candidate)")
        return lines
