"""Distributed training through TorchX: a `TrainingRequest` run by every rank
(`components.training.entrypoint` under torchrun) on `nodes` x ranks-per-node, one rank
per GPU (one CPU rank without GPUs), on this machine (`local_cwd`, one node) or a cluster
(`kubernetes`: a Volcano job in `queue` whose pods request the GPUs, CPU, memory and
/dev/shm of the `Launch`). The trainer's output streams into the caller's log (a KFP
step's log); a failed rank fails the launch with its error lines. The KFP training steps
always resume: a retried step continues from the last checkpoint its run published (a first
attempt finds none and starts fresh); each attempt reads back the result it wrote itself, under
`<output>/attempts/<attempt id>/`."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torchx.components.dist import torchrun
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppDryRunInfo, AppState
from torchx.specs.overlays import JOIN, set_overlay

from components.common.settings import load_settings
from components.training.request import RunResult, TrainingRequest

if TYPE_CHECKING:
    from kubernetes.client import V1Pod

RANK_ERROR = re.compile(r"^\[\d+\]:(error: |[\w.]*(Error|Exception): )")


# What the trainer pods need from the launching step's environment (the ConfigMap values
# the KFP step received as env vars).
FORWARDED_ENV = (
    "VDM_S3_ENDPOINT",
    "MLFLOW_TRACKING_URI",
    "VDM_DATA_BUCKET",
    "VDM_MLFLOW_BUCKET",
    "VDM_IMAGE",
    "VDM_S3_RETRY_SECONDS",
)
# The credentials, by variable: (Secret, key). Local ranks get the launching process's values; a
# pod reads each from the Secret in its namespace (secretKeyRef), so no job spec holds a secret.
S3_SECRET = "vdm-s3-credentials"  # the pipelines' S3 user (k8s/; see k8s/README.md)
MLFLOW_SECRET = "vdm-mlflow-credentials"  # their MLflow user (MLflow's basic-auth app)
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": (S3_SECRET, "AWS_ACCESS_KEY_ID"),
    "AWS_SECRET_ACCESS_KEY": (S3_SECRET, "AWS_SECRET_ACCESS_KEY"),
    "MLFLOW_TRACKING_USERNAME": (MLFLOW_SECRET, "MLFLOW_TRACKING_USERNAME"),
    "MLFLOW_TRACKING_PASSWORD": (MLFLOW_SECRET, "MLFLOW_TRACKING_PASSWORD"),
}
# Where Volcano training jobs run (k8s/base/training): Pod Security `restricted`, its own Secrets.
TRAINING_NAMESPACE = "vdm-training"
# The project image's user (Containerfile); writable folders of a read-only root filesystem.
IMAGE_UID = 10001
WRITABLE = {"tmp": "/tmp", "home": "/home/vdm"}

# How a GPU pod is scheduled: the same as the pipelines' GPU steps (pipelines/kubeflow.py GPUStep).
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
SHM_VOLUME = "dshm"  # TorchX's memory-backed /dev/shm volume in every pod it renders

_CPU = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m?)$")
_MEMORY = re.compile(r"^(\d+(\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
_MEMORY_UNITS = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


class TrainingLaunchError(RuntimeError):
    pass


def parse_cpu(quantity: str | float) -> float:
    """A Kubernetes CPU quantity ("32", "0.5", "500m") in CPUs."""
    text = str(quantity).strip()
    match = _CPU.match(text)
    if not match:
        raise ValueError(f"CPU {quantity!r}: not a Kubernetes CPU quantity (e.g. 32, 0.5, 500m)")
    value = float(match.group(1))
    return value / 1000 if match.group(3) else value


def parse_memory_mb(quantity: str | int) -> int:
    """A Kubernetes memory quantity ("256G", "512Gi", "8000M") in the megabytes (10^6 bytes)
    TorchX writes into a pod as `<memMB>M`, rounded down."""
    text = str(quantity).strip()
    match = _MEMORY.match(text)
    if not match:
        raise ValueError(f"memory {quantity!r}: not a Kubernetes memory quantity (e.g. 256G, 512Gi)")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(3)]) // 10**6


def parse_count(value: str | int, what: str) -> int:
    """A count from a run form ("8", 8, "8.0": KFP numbers can arrive as floats)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = -1.0
    if number < 0 or number != int(number):
        raise ValueError(f"{what} {value!r}: not a whole number >= 0")
    return int(number)


