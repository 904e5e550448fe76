"""`vdm serve` (BentoML) against the real local MLflow and Prometheus: tiny models are
registered and promoted, the server is started as a user would start it, and every
call goes over HTTP, through BentoML's client or plain requests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import replace

import av
import bentoml
import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from diffusers import AutoencoderKL
from mlflow import MlflowClient
from PIL import Image

from components.common.media import video_bytes
from components.common.settings import load_settings
from components.common.tracking import tracked_run
from components.registry.pipeline_model import register_pipeline
from components.sample_data.shards import write_shapes_shards
from model.camera_lora import is_adapter_weight
from model.stages import VideoDiffusion, named_config
from model.tasks import ENDPOINTS
from model.train import train
from serving.auth import read_keys
from serving.service import REQUESTS

CHAMPION = "champion"
MAX_CONCURRENCY = 2
MAX_VIDEO_BYTES = 100_000  # the server's upload limit (tiny test videos are a few kB)


def _decoded(mp4: bytes) -> tuple[int, float, int, int]:
    """Frame count, fps, width, height of an mp4."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate), stream.width, stream.height


def _png(size=(40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained_video(tmp_path_factory):
    """A tiny text-to-video model folder (one training step): the other kinds start from it."""
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=1, clips_per_shard=2)
    config = replace(named_config("tiny", "video"), max_steps=1, validation_clips=0)  # two clips: none to spare
    return train(config, [str(p) for p in paths], tmp_path_factory.mktemp("train")).final


@pytest.fixture(scope="module")
def versions(settings, trained_video, tmp_path_factory):
    """Three versions of one text-to-video model: 1 and 2 work (1 with a camera-motion
    adapter `pan`), 3 has a VAE with twice the latent channels and a UNet that takes them
    but still predicts the old count (loads, then fails in every generation)."""
    final = trained_video
    panned = VideoDiffusion.create(named_config("tiny", "camera-lora").with_fields(motion_class="pan"), init_from=final)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapter weights (B starts at zero: no change)
        for parameter_name, parameter in panned.unet.named_parameters():
            if is_adapter_weight(parameter_name, "pan"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    with_pan = panned.save(tmp_path_factory.mktemp("pan") / "final")
    broken = tmp_path_factory.mktemp("broken") / "final"
    shutil.copytree(final, broken)
    vae = AutoencoderKL.from_pretrained(broken / "vae")
    latent_channels = 2 * vae.config.latent_channels
    AutoencoderKL.from_config({**vae.config, "latent_channels": latent_channels}).save_pretrained(broken / "vae")
    unet = VideoDiffusion.load(final).unet
    type(unet).from_config({**unet.config, "in_channels": latent_channels}).save_pretrained(broken / "unet")
    name = f"vdm-serve-test-{time.strftime('%H%M%S')}"
    with tracked_run("vdm-test-serving", config={"stage": "video"}, settings=settings):
        for folder in (with_pan, final, broken):
            register_pipeline(folder, name, {"vdm.data": "s3://vdm/test-shards"})
    MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    return name


@pytest.fixture(scope="module")
def image_model(settings, versions, tmp_path_factory):
    """An (untrained) image-to-video model next to the text one: one version, champion."""
    folder = VideoDiffusion.create(named_config("tiny", "i2v")).save(tmp_path_factory.mktemp("i2v") / "final")
    name = f"{versions}-i2v"
    with tracked_run("vdm-test-serving", config={"stage": "i2v"}, settings=settings):
        register_pipeline(folder, name, {"vdm.data": "s3://vdm/test-shards"})
    MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    return name


@pytest.fixture(scope="module")
def kind_models(settings, versions, trained_video, tmp_path_factory):
    """(Untrained) interpolation, prediction and multi-view models started from the
    text-to-video one, one registered name each at champion 1. The prediction name also
    has a version 2 that is a text-to-video model: its alias moving there leaves the
    `extend` endpoint without a model."""
    folders = {
        kind: VideoDiffusion.create(named_config("tiny", kind), init_from=trained_video).save(
            tmp_path_factory.mktemp(kind) / "final"
        )
        for kind in ("interpolation", "prediction", "multiview")
    }
    names = {kind: f"{versions}-{kind}" for kind in folders}
    with tracked_run("vdm-test-serving", config={"stage": "kinds"}, settings=settings):
        for kind, folder in folders.items():
            register_pipeline(folder, names[kind], {"vdm.data": "s3://vdm/test-shards"})
        register_pipeline(trained_video, names["prediction"], {"vdm.data": "s3://vdm/test-shards"})
    for name in names.values():
        MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    return names


def _bearer(kind: str) -> dict[str, str]:
    """The Authorization header with the key `vdm serve` made (`api` or `admin`)."""
    (key,) = read_keys(load_settings().home / "serving" / f"{kind}-keys")
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def _serving(models: list[str], log_path, *options: str, env: dict[str, str] | None = None):
    """`vdm serve` of `models` on a free port, run as a user runs it, until ready; its URL
    and port. Its log goes to `log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "vdm.cli", "serve", *(f"--model={m}" for m in models), "--port", str(port)]
    with open(log_path, "w") as log:
        # Its own process group: teardown can stop BentoML's arbiter and workers together.
        process = subprocess.Popen(
            [*command, *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | (env or {}),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"never ready:\n{log_path.read_text()[-3000:]}")
        yield url, port
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever did not stop in time
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(stack, versions, image_model, kind_models, tmp_path_factory):
    """`vdm serve` of every kind at once on a free port, polling the aliases every second
    (the multi-view model at its own alias, `models:/NAME@ALIAS`; the others plain NAMEs
    at --alias); its log in a file."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    multiview = kind_models["multiview"]
    MlflowClient().set_registered_model_alias(multiview, "mv-live", "1")
    models = [versions, image_model, kind_models["interpolation"], kind_models["prediction"]]
    options = ["--alias", CHAMPION, "--poll-seconds", "1", "--max-concurrency", str(MAX_CONCURRENCY)]
    env = {"VDM_SERVE_MAX_VIDEO_BYTES": str(MAX_VIDEO_BYTES)}
    with _serving([*models, f"models:/{multiview}@mv-live"], log_path, *options, env=env) as (url, port):
        yield {
            "url": url,
            "port": port,
            "name": versions,
            "image_model": image_model,
            "log": log_path,
            "auth": _bearer("api"),
            "admin": _bearer("admin"),
            **kind_models,
        }


def _token(server) -> str:
    return server["auth"]["Authorization"].removeprefix("Bearer ")


def _error_body(response: httpx.Response, status: int) -> dict:
    """The body of an error response with `status`, checked to be in the one error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field", "error_id"} and re.fullmatch("[0-9a-f]{12}", body["error_id"]), body
    return body


def _post(server, endpoint: str, timeout: float = 120, admin: bool = False, **payload) -> httpx.Response:
    headers = server["admin" if admin else "auth"]
    return httpx.post(f"{server['url']}/{endpoint}", json=payload, headers=headers, timeout=timeout)


def _served_version(server) -> str:
    """The version the text-to-video model is served from."""
    (info,) = [m for m in _post(server, "model_info").json() if m["name"] == server["name"]]
    return info["version"]


def _move_alias(server, version: str) -> None:
    MlflowClient().set_registered_model_alias(server["name"], CHAMPION, version)
    assert _post(server, "reload", admin=True).status_code == 200
    assert _served_version(server) == version


def test_ready_once_loaded_and_model_info_names_the_champions(server):
    assert httpx.get(f"{server['url']}/livez").status_code == 200
    info = _post(server, "model_info", admin=True).json()
    # Configured order; each model's kind is its task, its endpoint the task's.
    assert [(m["name"], m["version"], m["alias"], m["kind"], m["endpoint"]) for m in info] == [
        (server["name"], "1", CHAMPION, "camera-lora", "text_to_video"),
        (server["image_model"], "1", CHAMPION, "i2v", "image_to_video"),
        (server["interpolation"], "1", CHAMPION, "interpolation", "interpolate"),
        (server["prediction"], "1", CHAMPION, "prediction", "extend"),
        (server["multiview"], "1", "mv-live", "multiview", "multiview"),
    ]
    text, image = info[:2]
    assert text["lineage"]["vdm.data"] == "s3://vdm/test-shards" and text["lineage"]["vdm.training_run"]
    assert text["default_clip"] == {"num_frames": 8, "fps": 8.0, "fps_choices": None, "height": 32, "width": 32}
    assert info[2]["default_clip"]["fps"] == 12.0 and info[2]["run_id"]
    assert text["camera_motions"] == ["pan"] and image["camera_motions"] == []
    # Trained from the tiny configs: the text tower and VAE are random, and model_info says so.
    assert text["random_weights"] == ["text", "vae"] and text["lineage"]["vdm.random_weights"] == "true"


def test_text_to_video_over_plain_http_returns_the_requested_video(server):
    response = _post(server, "text_to_video", prompt="a red disc", num_frames=5, fps=12, num_steps=2, height=48)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["x-vdm-model"] == f"{server['name']}/1"
    assert _decoded(response.content) == (5, 12.0, 32, 48)  # width: the model's default


def test_text_to_video_through_the_bentoml_client(server):
    with bentoml.SyncHTTPClient(server["url"], timeout=120, token=_token(server)) as client:
        path = client.text_to_video(prompt="a disc", num_frames=3, num_steps=2)
    assert _decoded(path.read_bytes())[:2] == (3, 8.0)  # fps: the model's default


def _run_task(server, **payload) -> tuple[str, httpx.Response]:
    """Submit to the task variant over plain HTTP (BentoML 1.4.39's SyncHTTPClient fails in
    `.submit`: no `_opened_files`), wait for it to end; its final status and result."""
    endpoint = f"{server['url']}/text_to_video_task"
    submitted = httpx.post(f"{endpoint}/submit", json=payload, headers=server["auth"])
    assert submitted.status_code == 200, submitted.text
    task = {"task_id": submitted.json()["task_id"]}
    deadline, status = time.monotonic() + 120, None
    while time.monotonic() < deadline and status not in ("completed", "failed"):
        time.sleep(0.5)
        status = httpx.get(f"{endpoint}/status", params=task, headers=server["auth"]).json()["status"]
    return status, httpx.get(f"{endpoint}/get", params=task, headers=server["auth"])


def test_text_to_video_as_a_task(server):
    status, result = _run_task(server, prompt="a disc", num_frames=4, fps=6, num_steps=2)
    assert status == "completed"
    assert result.headers["content-type"] == "video/mp4" and _decoded(result.content)[:2] == (4, 6.0)


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"prompt": "x", "num_frames": 0}, "num_frames"),
        ({"prompt": "x", "num_frames": 10_000}, "num_frames"),
        ({"prompt": "x", "num_steps": 1_000}, "num_steps"),
        ({"prompt": "x", "height": 4096}, "height"),
        ({"prompt": "x", "fps": -1}, "fps"),
        ({"prompt": "x", "motion": 4.0}, "motion"),  # past the last motion bucket
        ({"prompt": "x", "motion_bucket": 64}, "motion_bucket"),  # the motion is `motion`, a score
        ({"prompt": "x" * 5_000}, "prompt"),
        ({"prompt": "x", "guidance": 3}, "guidance"),  # unknown field: a typo is not ignored
        ({"num_frames": 4}, "prompt"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(server, payload, field):
    assert _error_body(_post(server, "text_to_video", **payload), 400)["field"] == field


def _frames(response: httpx.Response) -> np.ndarray:
    with av.open(io.BytesIO(response.content)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_camera_motion_samples_with_the_models_adapter_and_one_it_lacks_is_a_400(server):
    request = {"prompt": "a disc", "num_frames": 4, "num_steps": 2, "seed": 3}
    plain = _post(server, "text_to_video", **request)
    panned = _post(server, "text_to_video", **request, camera_motion="pan")
    assert plain.status_code == panned.status_code == 200
    change = np.abs(_frames(panned).astype(int) - _frames(plain)).mean()
    assert change > 5, change  # the adapter changes the video...
    off = _post(server, "text_to_video", **request, camera_motion="pan", camera_motion_strength=0)
    assert np.abs(_frames(off).astype(int) - _frames(plain)).mean() < 0.1 * change  # ...in proportion to its strength
    lacking = _error_body(_post(server, "text_to_video", **request, camera_motion="zoom_in"), 400)
    assert lacking["field"] == "camera_motion"
    assert "has no camera-motion adapter 'zoom_in'; it has ['pan']" in lacking["error"]
    image = httpx.post(
        f"{server['url']}/image_to_video",
        files={"image": ("i.png", _png(), "image/png")},
        data={"num_steps": "1", "camera_motion": "pan"},
        headers=server["auth"],
        timeout=60,
    )
    assert image.status_code == 400 and "it has none" in image.text


def test_sizes_the_network_cannot_take_get_400(server):
    error = _error_body(_post(server, "text_to_video", prompt="x", height=36, num_steps=1), 400)
    assert error["field"] == "height" and error["error"].startswith("height must be a multiple of 8")


def test_image_to_video_returns_the_requested_video_and_checks_the_upload(server):
    url = f"{server['url']}/image_to_video"
    controls = {"num_frames": "6", "fps": "10", "num_steps": "2", "noise_aug_strength": "0.05"}
    response = httpx.post(
        url, files={"image": ("frame.png", _png(), "image/png")}, data=controls, headers=server["auth"], timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-vdm-model"] == f"{server['image_model']}/1"
    assert _decoded(response.content) == (6, 10.0, 32, 32)  # a 40x24 upload fitted to the model's 32x32

    not_an_image = httpx.post(
        url, files={"image": ("x.png", b"not a png", "image/png")}, headers=server["auth"], timeout=60
    )
    assert not_an_image.status_code == 400 and "could not be read" in not_an_image.text
    wrong_type = httpx.post(url, files={"image": ("x.txt", b"hello", "text/plain")}, headers=server["auth"], timeout=60)
    assert wrong_type.status_code == 400 and "expected image/*" in wrong_type.text
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    unsupported = httpx.post(
        url, files={"image": ("x.gif", gif.getvalue(), "image/gif")}, headers=server["auth"], timeout=60
    )
    assert unsupported.status_code == 400 and "not GIF" in unsupported.text


def test_image_to_video_through_the_bentoml_client(server, tmp_path):
    (tmp_path / "frame.png").write_bytes(_png((32, 32)))
    with bentoml.SyncHTTPClient(server["url"], timeout=120, token=_token(server)) as client:
        path = client.image_to_video(image=tmp_path / "frame.png", num_frames=3, num_steps=2)
    assert _decoded(path.read_bytes())[:2] == (3, 8.0)


def _mp4(frames: int, fps: float = 3.0, size=(40, 24)) -> bytes:
    """An mp4 of `frames` frames (a bright square moving right on grey), width x height `size`."""
    width, height = size
    video = np.full((frames, height, width, 3), 90, dtype=np.uint8)
    for t in range(frames):
        video[t, 8:16, 4 * t : 4 * t + 8] = 230
    return video_bytes(video, fps)


def _upload(server, endpoint: str, files: dict, timeout: float = 120, **data) -> httpx.Response:
    form = {key: str(value) for key, value in data.items()}
    return httpx.post(f"{server['url']}/{endpoint}", files=files, data=form, headers=server["auth"], timeout=timeout)


def _field_error(response: httpx.Response) -> str | None:
    """The field a 400 names."""
    return _error_body(response, 400)["field"]


def test_interpolate_fills_three_frames_between_each_pair_at_four_times_the_rate(server):
    keys = {"video": ("keys.mp4", _mp4(3, fps=3.0), "video/mp4")}
    response = _upload(server, "interpolate", keys, num_steps=1)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["x-vdm-model"] == f"{server['interpolation']}/1"
    # 4T - 3 frames at the model's clip fps (12: 4x the keys' 3), fitted to its 32x32.
    assert _decoded(response.content) == (9, 12.0, 32, 32)
    # curl sends an .mp4 as application/octet-stream: any content type is read as an mp4.
    other = _upload(
        server, "interpolate", {"video": ("k.mp4", _mp4(2), "application/octet-stream")}, num_steps=1, fps=6
    )
    assert other.status_code == 200, other.text
    assert _decoded(other.content)[:2] == (5, 6.0)


def test_uploaded_videos_are_checked_before_any_model_work(server):
    def interpolate(data: bytes, name="keys.mp4"):
        return _upload(server, "interpolate", {"video": (name, data, "video/mp4")}, num_steps=1)

    one_frame = _error_body(interpolate(_mp4(1)), 400)
    assert one_frame == one_frame | {"field": "video", "error": "video: video has 1 frames; interpolate needs 2+"}
    not_a_video = interpolate(b"not an mp4")
    assert not_a_video.status_code == 400 and "video: video could not be read as an mp4" in not_a_video.text
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    wrong_container = interpolate(gif.getvalue(), "keys.gif")
    assert wrong_container.status_code == 400 and "video: video must be an mp4, not gif" in wrong_container.text
    too_long = interpolate(_mp4(33, size=(8, 8)))  # the default VDM_SERVE_MAX_FRAMES: 32
    assert too_long.status_code == 400 and "video: video has more than 32 frames" in too_long.text
    too_big = interpolate(np.random.default_rng(0).bytes(MAX_VIDEO_BYTES + 1))
    assert too_big.status_code == 400 and f"video: video is larger than {MAX_VIDEO_BYTES} bytes" in too_big.text
    assert _field_error(_upload(server, "interpolate", {}, num_steps=1)) == "video"


def test_extend_continues_the_context_to_the_requested_length(server):
    context = {"video": ("context.mp4", _mp4(2), "video/mp4")}
    response = _upload(server, "extend", context, num_frames=11, num_steps=1, prompt="a square moving right")
    assert response.status_code == 200, response.text
    assert response.headers["x-vdm-model"] == f"{server['prediction']}/1"
    assert _decoded(response.content) == (11, 8.0, 32, 32)  # the context's 2 frames included
    one = _upload(server, "extend", {"video": ("c.mp4", _mp4(1), "video/mp4")}, num_frames=3, num_steps=1, fps=4)
    assert one.status_code == 200, one.text
    assert _decoded(one.content)[:2] == (3, 4.0)
    assert _field_error(_upload(server, "extend", context, num_frames=0)) == "num_frames"
    assert _field_error(_upload(server, "extend", context, num_frames=1000)) == "num_frames"
    assert _field_error(_upload(server, "extend", context, context_guidance=-1)) == "context_guidance"


def test_multiview_orbits_the_view_from_its_elevation(server):
    view = {"image": ("view.png", _png((32, 32)), "image/png")}
    response = _upload(server, "multiview", view, elevation=20, num_frames=4, num_steps=1)
    assert response.status_code == 200, response.text
    assert response.headers["x-vdm-model"] == f"{server['multiview']}/1"
    assert _decoded(response.content) == (4, 8.0, 32, 32)
    assert _field_error(_upload(server, "multiview", view, elevation=95)) == "elevation"
    assert _field_error(_upload(server, "multiview", view, num_frames=4)) == "elevation"


def test_a_request_may_name_its_model_one_not_served_or_of_another_kind_is_a_400(server):
    named = _post(server, "text_to_video", prompt="a disc", num_frames=2, num_steps=1, model=server["name"])
    assert named.status_code == 200 and named.headers["x-vdm-model"] == f"{server['name']}/1"
    missing = _error_body(_post(server, "text_to_video", prompt="a disc", num_steps=1, model="no-such-model"), 400)
    assert missing["field"] == "model" and "model: 'no-such-model' is not served here" in missing["error"]
    other_kind = _post(server, "text_to_video", prompt="a disc", num_steps=1, model=server["interpolation"])
    assert other_kind.status_code == 400
    assert f"model: {server['interpolation']} is a 'interpolation' model" in other_kind.text
    keys = {"video": ("keys.mp4", _mp4(2), "video/mp4")}
    wrong = _upload(server, "extend", keys, num_steps=1, model=server["multiview"])
    assert wrong.status_code == 400 and f"model: {server['multiview']} is a 'multiview' model" in wrong.text
    assert _field_error(_post(server, "text_to_video", prompt="x", model="")) == "model"


def test_an_endpoint_without_a_model_is_a_404_naming_it_and_each_alias_moves_alone(server):
    name = server["prediction"]
    MlflowClient().set_registered_model_alias(name, CHAMPION, "2")  # a text-to-video model
    assert _post(server, "reload", admin=True).status_code == 200
    keys = {"video": ("keys.mp4", _mp4(2), "video/mp4")}
    try:
        info = {m["name"]: m for m in _post(server, "model_info").json()}
        assert (info[name]["version"], info[name]["endpoint"]) == ("2", "text_to_video")
        assert info[server["interpolation"]]["version"] == "1"  # the other models stay
        missing = _error_body(_upload(server, "extend", keys, num_steps=1), 404)
        assert missing["field"] is None and "no model for the extend endpoint" in missing["error"]
        # text_to_video's default is still the first configured model; the moved one by name.
        default = _post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1)
        assert default.headers["x-vdm-model"] == f"{server['name']}/1"
        moved = _post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1, model=name)
        assert moved.status_code == 200 and moved.headers["x-vdm-model"] == f"{name}/2"
    finally:
        MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
        assert _post(server, "reload", admin=True).status_code == 200
    assert _upload(server, "extend", keys, num_frames=3, num_steps=1).status_code == 200


def test_the_openapi_document_declares_mp4_responses_for_every_generating_endpoint(server):
    paths = httpx.get(f"{server['url']}/docs.json", timeout=10).json()["paths"]
    generating = [f"/{name}" for name in ENDPOINTS] + ["/text_to_video_task/get", "/image_to_video_task/get"]
    assert set(ENDPOINTS) == {"text_to_video", "image_to_video", "interpolate", "extend", "multiview", "upscale"}
    for path in generating:
        operation = paths[path]["post" if path.count("/") == 1 else "get"]
        assert list(operation["responses"]["200"]["content"]) == ["video/mp4"], path


def test_every_error_is_in_one_shape_with_its_id_in_the_server_log(server):
    """BentoML's validation errors, unknown paths and task lookups answer in the service's
    own shape, `{"error", "field", "error_id"}`, and the log has each error under its id."""
    url = server["url"]
    cases = [
        (_post(server, "text_to_video", prompt="x", num_frames=0), 400, "num_frames"),
        (_post(server, "text_to_video", num_frames=4), 400, "prompt"),  # a required field missing
        (
            httpx.post(
                f"{url}/text_to_video",
                content=b"{not json",
                headers=server["auth"] | {"content-type": "application/json"},
            ),
            400,
            None,
        ),
        (httpx.get(f"{url}/no_such_endpoint", headers=server["auth"]), 404, None),
        (
            httpx.get(f"{url}/text_to_video_task/status", params={"task_id": "no-such-task"}, headers=server["auth"]),
            404,
            None,
        ),
    ]
    bodies = [_error_body(response, status) for response, status, _ in cases]
    assert [body["field"] for body in bodies] == [field for *_, field in cases]
    assert bodies[0]["error"] == "num_frames: Input should be greater than or equal to 1"
    assert bodies[1]["error"] == "prompt: Field required" and bodies[4]["error"] == "task_id not found"
    assert len({body["error_id"] for body in bodies}) == len(bodies)
    deadline = time.monotonic() + 10
    while any(f"error id {b['error_id']}" not in server["log"].read_text() for b in bodies):
        assert time.monotonic() < deadline, [b["error_id"] for b in bodies]
        time.sleep(0.5)


def test_the_openapi_document_describes_the_service_every_request_field_and_the_errors(server):
    spec = httpx.get(f"{server['url']}/docs.json", timeout=10).json()
    description = spec["info"]["description"]
    assert "created with BentoML" not in description
    for said in (
        "/text_to_video",
        "/multiview",
        "/model_info",
        "/readyz",
        "error_id",
        "Authorization: Bearer",
        "413",
        "tasks wait or run",
    ):
        assert said in description, said
    documented: dict[str, set[str]] = {}
    for path, item in spec["paths"].items():
        for operation in item.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for name, field in content["schema"].get("properties", {}).items():
                    # `example` is what Swagger UI fills its forms from; JSON Schema's `examples` too.
                    assert field.get("description") and "example" in field and field["examples"], (path, name)
                    documented.setdefault(path, set()).add(name)
            if "requestBody" in operation:
                errors = {code: r for code, r in operation["responses"].items() if int(code) >= 400}
                assert {"400", "404", "429", "500", "503", "504"} <= set(errors), path
                for response in errors.values():
                    assert response["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    for endpoint in ENDPOINTS:
        assert documented[f"/{endpoint}"] == set(REQUESTS[endpoint].model_fields), endpoint
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "field", "error_id"]
    assert all(error["properties"][name]["description"] for name in error["required"])


def test_the_api_docs_page_works_offline_at_docs(server):
    url = server["url"]
    assert httpx.get(f"{url}/").headers["location"] == "/docs/"  # BentoML's own page there needs the internet
    page = httpx.get(f"{url}/docs", follow_redirects=True, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert str(page.url) == f"{url}/docs/"
    assets = re.findall(r'<(?:script|link)[^>]*?(?:src|href)="([^"]+)"', page.text)
    assert {"assets/swagger-ui.css", "assets/swagger-ui-bundle.js", "assets/swagger-ui-standalone-preset.js"} <= set(
        assets
    )
    (spec_url,) = re.findall(r'url: "([^"]+)"', page.text)
    for asset in [*assets, spec_url]:
        assert "//" not in asset, asset  # relative to the page: nothing comes from another host
        assert httpx.get(urllib.parse.urljoin(str(page.url), asset), timeout=10).status_code == 200, asset
    assert "validatorUrl: null" in page.text  # Swagger UI's default validator badge calls swagger.io


def test_two_services_run_side_by_side_each_with_its_own_bentoml_home(server, settings, tmp_path):
    """A second `vdm serve` on the host: both answer, and the first's task queue and
    metrics (in its BentoML home, which each BentoML start clears) still work."""
    with _serving([server["name"]], tmp_path / "second.log", "--poll-seconds", "0") as (second, port):
        for url in (server["url"], second):
            assert httpx.get(f"{url}/readyz").status_code == 200
            response = httpx.post(
                f"{url}/text_to_video",
                json={"prompt": "x", "num_frames": 2, "num_steps": 1},
                headers=server["auth"],  # the same key: both read the keys `vdm serve` made once
                timeout=120,
            )
            assert response.status_code == 200 and response.headers["x-vdm-model"] == f"{server['name']}/1"
        assert _run_task(server, prompt="x", num_frames=2, num_steps=1)[0] == "completed"
        assert "vdm_serving_frames_generated_total" in httpx.get(f"{server['url']}/metrics").text
        for each in (server["port"], port):
            assert (settings.home / "serving" / str(each) / "bentoml" / "task_result.db").is_file()
        # The same port again is refused before BentoML starts (and before it touches that home).
        taken = subprocess.run(
            [sys.executable, "-m", "vdm.cli", "serve", "--model", server["name"], "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 1 and taken.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert httpx.get(f"{server['url']}/readyz").status_code == 200


def test_requests_beyond_max_concurrency_get_429_and_the_rest_finish(server):
    responses: list[httpx.Response] = []

    def call():
        responses.append(_post(server, "text_to_video", prompt="slow", num_frames=8, num_steps=12))

    threads = [threading.Thread(target=call) for _ in range(MAX_CONCURRENCY + 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in responses) == [200] * MAX_CONCURRENCY + [429] * 2
    for refused in (r for r in responses if r.status_code == 429):
        assert _error_body(refused, 429) | {"error_id": None} == {
            "error": "Too many requests",
            "field": None,
            "error_id": None,
        }
    assert httpx.get(f"{server['url']}/readyz").status_code == 200


def test_moving_the_alias_switches_versions_and_requests_in_flight_finish_on_theirs(server):
    MlflowClient().set_registered_model_alias(server["name"], CHAMPION, "2")
    deadline = time.monotonic() + 30
    while _served_version(server) != "2" and time.monotonic() < deadline:  # the poll picks it up
        time.sleep(0.5)
    assert _served_version(server) == "2"

    slow: list[httpx.Response] = []
    in_flight = threading.Thread(
        target=lambda: slow.append(_post(server, "text_to_video", prompt="old", num_frames=8, num_steps=16))
    )
    in_flight.start()
    time.sleep(1.0)  # the slow request has taken version 2
    _move_alias(server, "1")
    fresh = _post(server, "text_to_video", prompt="new", num_frames=2, num_steps=1)
    in_flight.join()
    assert slow[0].status_code == 200 and slow[0].headers["x-vdm-model"] == f"{server['name']}/2"
    assert fresh.status_code == 200 and fresh.headers["x-vdm-model"] == f"{server['name']}/1"


def test_a_failing_generation_is_a_500_with_an_error_id_and_the_server_keeps_serving(server):
    _move_alias(server, "3")
    try:
        failed = _error_body(_post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1), 500)
        assert failed["error"] == "video generation failed" and failed["field"] is None
        assert f"error id {failed['error_id']}" in server["log"].read_text()
        # A task that fails ends `failed` (a raising BentoML task would stay in progress).
        assert _run_task(server, prompt="x", num_frames=2, num_steps=1)[0] == "failed"
    finally:
        _move_alias(server, "1")
    assert _post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1).status_code == 200


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")
def test_prometheus_scrapes_the_service_metrics(stack, server):
    assert _post(server, "text_to_video", prompt="counted", num_frames=3, num_steps=2).status_code == 200
    prometheus = stack.endpoints()["VDM_PROMETHEUS_URL"]

    def query(promql: str) -> list[dict]:
        url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        return httpx.get(url, headers=stack.prometheus_login(), timeout=5).json()["data"]["result"]

    queries = {
        "frames": 'sum(vdm_serving_frames_generated_total{part="serving"})',
        "steps": 'sum(vdm_serving_denoising_step_seconds_count{part="serving"})',
        "loads": 'sum(vdm_serving_model_load_seconds_count{part="serving"})',
        "served": f'vdm_serving_model_info{{part="serving", model="{server["name"]}"}} == 1',
        "image_model": 'vdm_serving_model_info{part="serving", kind="i2v", endpoint="image_to_video"} == 1',
        "slow_bucket": 'sum(bentoml_service_request_duration_seconds_bucket{part="serving", le="600.0"})',
    }
    # What the server says now; Prometheus scrapes every 5 s, so wait until it has caught up.
    exposed = httpx.get(f"{server['url']}/metrics").text
    frames_now = sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposed.splitlines()
        if line.startswith("vdm_serving_frames_generated_total")
    )
    assert frames_now >= 3

    def caught_up(results) -> bool:
        served = [r["metric"]["version"] for r in results["served"]]
        return all(results.values()) and float(results["frames"][0]["value"][1]) >= frames_now and served == ["1"]

    deadline, results = time.monotonic() + 60, {}
    while time.monotonic() < deadline and not (results and caught_up(results)):
        time.sleep(1)
        results = {key: query(promql) for key, promql in queries.items()}
    assert caught_up(results), json.dumps(results)
    assert float(results["steps"][0]["value"][1]) >= 2 and float(results["loads"][0]["value"][1]) >= 1
    assert float(results["slow_bucket"][0]["value"][1]) >= 1


def test_every_endpoint_but_the_probes_metrics_and_docs_needs_an_api_key(server, settings):
    url = server["url"]
    folder = settings.home / "serving"
    for name in ("api-keys", "admin-keys"):  # made by `vdm serve`, readable by their owner only
        assert (folder / name).stat().st_mode & 0o777 == 0o600
    wrong = {"Authorization": "Bearer not-a-key"}
    calls = [
        lambda h: httpx.post(f"{url}/text_to_video", json={"prompt": "x", "num_steps": 1}, headers=h, timeout=60),
        lambda h: httpx.post(f"{url}/model_info", headers=h),
        lambda h: httpx.post(f"{url}/text_to_video_task/submit", json={"prompt": "x"}, headers=h),
        lambda h: httpx.get(f"{url}/text_to_video_task/status", params={"task_id": "x"}, headers=h),
        lambda h: httpx.get(f"{url}/schema.json", headers=h),
    ]
    for call in calls:
        for headers in ({}, wrong, {"Authorization": server["auth"]["Authorization"].replace("Bearer", "Basic")}):
            refused = _error_body(call(headers), 401)
            assert "Authorization: Bearer <key>" in refused["error"]
    for path in ("/livez", "/readyz", "/metrics", "/docs/", "/docs.json"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    # /reload needs an admin key; lineage is for admin keys only.
    assert (
        _error_body(httpx.post(f"{url}/reload", headers=server["auth"]), 403)["error"] == "/reload needs an admin key"
    )
    assert _post(server, "reload", admin=True).status_code == 200
    user_view, admin_view = (_post(server, "model_info", admin=admin).json()[0] for admin in (False, True))
    assert "lineage" not in user_view and "run_id" not in user_view and user_view["name"] == server["name"]
    assert admin_view["lineage"]["vdm.data"] == "s3://vdm/test-shards" and admin_view["run_id"]


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(server):
    url = f"{server['url']}/interpolate"
    # VDM_SERVE_MAX_REQUEST_BYTES unset: the largest upload (an image: 10 MiB by default) and 1 MiB for the form.
    limit = max(10 * 2**20, MAX_VIDEO_BYTES) + 2**20
    # A Content-Length over the limit is answered at once: the server does not wait for a body
    # that never comes (over a raw socket: an HTTP client will not send less than it declares).
    head = (
        f"POST /interpolate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {server['auth']['Authorization']}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {limit + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as connection:
        connection.sendall(head.encode() + b"x" * 1000)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += connection.recv(65536)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"] == f"the request body is larger than {limit} bytes (max_request_bytes)"
    assert body["field"] is None

    def chunks():  # no Content-Length: chunked, counted as it streams in
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536

    streamed = httpx.post(url, content=chunks(), headers=server["auth"] | {"content-type": "video/mp4"}, timeout=30)
    assert _error_body(streamed, 413)["error"] == body["error"]
    assert _post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1).status_code == 200


def test_the_model_cache_keeps_the_served_and_the_previous_version(server, settings):
    cache = settings.home / "cache" / "serving" / server["name"]
    try:
        for version in ("2", "3", "1"):  # three promotions
            previous = _served_version(server)
            _move_alias(server, version)
            kept = {p.name for p in cache.iterdir()}
            assert kept == {version, previous}, (version, kept)
    finally:
        _move_alias(server, "1")
    assert _post(server, "text_to_video", prompt="x", num_frames=2, num_steps=1).status_code == 200
