"""Distributed training through TorchX: a `TrainingRequest` run by every rank
(`components.training.entrypoint` under torchrun) on `nodes` x `procs_per_node` ranks,
on this machine (`local_cwd`) or a cluster (`kubernetes`: a Volcano job in `queue`).
The trainer's output streams into the caller's log (a KFP step's log); a failed rank
fails the launch with its error lines. The KFP training steps always resume: a retried
step continues from the last published checkpoint (a first attempt finds none and
starts fresh)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torchx.components.dist import torchrun
from torchx.runner import get_runner
from torchx.specs import AppState

from components.common.settings import load_settings
from components.training.request import RunResult, TrainingRequest

RANK_ERROR = re.compile(r"^\[\d+\]:(error: |[\w.]*(Error|Exception): )")


# What the trainer pods need from the launching step's environment (Secrets and
# ConfigMap values the KFP step received as env vars).
FORWARDED_ENV = (
    "VDM_S3_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "VDM_DATA_BUCKET",
    "VDM_MLFLOW_BUCKET",
    "VDM_IMAGE",
)


class TrainingLaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Launch:
    scheduler: str = "local_cwd"  # or "kubernetes"
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpu: int = 2
    memory_mb: int = 8192
    image: str = field(default_factory=lambda: load_settings().image)  # kubernetes only; local_cwd: this env
    queue: str = "vdm-training"  # Volcano queue (kubernetes)
    env: dict[str, str] = field(default_factory=dict)


def launch_training(request: TrainingRequest, launch: Launch, log: Callable[[str], None] = print) -> None:
    """Run `request` on every rank; returns when all ranks succeeded."""
    env = dict(launch.env)
    if launch.scheduler == "local_cwd":  # this environment's torchrun, even when its bin/ is not on PATH
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    app = torchrun(
        request.to_json(),
        m="components.training.entrypoint",
        name=f"vdm-{request.kind}",
        image=launch.image,
        j=f"{launch.nodes}x{launch.procs_per_node}",
        gpu=launch.gpus_per_node,
        cpu=launch.cpu,
        memMB=launch.memory_mb,
        env=env,
    )
    cfg = {"queue": launch.queue} if launch.scheduler == "kubernetes" else {}
    runner = get_runner()
    handle = runner.run(app, launch.scheduler, cfg)
    tail: list[str] = []
    for line in runner.log_lines(handle, app.roles[0].name, k=0, should_tail=True):
        line = line.rstrip("\n")
        log(line)
        tail = (tail + [line])[-400:]
    status = runner.wait(handle, wait_interval=1)
    if status is None or status.state != AppState.SUCCEEDED:
        state = status.state.name if status else "UNKNOWN"
        # A rank's own error: `[rank]:error: ...` (the CLI's) or `[rank]:SomeError: ...` (a traceback's last line).
        errors = [line for line in tail if RANK_ERROR.match(line)] or tail[-10:]
        raise TrainingLaunchError(f"training {handle} ended {state}:\n" + "\n".join(errors))


def launch_step(
    request: TrainingRequest, scheduler: str, nodes: int, procs_per_node: int, gpus_per_node: int
) -> RunResult:
    """A KFP training step's work: `request`, resumed from any checkpoint, through TorchX with
    the step's platform environment forwarded to the ranks, then the result rank 0 wrote to
    `<output>/result.json` (final folder, registered model, MLflow run)."""
    from components.common.objectstore import ObjectStore, S3Uri
    from components.training.run import RESULT

    settings = load_settings()
    launch = Launch(
        scheduler=scheduler,
        nodes=nodes,
        procs_per_node=procs_per_node,
        gpus_per_node=gpus_per_node,
        image=settings.image,
        env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    )
    launch_training(replace(request, resume=True), launch)
    store = ObjectStore.from_settings(settings)
    return RunResult.from_json(store.get_bytes(S3Uri.parse(request.output).join(RESULT)))