@dataclass(frozen=True)
class Launch:
    scheduler: str = "local_cwd"  # or "kubernetes"
    nodes: int = 1  # more than one: kubernetes only
    gpus_per_node: int = 0
    procs_per_node: int = 0  # ranks per node; 0: one per GPU (one CPU rank without GPUs)
    cpu: float = 2  # per node (kubernetes: the pod's request and limit)
    memory_mb: int = 8192  # per node, in 10^6 bytes (kubernetes: the pod's request and limit)
    shm: str = ""  # kubernetes: size limit of the pod's memory-backed /dev/shm; "": none but the memory
    image: str = field(default_factory=lambda: load_settings().image)  # kubernetes only; local_cwd: this env
    queue: str = "vdm-training"  # Volcano queue (kubernetes)
    namespace: str = TRAINING_NAMESPACE  # kubernetes
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: at least 1")
        if self.nodes > 1 and self.scheduler != "kubernetes":
            raise ValueError(
                f"nodes={self.nodes} needs scheduler=kubernetes: {self.scheduler} runs every rank on one "
                "node (the training step's own pod)"
            )
        if self.gpus_per_node < 0 or self.procs_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node}, procs_per_node={self.procs_per_node}: >= 0")
        if self.gpus_per_node and self.procs_per_node not in (0, self.gpus_per_node):
            raise ValueError(
                f"procs_per_node={self.procs_per_node} with gpus_per_node={self.gpus_per_node}: "
                "one rank per GPU (leave procs_per_node 0)"
            )
        if self.shm and not _MEMORY.match(self.shm):
            raise ValueError(f"shm {self.shm!r}: not a Kubernetes memory quantity (e.g. 64Gi)")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


def node_launch(
    scheduler: str, nodes: int, gpus_per_node: str | int, cpu_per_node: str, memory_per_node: str,
    shm_per_node: str = "", **kwargs,
) -> Launch:  # fmt: skip
    """The `Launch` of a KFP training step from its run-form values (Kubernetes quantities as
    strings, the form KFP resolves into a pod's resources): one rank per GPU."""
    return Launch(
        scheduler=scheduler,
        nodes=parse_count(nodes, "nodes"),
        gpus_per_node=parse_count(gpus_per_node, "gpus_per_node"),
        cpu=parse_cpu(cpu_per_node),
        memory_mb=parse_memory_mb(memory_per_node),
        shm=str(shm_per_node).strip(),
        **kwargs,
    )


def training_app(request: TrainingRequest, launch: Launch) -> AppDef:
    """The TorchX app of `request` under `launch`: torchrun with `nodes` x ranks-per-node; on
    kubernetes every pod (one per node) requests the GPUs, CPU and memory, tolerates and selects
    GPU nodes like the pipelines' GPU steps, and sizes its /dev/shm."""
    env = dict(launch.env)
    if launch.scheduler == "local_cwd":  # this environment's torchrun, even when its bin/ is not on PATH
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    app = torchrun(
        request.to_json(),
        m="components.training.entrypoint",
        name=f"vdm-{request.kind}",
        image=launch.image,
        j=f"{launch.nodes}x{launch.ranks_per_node}",
        gpu=launch.gpus_per_node,
        cpu=launch.cpu,
        memMB=launch.memory_mb,
        env=env,
    )
    pod: dict = {}
    if launch.gpus_per_node:
        key, value = GPU_NODE_SELECTOR
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        pod["nodeSelector"] = {key: value}
    if launch.shm:  # TorchX mounts an unlimited memory-backed /dev/shm; bound it
        pod[JOIN("volumes", on="name")] = [
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": launch.shm}}
        ]
    if pod:
        for role in app.roles:
            set_overlay(role, "kubernetes", "V1Pod", {"spec": pod})
    return app


