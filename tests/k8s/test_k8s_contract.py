"""The manifests name what the code expects, checked against the code's own constants:
the Secret, ConfigMap and their keys (pipelines/kubeflow.py, components/common/settings.py),
the image, the Volcano queue and TorchX's namespace (components/training/launch.py),
GPU scheduling (the pipelines' training steps), and the serving command, port, probes
and metrics (`vdm serve`, serving/service.py)."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from urllib.parse import urlparse

import pytest
from k8s_checks import OVERLAYS, ROOT, find, pod_templates, rendered
from pydantic import AliasChoices
from torchx.schedulers.kubernetes_scheduler import LABEL_ORGANIZATION, sanitize_for_serialization
from torchx.schedulers.kubernetes_scheduler import Opts as TorchXKubernetesOpts

from components.common.settings import Settings
from components.training import launch
from components.training.request import TrainingRequest
from pipelines.kubeflow import (
    GPU_STEP,
    PLATFORM_CONFIG_KEYS,
    PLATFORM_CONFIG_MAP,
    S3_SECRET,
    S3_SECRET_KEYS,
    end_to_end,
)
from serving.config import model_specs
from vdm.cli import main as vdm_cli

PLATFORM = "vdm"  # MinIO, MLflow, serving
RUNS = "kubeflow"  # where Kubeflow Pipelines runs steps (k8s/base/pipeline-runs)
TRAINING = "vdm-training"  # where TorchX submits Volcano training jobs (k8s/base/training)
MLFLOW_SECRET = "vdm-mlflow-credentials"  # the pipelines' MLflow user, next to S3_SECRET
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}  # as MLflow's client reads them
KFP_STEP_LABEL = {"pipelines.kubeflow.org/v2_component": "true"}  # KFP's label on every step pod
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def config(objs, namespace=RUNS) -> dict:
    return find(objs, "ConfigMap", PLATFORM_CONFIG_MAP, namespace)["data"]


def container(objs, name) -> dict:
    workload = next(w for w, _ in pod_templates(objs) if w["metadata"]["name"] == name)
    return workload["spec"]["template"]["spec"]["containers"][0]


def service_url(objs, name, port_name) -> tuple[str, int]:
    service = find(objs, "Service", name, PLATFORM)
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == port_name)
    return f"{name}.{PLATFORM}.svc.cluster.local", port


def field_default(cls, name):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@pytest.mark.parametrize("namespace", [RUNS, TRAINING, PLATFORM])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_config_map_have_the_keys_the_pipeline_steps_read(overlay, namespace):
    secret = find(rendered(overlay), "Secret", S3_SECRET, namespace)
    assert secret is not None, f"no Secret {namespace}/{S3_SECRET}"
    assert set(S3_SECRET_KEYS) <= set(secret["data"])
    mlflow_user = find(rendered(overlay), "Secret", MLFLOW_SECRET, namespace)
    assert mlflow_user is not None and set(mlflow_user["data"]) == MLFLOW_SECRET_KEYS
    config_map = find(rendered(overlay), "ConfigMap", PLATFORM_CONFIG_MAP, namespace)
    assert config_map is not None, f"no ConfigMap {namespace}/{PLATFORM_CONFIG_MAP}"
    assert set(PLATFORM_CONFIG_KEYS) <= set(config_map["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_key_is_a_setting_the_code_reads(overlay):
    aliases = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        aliases |= set(alias.choices) if isinstance(alias, AliasChoices) else {alias}
    keys = set(config(rendered(overlay))) | set(find(rendered(overlay), "Secret", S3_SECRET, RUNS)["data"])
    assert keys <= aliases, keys - aliases


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_endpoints_and_buckets_point_at_the_platform(overlay):
    objs = rendered(overlay)
    values = config(objs)
    assert config(objs, PLATFORM) == config(objs, TRAINING) == values
    s3, mlflow = urlparse(values["VDM_S3_ENDPOINT"]), urlparse(values["MLFLOW_TRACKING_URI"])
    assert (s3.hostname, s3.port) == service_url(objs, "minio", "s3")
    assert (mlflow.hostname, mlflow.port) == service_url(objs, "mlflow", "http")

    launcher = find(objs, "ConfigMap", "kfp-launcher", RUNS)["data"]
    root = urlparse(launcher["defaultPipelineRoot"])
    assert (root.scheme, root.netloc) == ("s3", values["VDM_DATA_BUCKET"])
    assert re.search(r"^\s+endpoint: " + re.escape(s3.netloc) + "$", launcher["providers"], re.M)

    mlflow_server = container(objs, "mlflow")
    assert "--artifacts-destination=s3://$(VDM_MLFLOW_BUCKET)/" in mlflow_server["args"]
    bucket_script = container(objs, "minio-buckets")["args"][0]
    assert '"vdm/$VDM_DATA_BUCKET" "vdm/$VDM_MLFLOW_BUCKET"' in bucket_script


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vdm_image_is_the_image_the_pods_run(overlay):
    objs = rendered(overlay)
    image = config(objs)["VDM_IMAGE"]
    assert config(objs, PLATFORM)["VDM_IMAGE"] == config(objs, TRAINING)["VDM_IMAGE"] == image
    assert container(objs, "vdm-serving")["image"] == image
    default = Settings.model_fields["image"].default
    assert default == f"vdm-platform:{VERSION}"
    assert image == {"prod": default, "dev": f"{default}-cpu"}[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_pods_get_everything_the_step_forwards(overlay):
    available = set(config(rendered(overlay))) | set(S3_SECRET_KEYS)
    assert set(launch.FORWARDED_ENV) <= available


def test_volcano_queue_is_the_launch_default():
    queue = field_default(launch.Launch, "queue")
    for overlay in OVERLAYS:
        assert find(rendered(overlay), "Queue", queue) is not None, f"no Volcano Queue {queue!r}"


def training_submission(monkeypatch) -> dict:
    """What launch_training submits on kubernetes: the run options and the Volcano job (TorchX's
    dry run, without the API server's validation); the launching step's credentials set."""
    for name in launch.SECRET_ENV:
        monkeypatch.setenv(name, f"literal-{name}")
    request = TrainingRequest(kind="image", data="s3://vdm/data", output="s3://vdm/out")
    step = launch.Launch(scheduler="kubernetes", image="vdm-platform:test", env=launch.forwarded_env("kubernetes"))
    info = launch.submission(request, step, validate=False)
    return {"cfg": info.cfg, "job": sanitize_for_serialization(info.request.resource)}


def test_training_rbac_and_network_paths_are_in_the_training_namespace():
    objs = rendered("prod")
    role = find(objs, "Role", "vdm-torchx-launcher", TRAINING)
    assert role is not None, f"the launcher Role is not in {TRAINING!r}"
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {
        ("batch.volcano.sh", "jobs", "create"),
        ("batch.volcano.sh", "jobs", "watch"),
        ("", "pods/log", "get"),
    } <= granted
    assert not any("secrets" in rule["resources"] for rule in role["rules"])
    binding = find(objs, "RoleBinding", "vdm-torchx-launcher", TRAINING)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": RUNS}]
    torchx_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": TRAINING}},
        "podSelector": {"matchLabels": {LABEL_ORGANIZATION: "torchx.pytorch.org"}},
    }
    for target in ("minio", "mlflow"):
        peers = [p for rule in find(objs, "NetworkPolicy", target, PLATFORM)["spec"]["ingress"] for p in rule["from"]]
        assert torchx_peer in peers, f"training pods cannot reach {target}"
    ranks = find(objs, "NetworkPolicy", "torchx-ranks", TRAINING)["spec"]
    assert ranks["podSelector"] == torchx_peer["podSelector"]
    reachable = [peer for rule in ranks["egress"] for peer in rule["to"]]
    for target in ("minio", "mlflow"):
        peer = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PLATFORM}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": target}},
        }
        assert peer in reachable, f"the training NetworkPolicy lets no rank reach {target}"


def test_torchx_submits_into_the_training_namespace(monkeypatch):
    cfg = training_submission(monkeypatch)["cfg"]
    assert (cfg.get("namespace") or field_default(TorchXKubernetesOpts, "namespace")) == TRAINING


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_pods_get_no_secret_as_a_literal_value(overlay, monkeypatch):
    """Every credential a training pod reads is a secretKeyRef to a key the training namespace's
    Secrets have; none is in the job spec."""
    objs = rendered(overlay)
    job = training_submission(monkeypatch)["job"]
    assert "literal-" not in str(job)
    credentials = set(S3_SECRET_KEYS) | MLFLOW_SECRET_KEYS
    for task in job["spec"]["tasks"]:
        (container,) = task["template"]["spec"]["containers"]
        referenced = set()
        for env in container["env"]:
            if "valueFrom" in env:
                ref = env["valueFrom"]["secretKeyRef"]
                secret = find(objs, "Secret", ref["name"], TRAINING)
                assert secret is not None and ref["key"] in secret["data"], (overlay, ref)
                referenced.add(env["name"])
            else:
                assert env["name"] not in credentials, env["name"]
        assert referenced == credentials


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_peer_outside_the_namespace_is_admitted_by_labels_alone(overlay):
    """A pod selector without a namespace selector selects in the policy's own namespace;
    a namespace selector is always by name (the API server's label), never by a label
    anyone with rights on a Namespace could set."""
    for policy in (o for o in rendered(overlay) if o["kind"] == "NetworkPolicy"):
        rules = [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]
        for peer in (p for rule in rules for p in [*rule.get("from", []), *rule.get("to", [])]):
            if "namespaceSelector" in peer:
                assert set(peer["namespaceSelector"]) == {"matchLabels"}, policy["metadata"]["name"]
                assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
                assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] != "default"
                assert peer.get("podSelector", {}).get("matchLabels"), (
                    f"{policy['metadata']['name']}: a whole namespace"
                )


def test_pipeline_steps_reach_minio_and_mlflow():
    step_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": RUNS}},
        "podSelector": {"matchLabels": KFP_STEP_LABEL},
    }
    for target in ("minio", "mlflow"):
        peers = [
            p
            for rule in find(rendered("prod"), "NetworkPolicy", target, PLATFORM)["spec"]["ingress"]
            for p in rule["from"]
        ]
        assert step_peer in peers, f"pipeline steps cannot reach {target}"


def test_prod_serving_schedules_like_the_training_steps():
    pod = find(rendered("prod"), "Deployment", "vdm-serving", PLATFORM)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == dict([GPU_STEP.node_selector])
    assert {"key": GPU_STEP.accelerator, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert GPU_STEP.accelerator in pod["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_runs_vdm_serve_with_options_it_has(overlay):
    serving = container(rendered(overlay), "vdm-serving")
    command, *options = serving["args"]
    assert command == "serve" and command in vdm_cli.commands
    known = {opt for param in vdm_cli.commands["serve"].params for opt in param.opts}
    pairs = [option.split("=", 1) for option in options]
    values = dict(pairs)
    assert set(values) <= known, set(values) - known
    assert len(values) == len(pairs) and "--model" not in values  # the list comes from a ConfigMap
    (listed,) = [e["valueFrom"]["configMapKeyRef"] for e in serving["env"] if e["name"] == "VDM_SERVE_MODELS"]
    config_map = find(rendered(overlay), "ConfigMap", listed["name"], "vdm")
    models = config_map["data"][listed["key"]].split(",")
    defaults = end_to_end.component_spec.inputs
    assert models == [defaults["model_name"].default, defaults["i2v_model_name"].default]
    assert [spec.name for spec in model_specs(models, "champion")] == models  # what `vdm serve` parses
    assert values["--host"] == "0.0.0.0"
    assert values["--max-concurrency"] == {"dev": "1", "prod": "2"}[overlay]  # dev patches args by index
    ports = {p["name"]: p["containerPort"] for p in serving["ports"]}
    assert ports["http"] == int(values["--port"])
    assert serving["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert serving["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def bentoml_service():
    """(metrics namespace, API method names) of serving/service.py's BentoML service."""
    tree = ast.parse((ROOT / "serving" / "service.py").read_text())
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for decorator in cls.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "bentoml.service":
                metrics = next(k.value for k in decorator.keywords if k.arg == "metrics")
                namespace = next(
                    v.value for k, v in zip(metrics.keys, metrics.values, strict=True) if k.value == "namespace"
                )
                apis = {
                    f.name
                    for f in cls.body
                    if isinstance(f, ast.FunctionDef)
                    and any(ast.unparse(d).startswith("bentoml.api") for d in f.decorator_list)
                }
                return namespace, apis
    raise AssertionError("no @bentoml.service class in serving/service.py")


def test_autoscaling_counts_generations_in_flight():
    objs = rendered("prod")
    trigger = find(objs, "ScaledObject", "vdm-serving", PLATFORM)["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    match = re.fullmatch(r"sum\((\w+)\{(.*)\}\)", trigger["metadata"]["query"])
    metric, selectors = match.groups()
    labels = dict(re.findall(r'(\w+)=~?"([^"]*)"', selectors))
    namespace, apis = bentoml_service()
    assert metric == f"{namespace}_request_in_progress"
    service = find(objs, "Service", labels["service"], labels["namespace"])
    assert service is not None and service["spec"]["selector"] == {"app.kubernetes.io/name": "vdm-serving"}
    endpoints = {path.removeprefix("/") for path in labels["endpoint"].split("|")}
    assert endpoints == {"text_to_video", "image_to_video"} and endpoints <= apis
