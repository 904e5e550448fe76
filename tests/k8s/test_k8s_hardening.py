"""The hardened cluster: checkov on both overlays (and the TLS component) with only the
skips k8s/README.md justifies; one MinIO user and policy per workload, each Secret in the
workload that uses it only; serving without S3 keys or a route to MinIO; MLflow's
basic-auth (its users: test_k8s_mlflow_auth.py); serving's API keys as the serving code reads them; digests in prod."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from k8s_checks import (
    K8S,
    KUBECTL,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    PLATFORM,
    ROOT,
    checkov,
    core_problems,
    documented_skips,
    find,
    generated_name,
    mutated,
    platform_container,
    pod_templates,
    policy_problems,
    rendered,
    run_checkov,
    secret_data,
    secrets_used,
)

from components.common.settings import Settings
from serving.auth import is_open, read_keys
from serving.config import ServeSettings

WORKLOAD_SECRETS = {
    # What each workload may see (mounted or referenced), and nothing more.
    ("StatefulSet", "minio"): {"minio-root"},
    ("StatefulSet", "postgres"): {"mlflow-postgres"},
    ("Deployment", "mlflow"): {"mlflow-s3", "mlflow-admin", "mlflow-postgres"},
    ("Deployment", "vdm-serving"): {"vdm-mlflow-serving", "vdm-serving-keys"},
    ("Job", "minio-buckets"): {"minio-root", "vdm-s3-credentials", "mlflow-s3"},
    ("Job", "mlflow-users"): {"mlflow-admin", "vdm-mlflow-credentials", "vdm-mlflow-serving"},
}


# --- checkov ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_with_only_the_documented_skips(overlay):
    result = checkov(overlay)
    assert result.failed == [], "checkov failed: " + ", ".join(result.failed)
    assert result.passed > 400  # the kubernetes framework ran over every object
    documented = {s.check for s in documented_skips() if s.overlay == overlay and s.how == "annotation"}
    undocumented = {check for check, _ in result.skipped} - documented
    assert not undocumented, f"checkov.io/skip annotations not justified in k8s/README.md: {undocumented}"


def test_every_documented_skip_is_in_use():
    for skip in documented_skips():
        assert skip.overlay in OVERLAYS, skip
        assert len(skip.why) > 20, f"{skip.check}: say why"
        if skip.how == "annotation":
            assert skip.check in {check for check, _ in checkov(skip.overlay).skipped}, f"{skip} is not used"


def test_checkov_catches_a_writable_root_filesystem():
    def writable(deployment):
        deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False

    result = run_checkov(mutated(rendered("prod"), "Deployment", "vdm-serving", writable, PLATFORM), [])
    assert [f for f in result.failed if f.startswith("CKV_K8S_22 Deployment.vdm.vdm-serving")], result.failed


# --- MinIO users, Secrets per workload ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_workload_sees_only_its_own_secrets(overlay):
    objs = rendered(overlay)
    seen = {(w["kind"], w["metadata"]["name"]): secrets_used(t) for w, t in pod_templates(objs)}
    assert seen == WORKLOAD_SECRETS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_policies_give_each_user_its_bucket_only(overlay):
    objs = rendered(overlay)
    policies = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("minio-policies"))
    config = find(objs, "ConfigMap", "vdm-platform-config", PLATFORM)["data"]
    buckets = {"vdm-pipelines.json": config["VDM_DATA_BUCKET"], "vdm-mlflow.json": config["VDM_MLFLOW_BUCKET"]}
    assert set(policies["data"]) == set(buckets)
    for file, bucket in buckets.items():
        statements = json.loads(policies["data"][file])["Statement"]
        resources = {r for s in statements for r in s["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, file
        actions = {a for s in statements for a in s["Action"]}
        assert all(s["Effect"] == "Allow" for s in statements)
        assert not [a for a in actions if "*" in a or a.startswith("admin:")], file
    # The Job attaches each policy to the user whose keys are mounted from that workload's Secret.
    script = platform_container(objs, "Job", "minio-buckets")[1]["args"][0]
    assert "user vdm-pipelines vdm-s3\n" in script and "user vdm-mlflow mlflow-s3\n" in script
    template = platform_container(objs, "Job", "minio-buckets")[0]
    mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in template["spec"]["volumes"]}
    assert volumes["mlflow-s3"].startswith("mlflow-s3-") and mounts["mlflow-s3"] == "/var/run/secrets/mlflow-s3"
    assert volumes["vdm-s3"] == "vdm-s3-credentials" and mounts["vdm-s3"] == "/var/run/secrets/vdm-s3"
    # Two users, two keys: no workload shares another's.
    pipelines = secret_data(objs, PLATFORM, "vdm-s3-credentials")
    mlflow = secret_data(objs, PLATFORM, generated_name(objs, "mlflow-s3"))
    root = secret_data(objs, PLATFORM, generated_name(objs, "minio-root"))
    keys = [pipelines["AWS_ACCESS_KEY_ID"], mlflow["AWS_ACCESS_KEY_ID"], root["MINIO_ROOT_USER"]]
    assert len(set(keys)) == 3 and pipelines["AWS_SECRET_ACCESS_KEY"] != mlflow["AWS_SECRET_ACCESS_KEY"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shell_scripts_of_the_containers_parse(overlay):
    """The start scripts (MinIO, MLflow, the bucket Job) as POSIX sh reads them."""
    scripts = []
    for workload, template in pod_templates(rendered(overlay)):
        for c in template["spec"]["containers"]:
            command = [*c.get("command", []), *c.get("args", [])]
            if command[:2] == ["/bin/sh", "-ec"]:
                scripts.append((workload["metadata"]["name"], command[2]))
    assert {name for name, _ in scripts} == {"minio", "mlflow", "minio-buckets"}
    for name, script in scripts:
        checked = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: {checked.stderr}"


# --- serving ---------------------------------------------------------------------------


def test_serving_code_reaches_models_through_mlflow_only():
    """Why serving has no S3 user and no route to MinIO: no serving module speaks S3."""
    speaks_s3 = {"minio", "boto3", "botocore", "components.common.objectstore"}
    for module in sorted((ROOT / "serving").glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        assert not imported & speaks_s3, f"{module.name} imports {imported & speaks_s3}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_has_no_s3_keys_and_no_route_to_minio(overlay):
    objs = rendered(overlay)
    _, serving = platform_container(objs, "Deployment", "vdm-serving")
    assert not [e for e in serving.get("env", []) if e["name"].startswith("AWS_")]
    policy = find(objs, "NetworkPolicy", "vdm-serving", PLATFORM)["spec"]
    assert [peer for rule in policy["egress"] for peer in rule["to"]] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
    ]
    minio = find(objs, "NetworkPolicy", "minio", PLATFORM)["spec"]
    admitted = [peer.get("podSelector", {}).get("matchLabels", {}) for r in minio["ingress"] for peer in r["from"]]
    assert {"app.kubernetes.io/name": "vdm-serving"} not in admitted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_reads_its_api_keys_from_the_mounted_secret(overlay, tmp_path):
    objs = rendered(overlay)
    template, serving = platform_container(objs, "Deployment", "vdm-serving")
    env = {e["name"]: e["value"] for e in serving["env"] if "value" in e}
    with pytest.MonkeyPatch.context() as mp:  # the container's variables, as the service reads them
        for name, value in env.items():
            mp.setenv(name, value)
        settings = ServeSettings()
    mount = next(m for m in serving["volumeMounts"] if m["mountPath"] == "/var/run/secrets/vdm-serving")
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "vdm-serving-keys"
    assert settings.api_keys_file == Path(mount["mountPath"]) / "api-keys"
    assert settings.admin_keys_file == Path(mount["mountPath"]) / "admin-keys"
    # The files as the kubelet writes them from the Secret make-secrets.sh filled.
    data = secret_data(objs, PLATFORM, "vdm-serving-keys")
    assert set(data) == {"api-keys", "admin-keys"}
    for key, text in data.items():
        (tmp_path / key).write_text(text)
        (single,) = read_keys(tmp_path / key)
        assert len(single) == 40
    assert data["api-keys"] != data["admin-keys"]
    # The kubelet's probes carry no key.
    assert is_open(serving["livenessProbe"]["httpGet"]["path"]) and is_open(
        serving["readinessProbe"]["httpGet"]["path"]
    )


# --- MLflow authentication -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_runs_basic_auth_with_credentials_from_secrets(overlay):
    objs = rendered(overlay)
    template, mlflow = platform_container(objs, "Deployment", "mlflow")
    assert mlflow["args"][:2] == ["server", "--app-name=basic-auth"]
    script = mlflow["command"][2]
    for needed in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert f'{needed}="$(secret mlflow-admin {needed})"' in script
        assert needed in secret_data(objs, PLATFORM, generated_name(objs, "mlflow-admin"))
    assert "default_permission = READ" in script and "database_uri = $MLFLOW_BACKEND_STORE_URI" in script
    assert not [e for e in mlflow["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]


# --- images ----------------------------------------------------------------------------


def test_prod_pins_third_party_images_by_digest_and_dev_by_tag():
    for overlay in OVERLAYS:
        for workload, template in pod_templates(rendered(overlay)):
            for c in template["spec"]["containers"]:
                project = c["image"].rpartition("/")[2].startswith("vdm-platform")
                pinned = "@sha256:" in c["image"]
                if overlay == "prod" and not project:
                    assert pinned, f"{workload['metadata']['name']}: {c['image']}"
                    assert len(c["image"].rpartition("@sha256:")[2]) == 64
                elif overlay == "dev":
                    assert not pinned
                assert c["imagePullPolicy"] == "Always"


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prod_with_tls():
    """prod with the tls component, as an operator adds it."""
    with tempfile.TemporaryDirectory() as workdir:
        tree = Path(workdir) / "k8s"
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
        overlay = tree / "overlays" / "prod-tls"
        overlay.mkdir()
        overlay.joinpath("kustomization.yaml").write_text(
            yaml.safe_dump({"resources": ["../prod"], "components": ["../../components/tls"]})
        )
        subprocess.run(["sh", str(tree / "make-secrets.sh"), "prod"], check=True, capture_output=True)
        out = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], check=True, capture_output=True, text=True)
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


def test_tls_component_serves_minio_over_https_with_its_certificate(prod_with_tls):
    objs = prod_with_tls
    certificate = find(objs, "Certificate", "minio-tls", PLATFORM)["spec"]
    for namespace in ("vdm", "kubeflow", "vdm-training"):
        endpoint = find(objs, "ConfigMap", "vdm-platform-config", namespace)["data"]["VDM_S3_ENDPOINT"]
        host = endpoint.removeprefix("https://").split(":")[0]
        assert endpoint.startswith("https://") and host in certificate["dnsNames"]
    assert Settings(VDM_S3_ENDPOINT=endpoint).s3_secure
    template, minio = platform_container(objs, "StatefulSet", "minio")
    certs = next(v for v in template["spec"]["volumes"] if v["name"] == "certs")["secret"]
    assert certs["secretName"] == certificate["secretName"]
    assert {i["path"] for i in certs["items"]} == {"public.crt", "private.key", "CAs/ca.crt"}
    assert "--certs-dir /var/run/minio/certs" in minio["args"][0]
    assert {m["mountPath"] for m in minio["volumeMounts"] if m["name"] == "certs"} == {"/var/run/minio/certs"}
    assert minio["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert "disableSSL: false" in find(objs, "ConfigMap", "kfp-launcher", "kubeflow")["data"]["providers"]
    issuer = find(objs, "Issuer", certificate["issuerRef"]["name"], PLATFORM)
    assert issuer["spec"]["ca"]["secretName"] == find(objs, "Certificate", "vdm-ca", PLATFORM)["spec"]["secretName"]
    ingress = find(objs, "Ingress", "vdm-serving", PLATFORM)["spec"]
    serving_certificate = find(objs, "Certificate", ingress["tls"][0]["secretName"], PLATFORM)
    assert serving_certificate is not None and ingress["rules"][0]["host"] in serving_certificate["spec"]["dnsNames"]


def test_tls_component_passes_the_policy_checks_and_checkov(prod_with_tls):
    objs = prod_with_tls
    for version in KUBERNETES_VERSIONS:
        assert core_problems(objs, version) == []
    assert policy_problems(objs) == []
    result = run_checkov(objs, [])
    assert result.failed == [], result.failed