def restrict(pod: V1Pod) -> None:
    """Make a rendered training pod what Pod Security `restricted` admits, with a read-only root
    filesystem (emptyDirs where programs write) and its credentials by reference to the Secrets
    of its namespace. TorchX's AppDef has no field for any of these."""
    from kubernetes.client import models as k8s

    pod.spec.security_context = k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=IMAGE_UID,
        run_as_group=0,
        fs_group=IMAGE_UID,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )
    pod.spec.volumes = [
        *(pod.spec.volumes or []),
        *(k8s.V1Volume(name=name, empty_dir=k8s.V1EmptyDirVolumeSource()) for name in WRITABLE),
    ]
    for container in pod.spec.containers:
        container.security_context = k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        )
        container.volume_mounts = [
            *(container.volume_mounts or []),
            *(k8s.V1VolumeMount(name=name, mount_path=path) for name, path in WRITABLE.items()),
        ]
        container.env = [
            *(container.env or []),
            *(
                k8s.V1EnvVar(
                    name=name,
                    value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=secret, key=key)),
                )
                for name, (secret, key) in SECRET_ENV.items()
            ),
        ]


def submission(
    request: TrainingRequest, launch: Launch, runner: Runner | None = None, *, validate: bool = True
) -> AppDryRunInfo:
    """What `launch_training` submits: TorchX's rendering of the app (on kubernetes, the Volcano
    job with every pod `restrict`ed; `validate`: checked by the API server's dry run)."""
    cfg = scheduler_cfg(launch) | ({} if validate or launch.scheduler != "kubernetes" else {"validate_spec": False})
    info = (runner or get_runner()).dryrun(training_app(request, launch), launch.scheduler, cfg)
    if launch.scheduler == "kubernetes":
        for task in info.request.resource["spec"]["tasks"]:
            restrict(task["template"])
    return info


def scheduler_cfg(launch: Launch) -> dict:
    """TorchX run options. On kubernetes, no reservation is subtracted: TorchX by default requests
    100m CPU and 1024M memory less than the limit (room for the kubelet when a pod asks for a
    whole host); here request = limit = the `Launch`'s figures, as in the pipelines' own steps."""
    if launch.scheduler != "kubernetes":
        return {}
    return {"queue": launch.queue, "namespace": launch.namespace, "reserved_millicpu": 0, "reserved_memmb": 0}


def launch_training(request: TrainingRequest, launch: Launch, log: Callable[[str], None] = print) -> None:
    """Run `request` on every rank; returns when all ranks succeeded."""
    runner = get_runner()
    info = submission(request, launch, runner)
    app = info.app
    handle = runner.schedule(info)
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


def forwarded_env(scheduler: str) -> dict[str, str]:
    """The launching process's variables the ranks get as values: the configuration, and the
    credentials too where the ranks run here (a pod reads those from its Secrets)."""
    names = FORWARDED_ENV if scheduler == "kubernetes" else (*FORWARDED_ENV, *SECRET_ENV)
    return {k: os.environ[k] for k in names if k in os.environ}


def launch_step(
    request: TrainingRequest, scheduler: str, nodes: int, gpus_per_node: str, cpu_per_node: str,
    memory_per_node: str, shm_per_node: str = "",
) -> RunResult:  # fmt: skip
    """A KFP training step's work: `request`, resumed from any checkpoint, through TorchX on
    `nodes` x `gpus_per_node` ranks (one CPU rank without GPUs) with the step's platform
    environment forwarded to the ranks, then the result rank 0 wrote to
    `<output>/attempts/<attempt id>/result.json` (final folder, registered model, MLflow run):
    this attempt's own, never one an earlier attempt left."""
    import uuid

    from components.common.objectstore import ObjectStore, S3Uri
    from components.training.run import RESULT

    settings = load_settings()
    launch = node_launch(
        scheduler, nodes, gpus_per_node, cpu_per_node, memory_per_node, shm_per_node,
        image=settings.image, env=forwarded_env(scheduler),
    )  # fmt: skip
    print(
        f"launch: {launch.scheduler}, {launch.nodes} node(s) x {launch.ranks_per_node} rank(s), "
        f"{launch.gpus_per_node} GPU(s), {launch.cpu:g} CPU, {launch.memory_mb}M memory per node",
        flush=True,
    )
    result_uri = S3Uri.parse(request.output).join("attempts", uuid.uuid4().hex, RESULT)
    launch_training(replace(request, resume=True, result_uri=str(result_uri)), launch)
    store = ObjectStore.from_settings(settings)
    return RunResult.from_json(store.get_bytes(result_uri))
