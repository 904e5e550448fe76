# The README's two commands: `make demo` and `make test`. Both set up from nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip config lists local wheel folders that do not all exist; hide that noise.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check --progress-bar off -q
QUIET := sed '/is ignored: it is neither a file nor a directory/d'
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test bench gpu-check evidence lint image clean stack-down

# Three pip steps (docs/install.md says why): torch first (local wheels), the
# project with its pins, then two packages without deps (they would pull a second cv2).
$(STAMP): pyproject.toml
	@echo "== installing into $(VENV) (first time: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET)
	$(PIP_INSTALL) -e '.[dev]' 2>&1 | $(QUIET)
	$(PIP_INSTALL) --no-deps scenedetect==0.7.2 rapidocr-onnxruntime==1.4.4 2>&1 | $(QUIET)
	@touch $@

install: $(STAMP)

# Prometheus is optional for the stack, Chromium renders the evaluation page in a test
# (about 20 s and 500 MB); tests that need either skip without it.
system-deps:
	@if ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing Debian's prometheus"; \
	    (apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null 2>&1)) || \
	    echo "note: could not install prometheus; the stack runs without it"; \
	  else echo "note: prometheus not installed; the stack runs without it"; fi; \
	fi
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing Debian's chromium"; \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	    echo "note: could not install chromium; the evaluation page's screenshot test skips"; \
	  else echo "note: chromium not installed; the evaluation page's screenshot test skips"; fi; \
	fi

demo: install system-deps
	$(BIN)/vdm run

# Two workers (pytest-xdist), each with its own local stack: much of the suite waits on servers and
# subprocesses, so one process keeps only one core busy. Whole files go to a worker (module fixtures
# start once), in collection order (tests/conftest.py puts the longest files first).
test: install system-deps
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

# Benchmarks print JSON; each compares against a baseline measured in the same run.
bench: install system-deps
	$(BIN)/vdm stack up
	@for b in benchmarks/*.py; do $(BIN)/python "$$b"; done

# One GPU check (docs/gpu-check.md): training steps, sampling against diffusers' SVD pipeline,
# curation annotators, a served request; at most 8 minutes on one H100/H200. Without a GPU: --smoke sizes.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

# The motion evidence (docs/evidence/motion.md): VAE, Stage I, Stage II full and partial, evaluation (about 30 CPU-minutes).
evidence: install system-deps
	$(BIN)/python benchmarks/motion_evidence/run.py

lint: install
	$(BIN)/ruff check .

# The container image in its two variants (Containerfile; k8s/README.md): docker or
# buildah, whichever is installed. Not part of `make test`: it pulls a base image.
IMAGE ?= vdm-platform
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@if command -v docker >/dev/null; then build="docker build"; \
	elif command -v buildah >/dev/null; then build="buildah bud"; \
	else echo "make image needs docker or buildah" >&2; exit 1; fi; \
	commit=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	set -x; \
	$$build -f Containerfile --build-arg VDM_GIT_COMMIT=$$commit -t $(IMAGE):$(IMAGE_VERSION) . && \
	$$build -f Containerfile --build-arg VDM_GIT_COMMIT=$$commit \
	  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t $(IMAGE):$(IMAGE_VERSION)-cpu .

stack-down:
	@test -x $(BIN)/vdm && $(BIN)/vdm stack down || true

clean: stack-down
	rm -rf $(VENV) .vdm build dist *.egg-info .pytest_cache .ruff_cache
