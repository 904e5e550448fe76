"""`bentoml build` of serving/bentofile.yaml works offline and carries the project."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_bentofile_builds_offline_with_the_project_code_and_its_pins(tmp_path):
    env = os.environ | {"BENTOML_HOME": str(tmp_path), "PIP_NO_INDEX": "1"}
    build = [sys.executable, "-m", "bentoml", "build", "-f", "serving/bentofile.yaml", "."]
    result = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (bento,) = [p for p in (tmp_path / "bentos" / "vdm-video-generation").iterdir() if p.name != "latest"]
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "serving.service:VideoGeneration"
    for source in ("serving/service.py", "model/pipeline.py", "components/registry/pipeline_model.py"):
        assert (bento / "src" / source).is_file(), source
    assert not (bento / "src" / "tests").exists()
    pins = (bento / "env" / "python" / "requirements.txt").read_text().split()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # The bentofile's list has not drifted from pyproject.toml (BentoML appends its own pin).
    assert pins == [*dependencies, "bentoml==1.4.39"]
    config = manifest["services"][0]["config"]
    assert config["traffic"]["timeout"] >= 600 and max(config["metrics"]["duration"]["buckets"]) >= 600
