"""The `upscale` endpoint against `vdm serve` and the real local MLflow: a tiny x4 upsampler
is registered and promoted, the server started as a user starts it, and every call goes
over HTTP: an mp4 in, the mp4 at 4x its width and height out, behind the same API keys and
limits as the other endpoints."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient
from test_service import CHAMPION, _bearer, _decoded, _error_body, _mp4, _serving

from components.common.media import video_bytes
from components.common.tracking import tracked_run
from components.registry.pipeline_model import register_pipeline
from model.stages import VideoDiffusion, named_config


@pytest.fixture(scope="module")
def upscaler(stack, settings, tmp_path_factory):
    """`vdm serve` of one (untrained) tiny upsampler at its champion alias."""
    folder = VideoDiffusion.create(named_config("tiny", "upsampler")).save(tmp_path_factory.mktemp("ups") / "final")
    name = f"vdm-upscale-test-{time.strftime('%H%M%S')}"
    with tracked_run("vdm-test-serving", config={"stage": "upsampler"}, settings=settings):
        register_pipeline(folder, name, {"vdm.data": "s3://vdm/test-shards"})
    MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with _serving([name], log_path, "--alias", CHAMPION) as (url, _):
        yield {"url": url, "name": name, "auth": _bearer("api")}


def _upscale(server, data: bytes, timeout: float = 120, headers: dict | None = None, **form) -> httpx.Response:
    files = {"video": ("small.mp4", data, "video/mp4")}
    return httpx.post(
        f"{server['url']}/upscale",
        files=files,
        data={k: str(v) for k, v in form.items()},
        headers=server["auth"] if headers is None else headers,
        timeout=timeout,
    )


def test_an_mp4_comes_back_at_four_times_its_size_frame_for_frame(upscaler):
    response = _upscale(upscaler, _mp4(3, fps=3.0, size=(40, 24)), num_steps=1)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["x-vdm-model"] == f"{upscaler['name']}/1"
    assert _decoded(response.content) == (3, 3.0, 160, 96)  # the upload's frames and fps, 4x its sides
    other = _upscale(upscaler, _mp4(2, size=(16, 16)), num_steps=1, fps=6, noise_aug_strength=0.1, prompt="a square")
    assert other.status_code == 200, other.text
    assert _decoded(other.content) == (2, 6.0, 64, 64)


def test_bad_uploads_and_fields_get_400_naming_the_field_before_any_model_work(upscaler):
    too_wide = _error_body(_upscale(upscaler, video_bytes(np.zeros((1, 8, 258, 3), np.uint8), 8.0)), 400)
    assert too_wide["field"] == "video" and "258x8 upsampled x4 is over 1024 pixels a side" in too_wide["error"]
    assert _error_body(_upscale(upscaler, _mp4(2), height=96), 400)["field"] == "height"
    assert _error_body(_upscale(upscaler, _mp4(2), noise_aug_strength=2), 400)["field"] == "noise_aug_strength"
    not_a_video = _error_body(_upscale(upscaler, b"not an mp4"), 400)
    assert not_a_video["field"] == "video" and "could not be read as an mp4" in not_a_video["error"]


def test_the_same_keys_guard_it_and_other_endpoints_have_no_model_here(upscaler):
    assert _upscale(upscaler, _mp4(2), headers={}).status_code == 401
    wrong = _upscale(upscaler, _mp4(2), headers={"Authorization": "Bearer not-a-key"})
    assert wrong.status_code == 401
    missing = httpx.post(f"{upscaler['url']}/text_to_video", json={"prompt": "x"}, headers=upscaler["auth"], timeout=30)
    assert "no model for the text_to_video endpoint" in _error_body(missing, 404)["error"]
