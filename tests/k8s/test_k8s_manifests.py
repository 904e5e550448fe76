"""Every overlay renders and passes the schema and policy checks; broken copies do not."""

from __future__ import annotations

import re
import subprocess

import pytest
from k8s_checks import (
    CLUSTER_SCOPED,
    K8S,
    KUBECTL,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    PSA_ENFORCE,
    ROOT,
    core_problems,
    custom_problems,
    find,
    image_problems,
    mutated,
    namespace_problems,
    policy_problems,
    probe_problems,
    reference_problems,
    rendered,
    resource_problems,
    security_problems,
)


def test_renderer_is_a_current_kustomize():
    out = subprocess.run([str(KUBECTL), "version", "--client"], capture_output=True, text=True, check=True).stdout
    assert "Kustomize Version: v5." in out, out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered(overlay)}
    expected = {
        ("StatefulSet", "minio"),
        ("Job", "minio-buckets"),
        ("StatefulSet", "postgres"),
        ("Deployment", "mlflow"),
        ("Deployment", "vdm-serving"),
        ("Service", "vdm-serving"),
        ("ScaledObject", "vdm-serving"),
        ("ServiceMonitor", "vdm-serving"),
        ("PodDisruptionBudget", "vdm-serving"),
        ("ConfigMap", "kfp-launcher"),
        ("Queue", "vdm-training"),
        ("NetworkPolicy", "default-deny"),
    }
    assert expected <= kinds, expected - kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_pass_strict_validation(overlay, version):
    assert core_problems(rendered(overlay), version) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd_schemas(overlay):
    assert custom_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy(overlay):
    assert policy_problems(rendered(overlay)) == []


@pytest.mark.parametrize("namespace", ["vdm", "vdm-training"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_and_dns_for_every_pod(overlay, namespace):
    objs = rendered(overlay)
    deny = find(objs, "NetworkPolicy", "default-deny", namespace)
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = find(objs, "NetworkPolicy", "allow-dns", namespace)["spec"]
    assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_created_enforce_restricted_and_nothing_is_in_default(overlay):
    objs = rendered(overlay)
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"} == {"vdm", "vdm-training"}
    used = {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED}
    assert used == {"vdm", "vdm-training", "kubeflow"}
    assert namespace_problems(objs) == []


@pytest.mark.parametrize(
    ("kind", "name", "namespace", "change", "expected"),
    [
        ("Namespace", "vdm", None, lambda o: o["metadata"]["labels"].pop(PSA_ENFORCE), "restricted"),
        (
            "Namespace",
            "vdm-training",
            None,
            lambda o: o["metadata"]["labels"].update({PSA_ENFORCE: "baseline"}),
            "restricted",
        ),
        ("Role", "vdm-torchx-launcher", "vdm-training", lambda o: o["metadata"].update(namespace="default"), "default"),
        ("ConfigMap", "kfp-launcher", "kubeflow", lambda o: o["metadata"].pop("namespace"), "default"),
    ],
)
def test_broken_namespace_is_caught(kind, name, namespace, change, expected):
    problems = namespace_problems(mutated(rendered("prod"), kind, name, change, namespace))
    assert any(expected in p and name in p for p in problems), problems


def test_postgres_is_reachable_from_mlflow_alone():
    policy = find(rendered("prod"), "NetworkPolicy", "postgres", "vdm")["spec"]
    peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]


def test_prod_serving_requests_a_gpu_and_dev_does_not():
    def gpus(overlay):
        pod = find(rendered(overlay), "Deployment", "vdm-serving")["spec"]["template"]["spec"]
        return pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")

    assert gpus("prod") == "1" and gpus("dev") is None


def test_no_credentials_in_the_repository():
    """Secrets come from files make-secrets.sh writes, which git ignores."""
    for overlay in OVERLAYS:
        probe = K8S / "overlays" / overlay / "secrets" / "s3.env"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
        assert ignored.returncode == 0, f"{probe} would not be ignored by git"
    tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [path for path in tracked if "/secrets/" in path]


def test_make_secrets_keeps_existing_files_and_hides_them(tmp_path):
    overlay = tmp_path / "overlays" / "dev"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text("")
    script = tmp_path / "make-secrets.sh"
    script.write_bytes((K8S / "make-secrets.sh").read_bytes())
    subprocess.run(["sh", str(script), "dev"], check=True, capture_output=True)
    files = sorted((overlay / "secrets").iterdir())
    assert [f.name for f in files] == [
        "minio-root.env",
        "mlflow-admin.env",
        "mlflow-pipelines.env",
        "mlflow-s3.env",
        "mlflow-serving.ini",
        "postgres.env",
        "s3.env",
        "serving-admin-keys",
        "serving-api-keys",
    ]
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    before = [f.read_text() for f in files]
    subprocess.run(["sh", str(script), "dev"], check=True, capture_output=True)
    assert [f.read_text() for f in files] == before
    # Every secret is its own: 40 hex characters, none shared between two files.
    secrets = re.findall(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])", "\n".join(before))
    assert len(secrets) == len(files) + 1 and len(set(secrets)) == len(secrets), secrets  # mlflow-admin has 2
    (overlay / "secrets" / "mlflow-admin.env").unlink()  # an upgrade: only the missing file is made
    subprocess.run(["sh", str(script), "dev"], check=True, capture_output=True)
    assert [f.read_text() for f in files if f.name != "mlflow-admin.env"] == before[:1] + before[2:]


