"""What a training step submits with `scheduler=kubernetes`: the Volcano job TorchX renders
(its dry run, no cluster) from the step's run-form values. One pod per node, one rank per
GPU, each pod requesting exactly the GPUs, CPU and memory the run form gives (TorchX's
kubelet reservation is not subtracted), scheduled on GPU nodes like the pipelines' GPU
steps, with a memory-backed /dev/shm of the given size. And what is refused: several
nodes without kubernetes, ranks that do not match the GPUs, malformed quantities."""

from __future__ import annotations

import re
import shlex

import pytest
from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

from components.training import launch
from components.training.request import TrainingRequest
from pipelines.kubeflow import GPU_STEP

REQUEST = TrainingRequest("hq", "s3://vdm/data/", "s3://vdm/runs/s3", config="tiny", init_from="s3://vdm/runs/s2")
UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str) -> float:
    """A Kubernetes quantity as a number (bytes, CPUs)."""
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * UNITS[unit]


def volcano_job(step: launch.Launch) -> dict:
    """The Volcano job `launch_training` would submit for `step` (TorchX's dry run; the API
    server's validation, which needs a cluster, left out)."""
    assert step.scheduler == "kubernetes"
    return sanitize_for_serialization(launch.submission(REQUEST, step, validate=False).request.resource)


def pods(job: dict) -> list[dict]:
    assert all(task["replicas"] == 1 for task in job["spec"]["tasks"])
    return [task["template"]["spec"] for task in job["spec"]["tasks"]]


def torchrun_option(pod: dict, option: str) -> str:
    args = shlex.split(pod["containers"][0]["command"][-1])
    return args[args.index(option) + 1]


def step_launch(scheduler="kubernetes", nodes=1, gpus="8", cpu="32", memory="256G", shm="64Gi") -> launch.Launch:
    """As `launch_step` builds it from a KFP step's inputs."""
    return launch.node_launch(scheduler, nodes, gpus, cpu, memory, shm, image="vdm-platform:test", env={"K": "v"})


