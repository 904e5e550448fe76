"""The Containerfile, read as text (no image can be built here: no base image can be
pulled): pinned base image, non-root numeric user, `vdm` as entrypoint, the Makefile's
three pip steps with the same pins, every package of the project copied in and let
through .dockerignore, and `make image` tagging what the manifests run."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
from k8s_checks import ROOT

CONTAINERFILE = ROOT / "Containerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` among shell commands, options included."""
    found = []
    for command in commands:
        for part in re.split(r"&&|\|", command):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def pins(args: list[str]) -> list[str]:
    return [a for a in args if "==" in a]


def makefile_pip_steps() -> list[list[str]]:
    makefile = (ROOT / "Makefile").read_text()
    lines = [line.split("2>&1")[0] for line in makefile.splitlines() if line.strip().startswith("$(PIP_INSTALL)")]
    return [shlex.split(line.replace("$(PIP_INSTALL)", "pip install"))[2:] for line in lines]


def image_tag(reference: str) -> str:
    return reference.rpartition("/")[2].partition(":")[2]


def containerfile_problems(text: str) -> list[str]:
    steps = instructions(text)
    problems = []
    args = dict(a.partition("=")[::2] for k, a in steps if k == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), a) for k, a in steps if k == "FROM"]
    if len(bases) != 1:
        problems.append(f"expected one stage, got FROM {bases}")
    for base in bases:
        if image_tag(base) in ("", "latest") and "@sha256:" not in base:
            problems.append(f"base image {base!r} is not pinned")
    users = [a for k, a in steps if k == "USER"]
    uid = users[-1].partition(":")[0] if users else ""
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"final USER {users[-1] if users else None!r} is not a numeric non-root UID")
    entrypoints = [a for k, a in steps if k == "ENTRYPOINT"]
    if not entrypoints or json.loads(entrypoints[-1]) != ["vdm"]:
        problems.append(f'ENTRYPOINT is {entrypoints[-1] if entrypoints else None}, not ["vdm"]')
    installs = pip_installs([a for k, a in steps if k == "RUN"])
    torch_step, project_step, no_deps_step = makefile_pip_steps()
    if [pins(i) for i in installs if pins(i)] != [pins(torch_step), pins(no_deps_step)]:
        problems.append(f"pinned pip steps {[pins(i) for i in installs]} differ from the Makefile's")
    order = [i for i, step in enumerate(installs) if pins(step) == pins(torch_step) or "--no-deps" in step]
    projects = [i for i, step in enumerate(installs) if any(a.startswith("/src") for a in step)]
    if len(order) != 2 or len(projects) != 1 or not order[0] < projects[0] < order[1]:
        problems.append("pip steps are not: torch, the project, then --no-deps")
    return problems


def test_containerfile_passes():
    assert containerfile_problems(CONTAINERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("USER 10001:0", "USER root"),
        ("USER 10001:0", "USER 0"),
        ("python:3.11.14-slim-bookworm", "python:latest"),
        ("python:3.11.14-slim-bookworm", "python"),
        ('ENTRYPOINT ["vdm"]', 'ENTRYPOINT ["python"]'),
        ("scenedetect==0.7.2", "scenedetect==0.7.1"),
        ("torch==2.14.1 torchvision", "torch==2.13.0 torchvision"),
    ],
)
def test_broken_containerfile_is_caught(old, new):
    text = CONTAINERFILE.read_text()
    assert old in text
    assert containerfile_problems(text.replace(old, new))


def test_every_package_is_copied_and_let_through_dockerignore():
    steps = instructions(CONTAINERFILE.read_text())
    copied = {src for k, a in steps if k == "COPY" for src in a.split()[:-1]}
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both (readme = README.md)
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source in allowed, f"{source} is copied but .dockerignore excludes it"


def test_entrypoint_is_the_projects_cli():
    assert "vdm" in PYPROJECT["project"]["scripts"]


def test_make_image_tags_what_the_manifests_run():
    makefile = (ROOT / "Makefile").read_text()
    assert "-t $(IMAGE):$(IMAGE_VERSION) ." in makefile
    assert (
        "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t $(IMAGE):$(IMAGE_VERSION)-cpu ."
        in makefile
    )
    assert re.search(r"^IMAGE \?= vdm-platform$", makefile, re.M)


def test_image_has_the_driver_of_mlflows_backend_store_uri():
    """k8s/ gives MLflow a postgresql:// URI; SQLAlchemy opens it with its default driver
    (psycopg 3 since SQLAlchemy 2.1), which the image's `cluster` extra must install."""
    from sqlalchemy.engine import make_url

    driver = make_url("postgresql://mlflow@postgres/mlflow").get_dialect().driver
    extra = [
        re.split(r"[\[=<>]", requirement)[0] for requirement in PYPROJECT["project"]["optional-dependencies"]["cluster"]
    ]
    assert driver in extra
    assert '"/src[cluster]"' in CONTAINERFILE.read_text()
    mlflow = (ROOT / "k8s" / "base" / "platform" / "mlflow.yaml").read_text()
    assert 'MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:' in mlflow