# A deliberately broken copy of a rendered overlay is caught by each check.


def test_misspelled_core_field_is_caught():
    def misspell(deployment):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["resource"] = container.pop("resources")

    broken = mutated(rendered("prod"), "Deployment", "vdm-serving", misspell)
    for version in KUBERNETES_VERSIONS:
        assert any("resource" in p for p in core_problems(broken, version))


def test_unknown_core_kind_version_is_caught():
    broken = mutated(
        rendered("dev"), "PodDisruptionBudget", "vdm-serving", lambda o: o.update(apiVersion="policy/v1beta1")
    )
    assert any("Couldn't find schema" in p for p in core_problems(broken, "1.33"))


@pytest.mark.parametrize(
    ("kind", "name", "change", "expected"),
    [
        ("ServiceMonitor", "vdm-serving", lambda o: o["spec"]["endpoints"][0].update(prot="http"), "prot"),
        ("ScaledObject", "vdm-serving", lambda o: o["spec"].pop("triggers"), "triggers"),
        ("ScaledObject", "vdm-serving", lambda o: o["spec"].update(maxReplicaCount="many"), "many"),
        ("Queue", "vdm-training", lambda o: o["spec"].update(weight="heavy"), "heavy"),
        ("Queue", "vdm-training", lambda o: o["metadata"].update(nme="x"), "nme"),
    ],
)
def test_broken_custom_resource_is_caught(kind, name, change, expected):
    problems = custom_problems(mutated(rendered("prod"), kind, name, change))
    assert any(expected in p for p in problems), problems


def _serving_container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("check", "change"),
    [
        (resource_problems, lambda d: _serving_container(d)["resources"].pop("limits")),
        (security_problems, lambda d: _serving_container(d)["securityContext"].update(allowPrivilegeEscalation=True)),
        (security_problems, lambda d: _serving_container(d)["securityContext"]["capabilities"].update(drop=[])),
        (security_problems, lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")),
        (security_problems, lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")),
        (probe_problems, lambda d: _serving_container(d).pop("readinessProbe")),
        (image_problems, lambda d: _serving_container(d).update(image="vdm-platform:latest")),
        (image_problems, lambda d: _serving_container(d).update(image="registry.local:5000/vdm-platform")),
        (security_problems, lambda d: _serving_container(d)["securityContext"].update(readOnlyRootFilesystem=False)),
        (security_problems, lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=1000)),
        (image_problems, lambda d: _serving_container(d).update(imagePullPolicy="IfNotPresent")),
        (reference_problems, lambda d: d["spec"]["template"]["spec"]["volumes"][-1]["secret"].update(secretName="x")),
        (reference_problems, lambda d: d["spec"]["template"]["spec"].update(serviceAccountName="nobody")),
        (
            reference_problems,
            lambda d: d["spec"]["template"]["metadata"]["labels"].update({"app.kubernetes.io/name": "x"}),
        ),
    ],
)
def test_broken_policy_is_caught(check, change):
    assert check(mutated(rendered("prod"), "Deployment", "vdm-serving", change))


def test_missing_secret_key_is_caught():
    def drop_key(secret):
        secret["data"].pop("AWS_SECRET_ACCESS_KEY")

    broken = mutated(rendered("prod"), "Secret", "vdm-s3-credentials", drop_key, namespace="kubeflow")
    problems = reference_problems(broken)
    assert any("AWS_SECRET_ACCESS_KEY" in p and "kfp-launcher" in p for p in problems), problems
