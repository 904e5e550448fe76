"""Inside a step, kfp runs with `_KFP_RUNTIME=true`: `kfp.dsl` is then its runtime part only
(artifact types, no `dsl.component`), so a step's body that imports a module defining
components fails at run time, after the compile and the unit tests passed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
HELPERS = ("components.training.model_artifact", "components.evaluation.evaluate", "components.registry.decision")


def _imported_by_step_bodies() -> set[str]:
    modules = set()
    for path in ROOT.glob("components/*/component.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            decorated = isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d)
                                                                   for d in node.decorator_list)  # fmt: skip
            if decorated:
                modules |= {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module}
    return {m for m in modules if m.split(".")[0] in ("components", "model")}


def test_no_step_imports_a_module_that_defines_components():
    modules = _imported_by_step_bodies()
    assert set(HELPERS) <= modules
    for module in modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        source = path.read_text() if path.exists() else (ROOT / module.replace(".", "/") / "__init__.py").read_text()
        assert "@dsl.component" not in source, module


def _load(*modules: str) -> subprocess.CompletedProcess:
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    return subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"_KFP_RUNTIME": "true"}, timeout=120)  # fmt: skip


def test_the_steps_report_and_artifact_helpers_load_under_kfps_runtime():
    result = _load(*HELPERS)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    result = _load("components.registry.component")  # a module that defines components does not
    assert result.returncode != 0 and "has no attribute 'component'" in result.stderr
