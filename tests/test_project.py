"""The project installs as designed: packages, CLI, pinned stack, import direction."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# model/ is pure ML; serving/ must not depend on the orchestrator or the cluster.
FORBIDDEN = {
    "model": {"kfp", "mlflow", "kubernetes", "minio", "bentoml", "torchx", "components", "pipelines", "serving"},
    "serving": {"kfp", "kubernetes", "torchx", "pipelines"},
    "components": {"pipelines", "serving"},
}


def test_torchx_runner_imports_and_is_not_the_broken_fallback():
    """pip resolves plain `torchx` to 0.3.0, which crashes on import under 3.11."""
    code = "import torchx, torchx.runner; r = torchx.runner.get_runner(); print(torchx.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith("0.3")


def test_whole_stack_imports_in_one_process():
    modules = [
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "peft",
        "open_clip",
        "webdataset",
        "av",
        "bentoml",
        "prometheus_client",
        "kfp",
        "kfp.kubernetes",
        "mlflow",
        "minio",
        "paddleocr",
        "scenedetect",
        "cv2",
        "onnxruntime",
        "pydantic_settings",
    ]
    code = "import importlib, torch, cv2\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(torch.__version__, cv2.__version__, hasattr(cv2, 'calcOpticalFlowFarneback'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch_version, cv2_version, has_farneback = result.stdout.split()[-3:]
    assert torch_version.startswith("2.14.1") and cv2_version.startswith("4.10") and has_farneback == "True"


@pytest.mark.parametrize("package", ["components", "pipelines", "model", "serving"])
def test_top_level_packages_import(package):
    __import__(package)


def test_vdm_console_script_lists_its_commands():
    vdm = Path(sys.executable).parent / "vdm"
    result = subprocess.run([str(vdm), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == {
        "stack", "data", "curate", "curate-ablation", "train", "finetune", "train-vae", "cache-latents", "sample",
        "eval", "serve", "registry", "pipeline", "run",
    }  # fmt: skip


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_code_is_lint_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff), "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
