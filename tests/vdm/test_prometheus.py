"""The stack's Prometheus scrapes whatever registers a target file (later: serving)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from vdm.stack import basic_auth

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")


def test_registered_target_is_scraped_and_queryable(stack):
    registry = CollectorRegistry()
    Gauge("vdm_test_probe", "a value only this test sets", registry=registry).set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        target = [{"targets": [f"127.0.0.1:{port}"], "labels": {"part": "test"}}]
        (stack.prometheus_targets_dir / "test.json").write_text(json.dumps(target))
        query = urllib.parse.urlencode({"query": 'vdm_test_probe{part="test"}'})
        url = f"{stack.endpoints()['VDM_PROMETHEUS_URL']}/api/v1/query?{query}"
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=stack.prometheus_login()), timeout=5
            ) as response:
                result = json.load(response)["data"]["result"]
            time.sleep(1)
        assert result, "Prometheus never scraped the registered target"
        assert float(result[0]["value"][1]) == 42.0
        assert result[0]["metric"]["job"] == "vdm"
        # Without the login, or with another password, the API answers 401.
        for headers in ({}, basic_auth(stack.credentials()["VDM_PROMETHEUS_USERNAME"], "wrong")):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            assert refused.value.code == 401
    finally:
        (stack.prometheus_targets_dir / "test.json").unlink(missing_ok=True)
        server.shutdown()