@pytest.mark.parametrize("nodes", [1, 2])
def test_every_pod_requests_the_run_forms_gpus_cpu_memory_and_runs_one_rank_per_gpu(nodes):
    job = volcano_job(step_launch(nodes=nodes, gpus="8", cpu="32", memory="256G"))
    assert job["kind"] == "Job" and job["spec"]["queue"] == "vdm-training"
    assert len(pods(job)) == nodes  # one pod per node
    for pod in pods(job):
        (container,) = pod["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]  # no reservation subtracted: exactly the run form's
        assert resources["limits"][GPU_STEP.accelerator] == "8"
        assert quantity(resources["limits"]["cpu"]) == quantity("32")
        assert quantity(resources["limits"]["memory"]) == quantity("256G")
        assert torchrun_option(pod, "--nproc_per_node") == "8" and torchrun_option(pod, "--nnodes") == str(nodes)
        assert {"name": "K", "value": "v"} in container["env"]
        assert container["image"] == "vdm-platform:test"


def test_the_pods_schedule_on_gpu_nodes_like_the_pipelines_gpu_steps_with_a_sized_dev_shm():
    (pod,) = pods(volcano_job(step_launch(gpus="4", shm="32Gi")))
    assert {"key": GPU_STEP.accelerator, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == dict([GPU_STEP.node_selector])
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert torchrun_option(pod, "--nproc_per_node") == "4"


def test_without_gpus_a_pod_runs_one_cpu_rank_anywhere_with_an_unbounded_dev_shm():
    (pod,) = pods(volcano_job(step_launch(gpus="0", cpu="4", memory="16Gi", shm="")))
    resources = pod["containers"][0]["resources"]
    assert GPU_STEP.accelerator not in resources["limits"] and GPU_STEP.accelerator not in resources["requests"]
    assert torchrun_option(pod, "--nproc_per_node") == "1"
    assert not pod.get("tolerations") and not pod.get("nodeSelector")
    assert quantity(resources["limits"]["cpu"]) == 4
    assert 0 <= quantity("16Gi") - quantity(resources["limits"]["memory"]) < 1e6  # rounded down to TorchX's M
    (volume,) = [v for v in pod["volumes"] if v["name"] == launch.SHM_VOLUME]
    assert volume["emptyDir"] == {"medium": "Memory"}  # TorchX's own: memory_per_node bounds it


@pytest.mark.parametrize(
    ("cpu", "cpus", "memory", "megabytes"),
    [
        ("32", 32, "256G", 256_000),
        ("500m", 0.5, "8000M", 8000),
        ("1.5", 1.5, "512Gi", 549_755),
        (8, 8, "1Ti", 1_099_511),
    ],
)
def test_run_form_quantities_become_torchx_figures(cpu, cpus, memory, megabytes):
    step = step_launch(cpu=cpu, memory=memory)
    assert (step.cpu, step.memory_mb) == (cpus, megabytes)


def test_a_kfp_number_arriving_as_a_float_still_counts():
    assert step_launch(nodes=2.0, gpus="8.0").ranks_per_node == 8
    assert step_launch(nodes=2.0, gpus=8.0).nodes == 2


@pytest.mark.parametrize("scheduler", ["local_cwd", "local_docker"])
def test_several_nodes_need_the_kubernetes_scheduler(scheduler):
    with pytest.raises(ValueError, match="nodes=2 needs scheduler=kubernetes"):
        step_launch(scheduler=scheduler, nodes=2)


def test_one_node_in_the_steps_pod_runs_one_rank_per_gpu():
    step = step_launch(scheduler="local_cwd", gpus="8")
    app = launch.training_app(REQUEST, step)
    (role,) = app.roles
    assert role.num_replicas == 1 and role.resource.gpu == 8
    args = shlex.split(role.args[-1])
    assert args[args.index("--nproc_per_node") + 1] == "8" and args[args.index("--nnodes") + 1] == "1"
    assert launch.scheduler_cfg(step) == {}
    assert step_launch(scheduler="local_cwd", gpus="0").ranks_per_node == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": "two"}, "gpus_per_node 'two'"),
        ({"gpus": "-1"}, "gpus_per_node '-1'"),
        ({"gpus": "1.5"}, "gpus_per_node '1.5'"),
        ({"cpu": "32 cores"}, "CPU '32 cores'"),
        ({"memory": "256GB"}, "memory '256GB'"),
        ({"shm": "lots"}, "shm 'lots'"),
        ({"nodes": 0}, "nodes=0"),
    ],
)
def test_malformed_run_form_values_are_refused_before_anything_starts(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        step_launch(**kwargs)


def test_ranks_follow_the_gpus():
    with pytest.raises(ValueError, match="one rank per GPU"):
        launch.Launch(gpus_per_node=8, procs_per_node=1, image="x")
    assert launch.Launch(gpus_per_node=8, image="x").ranks_per_node == 8
    assert launch.Launch(procs_per_node=2, image="x").ranks_per_node == 2  # CPU ranks (the local tests)


@pytest.mark.parametrize("nodes", [1, 2])
def test_pods_run_restricted_in_the_training_namespace_with_credentials_only_by_reference(nodes, monkeypatch):
    for name in launch.SECRET_ENV:
        monkeypatch.setenv(name, f"secret-value-of-{name}")
    step = launch.node_launch("kubernetes", nodes, "8", "32", "256G", "64Gi", image="vdm-platform:test",
                              env=launch.forwarded_env("kubernetes"))  # fmt: skip
    assert launch.scheduler_cfg(step)["namespace"] == "vdm-training"
    job = volcano_job(step)
    assert "secret-value-of" not in str(job)  # no credential in the job spec
    for pod in pods(job):
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 0, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }  # fmt: skip
        (container,) = pod["containers"]  # the overlay merged into TorchX's container, added none
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        }  # fmt: skip
        references = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert references == {
            name: {"name": secret, "key": key} for name, (secret, key) in launch.SECRET_ENV.items()
        } and set(references) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}
        # Writable folders of the read-only root: emptyDirs, next to the sized /dev/shm.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]] == volumes[mounts["/home/vdm"]] == {}
        assert volumes[mounts["/dev/shm"]] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_local_ranks_get_the_credentials_as_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("VDM_S3_ENDPOINT", "http://127.0.0.1:8333")
    assert launch.forwarded_env("local_cwd")["AWS_SECRET_ACCESS_KEY"] == "local-secret"
    assert "AWS_SECRET_ACCESS_KEY" not in launch.forwarded_env("kubernetes")
    assert launch.forwarded_env("kubernetes")["VDM_S3_ENDPOINT"] == "http://127.0.0.1:8333"
