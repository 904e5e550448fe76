"""API key files: their format, what a key grants, the keys `vdm serve` makes, and the
service refusing to start without keys (`bentoml serve` as the cluster runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.auth import Access, ApiKeys, NoKeys, bearer, local_key_files, read_keys
from serving.config import ServeSettings

ROOT = Path(__file__).resolve().parents[2]


def _settings(**values) -> ServeSettings:
    return ServeSettings(**values)


def test_key_files_take_one_key_a_line_without_blanks_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-12\nfirst-key\n\n  second-key  # the CI's\n#old-key\n")
    assert read_keys(path) == ["first-key", "second-key"]


def test_an_admin_key_is_also_an_api_key_and_unknown_keys_get_nothing(tmp_path):
    (tmp_path / "api").write_text("user-key\n")
    (tmp_path / "admin").write_text("admin-key\n")
    keys = ApiKeys(_settings(api_keys_file=tmp_path / "api", admin_keys_file=tmp_path / "admin")).keys
    assert keys.access("user-key") is Access.USER
    assert keys.access("admin-key") is Access.ADMIN
    for wrong in ("", "user-ke", "user-key ", "admin-key2", None):
        assert keys.access(wrong) is None, wrong


def test_without_key_files_the_service_refuses_unless_anonymous_access_is_allowed(tmp_path):
    with pytest.raises(NoKeys, match="VDM_SERVE_ALLOW_ANONYMOUS=true"):
        ApiKeys(_settings())
    assert ApiKeys(_settings(allow_anonymous=True)).keys.access(None) is Access.ADMIN
    (tmp_path / "empty").write_text("# no key yet\n\n")
    with pytest.raises(NoKeys, match="no key in"):
        ApiKeys(_settings(api_keys_file=tmp_path / "empty"))


def test_a_changed_key_file_is_read_again(tmp_path):
    path = tmp_path / "api"
    path.write_text("old-key\n")
    keys = ApiKeys(_settings(api_keys_file=path))
    path.write_text("new-key\n")
    os.utime(path, ns=(0, 10**18))  # a different modification time, whatever the clock's resolution
    now = keys.current(10**6)
    assert now.access("new-key") is Access.USER and now.access("old-key") is None


def test_bearer_reads_the_authorization_header():
    assert bearer([(b"authorization", b"Bearer abc")]) == "abc"
    assert bearer([(b"authorization", b"bearer abc ")]) == "abc"
    assert bearer([(b"authorization", b"Basic abc")]) is None
    assert bearer([(b"authorization", b"Bearer ")]) is None
    assert bearer([]) is None


def test_local_keys_are_owner_only_files_kept_across_runs(tmp_path):
    api, admin = local_key_files(tmp_path / "serving")
    first = (read_keys(api), read_keys(admin))
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in (api, admin))
    assert len(first[0][0]) >= 40 and first[0] != first[1]
    assert (read_keys(api), read_keys(admin)) == first
    assert tuple(read_keys(p) for p in local_key_files(tmp_path / "serving")) == first  # reused


def test_bentoml_serve_refuses_to_start_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VDM_SERVE_")}
    env |= {"VDM_SERVE_MODELS": "some-model", "BENTOML_HOME": str(tmp_path / "bentoml"), "VDM_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:VideoGeneration", "--port", "1"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no API keys: set VDM_SERVE_API_KEYS_FILE" in result.stderr + result.stdout
    assert "VDM_SERVE_ALLOW_ANONYMOUS=true" in result.stderr + result.stdout
