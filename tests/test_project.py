"""The project installs as designed (packages, CLI, pinned stack, import direction) and
its documentation holds together (a short README, links that resolve, no outside references)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# model/ is pure ML; serving/ must not depend on the orchestrator or the cluster.
FORBIDDEN = {
    "model": {"kfp", "mlflow", "kubernetes", "minio", "bentoml", "torchx", "components", "pipelines", "serving", "vdm"},
    "serving": {"kfp", "kubernetes", "torchx", "pipelines", "vdm"},
    "components": {"pipelines", "serving", "vdm"},
    "pipelines": {"serving", "vdm"},  # the KFP pipelines: they wire components, nothing runs them from here
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
    code += "print(torch.__version__, cv2.__version__, hasattr(cv2, 'DISOpticalFlow_create'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch_version, cv2_version, has_dis = result.stdout.split()[-3:]
    assert torch_version.startswith("2.14.1") and cv2_version.startswith("4.10") and has_dis == "True"


@pytest.mark.parametrize("package", ["components", "pipelines", "model", "serving", "vdm"])
def test_top_level_packages_import(package):
    __import__(package)


def test_vdm_console_script_lists_its_commands():
    vdm = Path(sys.executable).parent / "vdm"
    result = subprocess.run([str(vdm), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == {
        "stack", "store", "data", "curate", "curate-ablation", "train", "finetune", "train-vae", "cache-latents",
        "sample", "eval", "serve", "registry", "pipeline", "run", "weights", "plan", "personalize",
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


# The README is the guide; the details live in docs/.
README_MAX_LINES = 250
# Markdown links `[text](target)`; the target ends at whitespace or the closing parenthesis.
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Mentions of Markdown pages (each must be a page of this repository) and of an issue
# tracker (its readers have none): notes and trackers outside it mean nothing to them.
PAGE_NAME = re.compile(r"\b[\w.-]+\.md\b")
TRACKER = re.compile(r"\bissues?\b", re.IGNORECASE)


def _repository_files() -> list[Path]:
    """Tracked files plus new files git does not ignore (so new docs are checked before a commit)."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    paths = {ROOT / line for line in result.stdout.splitlines() if not line.startswith(".venv/")}
    return sorted(path for path in paths if path.is_file())


def _markdown_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details into docs/"


def test_docs_cover_every_area_and_the_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md"))
    assert {"docs/curation.md", "docs/training.md", "docs/finetunes.md", "docs/pipelines-and-registry.md",
            "docs/serving.md", "docs/operations.md", "docs/evidence/README.md"} <= set(pages)  # fmt: skip
    assert [page for page in pages if f"({page})" not in readme] == []


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    broken = []
    for target in MARKDOWN_LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        missing = not path.is_relative_to(ROOT) or not path.exists()
        if missing or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert broken == []


def test_nothing_refers_to_notes_or_issues_outside_the_repository():
    this_file = Path(__file__).resolve()
    files = _repository_files()
    pages = {path.name for path in files if path.suffix == ".md"}
    offenders = []
    for path in files:
        if path.resolve() == this_file:  # its own name says what it looks for
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            outside = [name for name in PAGE_NAME.findall(line) if name not in pages]
            if outside or TRACKER.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
