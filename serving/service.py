"""BentoML service: every configured registered model, of any kind, from its alias.

    bentoml serve serving.service:VideoGeneration      (or `vdm serve --model NAME ...`)

At start-up a background thread resolves `models:/NAME@ALIAS` for each configured
model, downloads and loads it (GPU with bf16 autocast if there is one); `/readyz`
answers 200 only once every model is loaded, `/livez` at once. The aliases are then
checked every `VDM_SERVE_POLL_SECONDS` (and on POST /reload): a moved alias loads the
new version next to the old one and switches atomically.

A model's kind is its task (model/tasks): `task.endpoint` is the API that serves it,
`task.Inputs` what one video is generated from, `task.sample` the generation. Each
endpoint has a request schema here (`REQUESTS`); its fields fill the served task's
`Inputs` (uploads by medium: `image`, `video`) and its `GenerationConfig`, so nothing
below branches on a kind. A request may name its `model`; otherwise the endpoint's
default is the first configured model that the endpoint serves.

Callers need an API key (serving/auth.py). The service bounds its own work
(serving/limits.py): `max_concurrency` generation slots, each held until the sampler
has stopped; a request that times out or whose client goes away is cancelled at its
next denoising step; task submits form a bounded queue; oversized bodies are refused
before they are read.

Errors, all in one shape (`{"error", "field", "error_id"}`, serving/errors.py): invalid
inputs get 400 with the field at fault (pydantic limits from `ServeSettings`, or a
`FieldError`), no or an unknown API key 401, an endpoint without a model 404, a
`model` that is not served or of another kind 400, a body over the limit 413, a full
server or task queue 429, a request past its timeout 504, a generation that raises
500; every `error_id` is also in the server log, and the server keeps serving. The API
docs are at `/docs` (serving/docs.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated, ClassVar

import anyio.from_thread
import av
import bentoml
import numpy as np
import torch
from bentoml.exceptions import BentoMLException, NotFound, ServiceUnavailable
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from components.common.lifetime import exit_with
from components.common.media import video_bytes
from components.common.settings import load_settings
from model.pipeline import GenerationConfig, to_uint8
from model.records import MAX_MOTION, MOTION_BUCKET_SCALE
from model.tasks import Task
from serving.auth import SCOPE_KEY, Access, ApiKeys, RequireApiKey
from serving.config import ServeSettings
from serving.docs import DocumentedService, docs_app
from serving.errors import FieldError, error_response, new_error_id
from serving.limits import (
    ARRIVED,
    TOO_MANY,
    Admission,
    CancelCheck,
    Cancelled,
    GenerationSlots,
    Routes,
    stop_generations_on_exit_signals,
)
from serving.metrics import DENOISING_STEP_SECONDS, FRAMES_GENERATED, GENERATION_FAILURES
from serving.models import LiveModels, ServedModel, UnknownKind, WrongModel, record_gpu_memory

log = logging.getLogger("vdm.serving")
LIMITS = ServeSettings()
# BentoML's default duration buckets stop at 180 s; video generation can take minutes.
DURATION_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0]
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
MP4 = "video/mp4"
Prompt = Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
# A GPU is declared (BentoML's `resources`, which also pins the worker to it) where there is one.
GPUS = LIMITS.gpus if LIMITS.gpus is not None else int(torch.cuda.is_available())
# Threads for the sync APIs: the generations computing, the queued tasks waiting for a slot
# (each waits in a thread), and room for model_info, reload and requests answered 429.
THREADS = LIMITS.max_concurrency + LIMITS.max_queued + 4
# One generation slot per `max_concurrency`: one service (workers=1) per process.
SLOTS = GenerationSlots(LIMITS.max_concurrency)
DESCRIPTION = f"""Video generation from the registered models of vdm-platform: each served model
answers the endpoint of its kind, and is followed at its MLflow registry alias (a promotion reaches it
without a restart).

- `POST /text_to_video` (JSON), `/image_to_video`, `/interpolate`, `/extend`, `/multiview`, `/upscale`
  (multipart uploads): an mp4 (`video/mp4`); the `X-VDM-Model: NAME/VERSION` header names the version
  that made it. `/upscale` returns the uploaded mp4 at 4x its width and height.
  A request may name its `model`; otherwise the first served model of the endpoint's kind answers.
- `POST /text_to_video_task/submit` and `/image_to_video_task/submit`: the same as tasks, then
  `GET .../status?task_id=...` and `.../get?task_id=...`.
- `POST /model_info`: the served models (name, version, alias, kind, endpoint, default clip, camera
  motions; their lineage, training run and data, to admin keys only); `POST /reload` (admin key):
  check the aliases now.
- `GET /readyz` (200 once every model is loaded), `/livez`, `/metrics` (Prometheus).

Authentication: every endpoint but `/livez`, `/readyz`, `/metrics` and these docs needs an API key,
`Authorization: Bearer <key>` (401 without one or with an unknown one). `/reload` needs an admin key
(403 with another). `vdm serve` writes its keys to files under its state folder and prints where.

Limits: {LIMITS.max_frames} frames, {LIMITS.max_side} pixels a side, {LIMITS.max_steps} steps,
a body of at most {LIMITS.request_bytes} bytes (413 before it is read). {LIMITS.max_concurrency} generations
compute at once: a request that finds every slot taken gets 429. A request gets
{LIMITS.timeout_seconds:.0f} s (then 504); a timed-out request, or one whose client goes away, stops at its
next denoising step. Tasks queue: a submit gets 429 while {LIMITS.max_queued} tasks wait or run; a queued
task waits for a generation slot; status and result lookups are never refused.

Errors are JSON `{{"error": ..., "field": ..., "error_id": ...}}`: `field` names the request field at
fault (null when the error is not about one field), `error_id` is in the server log."""


class Request(BaseModel):
    """What every endpoint takes: the model to use, and the sampling controls all kinds
    read. Unset size and fps are the model's training clip."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    endpoint: ClassVar[str]  # the API (a task's `endpoint`) this schema is for
    # Fields of the task's `Inputs` filled from a request field of another name.
    renames: ClassVar[dict[str, str]] = {}
    min_frames: ClassVar[int] = 1  # an uploaded video's fewest frames

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None,
        description="The served model to use, by registered name (`model_info` lists them); "
        "unset: the first listed model that this endpoint serves.",
        examples=["vdm-text-to-video"],
    )
    fps: Annotated[float, Field(gt=0, le=60)] | None = Field(
        None, description="Frames per second of the returned video; unset: the model's training clip's.", examples=[8]
    )
    motion: Annotated[float, Field(ge=0, le=MAX_MOTION)] = Field(
        1.0,
        description="How much the video should move, per frame at the requested fps: curation's motion score "
        f"(px per frame at 128 px), 0 to {MAX_MOTION} (SVD's motion bucket is {MOTION_BUCKET_SCALE:g} times it, "
        "0 to 255).",
        examples=[1.0],
    )
    num_steps: Annotated[int, Field(ge=1, le=LIMITS.max_steps)] = Field(
        25, description=f"Sampler steps, 1 to {LIMITS.max_steps}: more is slower and finer.", examples=[25]
    )
    seed: Annotated[int, Field(ge=0, lt=2**63)] = Field(
        0, description="Noise seed: the same request with the same seed gives the same video.", examples=[0]
    )
    height: Annotated[int, Field(ge=8, le=LIMITS.max_side)] | None = Field(
        None,
        description=f"Video height in pixels, at most {LIMITS.max_side}, a multiple of the model's size step "
        "(a 400 says which); unset: the model's training clip's.",
        examples=[256],
    )
    width: Annotated[int, Field(ge=8, le=LIMITS.max_side)] | None = Field(
        None,
        description=f"Video width in pixels, at most {LIMITS.max_side}, a multiple of the model's size step; "
        "unset: the model's training clip's.",
        examples=[256],
    )

    def settings(self, served: ServedModel) -> dict:
        """GenerationConfig fields this request sets (None: the model's own)."""
        return {
            "fps": self.fps,
            "motion": self.motion,
            "steps": self.num_steps,
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
        }

    def generation_settings(self, served: ServedModel) -> GenerationConfig:
        """The generation config for `served`, the kind's own fields (`generation_fields`)
        included where this endpoint takes them; a size the network cannot take is a 400."""
        own = {name: getattr(self, name) for name in served.task.generation_fields if name in type(self).model_fields}
        config = GenerationConfig.for_clip(served.pipeline.config.clip, **self.settings(served), **own)
        # The UNet halves the latent at every level but the last; the VAE divides by its own factor.
        multiple = served.pipeline.codec.downsampling * 2 ** (len(served.pipeline.unet.config.down_block_types) - 1)
        for side in ("height", "width"):
            if getattr(config, side) % multiple:
                raise FieldError(side, f"{side} must be a multiple of {multiple} for {served.name}")
        return config

    def media(self) -> dict[str, torch.Tensor]:
        """The uploads, decoded and checked (400 naming the field) before any model work,
        by medium: an `Inputs` field with `metadata={"media": M}` takes the upload field M."""
        uploads = [medium for medium in DECODERS if medium in type(self).model_fields]
        return {medium: DECODERS[medium](self, medium) for medium in uploads}

    def task_inputs(self, task: Task, media: dict[str, torch.Tensor]):
        """The served kind's `Inputs`: media from the uploads, the rest from the request
        fields of the same name (or `renames`); fields it lacks keep their defaults."""
        values = {}
        for f in fields(task.Inputs):
            medium = f.metadata.get("media")
            source = self.renames.get(f.name, f.name)
            if medium:
                values[f.name] = media[medium]
            elif source in type(self).model_fields:
                values[f.name] = getattr(self, source)
        return task.Inputs(**values)


class VideoControls(Request):
    """Controls the endpoints that generate a clip of the model's kind share."""

    num_frames: Annotated[int, Field(ge=1, le=LIMITS.max_frames)] | None = Field(
        None,
        description=f"Frames to generate, at most {LIMITS.max_frames}; unset: the model's training clip's.",
        examples=[8],
    )
    guidance_min: Annotated[float, Field(ge=0, le=30)] = Field(
        1.0,
        description="Classifier-free guidance scale at the first frame; it ramps to `guidance_max` at the last "
        "(1: no guidance).",
        examples=[1.0],
    )
    guidance_max: Annotated[float, Field(ge=0, le=30)] = Field(
        3.0, description="Classifier-free guidance scale at the last frame.", examples=[3.0]
    )
    camera_motion: Annotated[str, Field(max_length=64)] | None = Field(
        None,
        description="The camera-motion LoRA adapter to sample with, one the model has (`model_info` lists its "
        "`camera_motions`); unset: the base model.",
        examples=["zoom_in"],
    )
    camera_motion_strength: Annotated[float, Field(ge=0, le=4)] = Field(
        1.0,
        description="Multiplier of the camera-motion adapter's update: 0 is the base model, 1 the adapter as trained.",
        examples=[1.0],
    )

    def settings(self, served: ServedModel) -> dict:
        if self.camera_motion is not None and self.camera_motion not in served.camera_motions:
            have = served.camera_motions or "none"
            raise FieldError(
                "camera_motion",
                f"camera_motion: {served.name} has no camera-motion adapter {self.camera_motion!r}; it has {have}",
            )
        return super().settings(served) | {
            "num_frames": self.num_frames,
            "guidance_min": self.guidance_min,
            "guidance_max": self.guidance_max,
            "adapter": self.camera_motion,
            "adapter_strength": self.camera_motion_strength,
        }


class TextToVideo(VideoControls):
    endpoint = "text_to_video"
    prompt: Prompt = Field(description="What the video shows.", examples=["a red disc moving right"])
    negative_prompt: Prompt = Field(
        "", description="What the video should not show (guidance steers away from it); may be empty.", examples=[""]
    )


class ImageToVideo(VideoControls):
    endpoint = "image_to_video"
    image: Annotated[Path, bentoml.validators.ContentType("image/*")] = Field(
        description=f"The first frame: a PNG, JPEG or WebP image of at most {LIMITS.max_image_bytes} bytes, "
        "fitted to the video's size.",
        examples=["frame.png"],
    )
    noise_aug_strength: Annotated[float, Field(ge=0, le=1)] = Field(
        0.02,
        description="Noise added to `image` before conditioning: more lets the video depart further from it.",
        examples=[0.02],
    )


class MultiView(ImageToVideo):
    """An orbit around the object in `image`: `num_frames` views over one turn."""

    endpoint = "multiview"
    image: Annotated[Path, bentoml.validators.ContentType("image/*")] = Field(
        description="A view of the object: a PNG, JPEG or WebP image, fitted to the video's size.",
        examples=["object.png"],
    )
    elevation: Annotated[float, Field(ge=-90, le=90)] = Field(
        description="The camera elevation `image` was taken from, in degrees (-90 to 90).", examples=[20]
    )


class KnownFrames(Request):
    """Endpoints that take an mp4 of known frames (`video`)."""

    video: Path = Field(
        description=f"An mp4 of the known frames, at most {LIMITS.max_frames} frames, {LIMITS.max_side} pixels a side "
        f"and {LIMITS.max_video_bytes} bytes (any content type: curl sends application/octet-stream).",
        examples=["frames.mp4"],
    )
    prompt: Prompt = Field("", description="What the video shows; may be empty.", examples=["a red disc moving right"])
    context_guidance: Annotated[float, Field(ge=0, le=30)] = Field(
        1.0, description="Classifier-free guidance on the known frames (1: none).", examples=[1.0]
    )


class Interpolate(KnownFrames):
    """`video`'s frames as key frames, three generated between each pair: 4T - 3 frames at
    `fps` (the output's; default the model's clip fps, 4x its key frames' rate)."""

    endpoint = "interpolate"
    min_frames = 2


class Extend(KnownFrames):
    """`video`'s frames (its last 2 are the context) continued to `num_frames` in all."""

    endpoint = "extend"
    renames = {"video_frames": "num_frames"}
    num_frames: Annotated[int, Field(ge=1, le=LIMITS.max_frames)] | None = Field(
        None,
        description="Length of the whole video, the context included; unset: two of the model's chunks.",
        examples=[16],
    )


class Upscale(Request):
    """`video` at 4x its width and height, frame for frame (the x4 video upsampler). The output
    size is the upload's times 4: `height` and `width` stay unset."""

    endpoint = "upscale"
    video: Path = Field(
        description=f"The mp4 to upsample: at most {LIMITS.max_frames} frames, {LIMITS.max_side // 4} pixels a side "
        f"(4x: {LIMITS.max_side}) and {LIMITS.max_video_bytes} bytes (any content type: curl sends "
        "application/octet-stream).",
        examples=["small.mp4"],
    )
    prompt: Prompt = Field("", description="What the video shows; may be empty.", examples=["a red disc moving right"])
    noise_aug_strength: Annotated[float, Field(ge=0, le=1)] = Field(
        0.02,
        description="Noise added to `video` before conditioning: more lets the upsampler depart further from it "
        "(and hides compression artefacts).",
        examples=[0.02],
    )
    _upload: tuple[int, int, int, float] | None = PrivateAttr(None)  # frames, height, width, fps of `video`

    def media(self) -> dict[str, torch.Tensor]:
        from model.upsampler import SCALE

        media = super().media()
        frames, _, height, width = media["video"].shape
        if SCALE * max(height, width) > LIMITS.max_side:
            raise FieldError(
                "video",
                f"video: {width}x{height} upsampled x{SCALE} is over {LIMITS.max_side} pixels a side; at most "
                f"{LIMITS.max_side // SCALE}",
            )
        with av.open(str(self.video)) as container:
            rate = container.streams.video[0].average_rate
        self._upload = (frames, height, width, float(rate) if rate else 0.0)
        return media

    def settings(self, served: ServedModel) -> dict:
        from model.upsampler import SCALE

        for side in ("height", "width"):
            if getattr(self, side) is not None:
                raise FieldError(side, f"{side}: the output is {SCALE}x the uploaded video's size; leave it unset")
        frames, height, width, rate = self._upload
        return super().settings(served) | {
            "num_frames": frames,
            "height": SCALE * height,
            "width": SCALE * width,
            "fps": self.fps or rate or None,
        }

    def generation_settings(self, served: ServedModel) -> GenerationConfig:
        from model.upsampler import SCALE, size_step

        _, height, width, _ = self._upload
        multiple = size_step(served.pipeline)
        if (SCALE * height) % multiple or (SCALE * width) % multiple:
            raise FieldError(
                "video",
                f"video: {width}x{height}; {served.name} upsamples sides that are multiples of {multiple // SCALE}",
            )
        return super().generation_settings(served)


REQUESTS: dict[str, type[Request]] = {
    cls.endpoint: cls for cls in (TextToVideo, ImageToVideo, Interpolate, Extend, MultiView, Upscale)
}


def _conditioning_image(request: Request, medium: str) -> torch.Tensor:
    """An uploaded PNG/JPEG/WebP as (3, H, W) in [-1, 1] (sampling fits it to the video's
    size), or 400."""
    path: Path = getattr(request, medium)
    if path.stat().st_size > LIMITS.max_image_bytes:
        raise FieldError(medium, f"{medium}: image is larger than {LIMITS.max_image_bytes} bytes")
    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise FieldError(medium, f"{medium}: image must be one of {sorted(IMAGE_FORMATS)}, not {image.format}")
            if max(image.size) > 4 * LIMITS.max_side:
                raise FieldError(
                    medium, f"{medium}: image is {image.size[0]}x{image.size[1]}; at most {4 * LIMITS.max_side} a side"
                )
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise FieldError(medium, f"{medium}: image could not be read: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def _uploaded_video(request: Request, medium: str) -> torch.Tensor:
    """An uploaded mp4 as (T, 3, H, W) in [-1, 1], `request.min_frames` <= T <=
    `max_frames`, at most `max_side` pixels a side, or 400."""
    path: Path = getattr(request, medium)
    if path.stat().st_size > LIMITS.max_video_bytes:
        raise FieldError(medium, f"{medium}: video is larger than {LIMITS.max_video_bytes} bytes")
    rgb = []
    try:
        with av.open(str(path)) as container:
            if "mp4" not in container.format.name.split(","):
                raise FieldError(medium, f"{medium}: video must be an mp4, not {container.format.name}")
            if not container.streams.video:
                raise FieldError(medium, f"{medium}: the mp4 has no video stream")
            stream = container.streams.video[0]
            if max(stream.width, stream.height) > LIMITS.max_side:
                raise FieldError(
                    medium, f"{medium}: video is {stream.width}x{stream.height}; at most {LIMITS.max_side} a side"
                )
            for frame in container.decode(stream):
                if len(rgb) == LIMITS.max_frames:
                    raise FieldError(medium, f"{medium}: video has more than {LIMITS.max_frames} frames")
                rgb.append(frame.to_ndarray(format="rgb24"))
        array = np.stack(rgb) if rgb else None
    except (av.FFmpegError, OSError, ValueError) as error:
        raise FieldError(medium, f"{medium}: video could not be read as an mp4: {error}") from error
    if len(rgb) < request.min_frames:
        needs = f"{request.endpoint} needs {request.min_frames}+"
        raise FieldError(medium, f"{medium}: video has {len(rgb)} frames; {needs}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


# An upload field per medium of the kinds' `Inputs` (`metadata={"media": ...}`).
DECODERS = {"image": _conditioning_image, "video": _uploaded_video}
Video = Annotated[Path, bentoml.validators.ContentType(MP4)]
TASKS = ("text_to_video_task", "image_to_video_task")


class GuardedService(DocumentedService):
    """The service behind its API keys and limits (serving/auth.py, serving/limits.py)."""

    def guard(self, app):
        routes = Routes(
            generating=frozenset(f"/{name}" for name in REQUESTS),
            submits=frozenset(f"/{name}/submit" for name in TASKS),
        )
        admitted = Admission(app, routes, SLOTS, LIMITS.request_bytes, LIMITS.max_queued)
        return RequireApiKey(admitted, ApiKeys(LIMITS))


def _request() -> HTTPRequest | None:
    """The HTTP request being answered (None: called in process, outside a request)."""
    try:
        return VideoGeneration.context.request
    except LookupError:
        return None


@bentoml.service(
    name="vdm-video-generation",
    description=DESCRIPTION,
    service_class=GuardedService,
    workers=1,  # one copy of the model per pod; scale with replicas
    threads=THREADS,
    resources={"gpu": GPUS} if GPUS else {},
    # No BentoML max_concurrency: the generation slots bound the work (serving/limits.py).
    traffic={"timeout": LIMITS.timeout_seconds},
    metrics={"enabled": True, "namespace": "bentoml_service", "duration": {"buckets": DURATION_BUCKETS}},
)
@bentoml.asgi_app(docs_app("vdm-video-generation"), path="/docs")
class VideoGeneration:
    def __init__(self) -> None:
        # Killed outright, BentoML's arbiter cannot stop this worker, which would hold the model and GPU.
        exit_with(os.getppid())
        if threading.current_thread() is threading.main_thread():  # BentoML's worker: uvicorn's signals
            stop_generations_on_exit_signals()
        self.models = LiveModels(LIMITS.specs(), load_settings().home / "cache" / "serving")
        self._stop = threading.Event()
        threading.Thread(target=self._load_then_poll, name="vdm-model-loader", daemon=True).start()

    @bentoml.on_deployment
    def _check_keys() -> None:
        """Refuse to start (before any worker) without API keys, unless anonymous access is allowed."""
        ApiKeys(LIMITS)

    def _load_then_poll(self) -> None:
        delay = 1.0
        while not self.models.ready and not self._stop.is_set():
            try:
                self.models.refresh()
            except Exception:
                log.exception("loading %s failed; retrying in %.0f s", [str(m) for m in self.models.specs], delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
        if LIMITS.poll_seconds > 0:
            self.models.poll(LIMITS.poll_seconds, self._stop)

    def __is_ready__(self) -> bool:
        return self.models.ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()

    def _served(self, request: Request) -> ServedModel:
        if not self.models.ready:
            raise ServiceUnavailable("the models are still loading; see /readyz")
        try:
            return self.models.get(request.endpoint, request.model)
        except UnknownKind as error:
            raise NotFound(str(error)) from error
        except WrongModel as error:
            raise FieldError("model", str(error)) from error

    def _generate(self, endpoint: str, request: Request, task: bool = False) -> Response:
        """Run one generation of `request` on its model (a snapshot: a swap does not reach a
        request in flight) and answer with an mp4, or with a 500 carrying an error id; the
        exception goes to the log, not the caller. `endpoint`: the metrics' label. Errors are
        answered, not raised: a task's generation that raises would never end.

        The generation holds a slot (`SLOTS`) until its sampler has stopped: a request gets
        429 when none is free, a `task` waits for one. It stops at the next denoising step
        once its deadline has passed (the request's timeout from its arrival; a task's from
        when it got its slot) or its client has gone away."""
        try:
            served = self._served(request)
            media = request.media()
            config = request.generation_settings(served)
        except BentoMLException as error:
            return error_response(error.error_code.value, str(error), getattr(error, "field", None))
        if not SLOTS.take(wait=task):
            return error_response(429, TOO_MANY)
        try:
            return self._sample(endpoint, request, served, media, config, self._cancel_check(task))
        finally:
            SLOTS.give_back()

    @staticmethod
    def _cancel_check(task: bool) -> CancelCheck:
        http = _request()
        if task or http is None:  # a task's client is not connected while it runs
            return CancelCheck(time.monotonic() + LIMITS.timeout_seconds)
        arrived = http.scope.get(ARRIVED, time.monotonic())
        return CancelCheck(arrived + LIMITS.timeout_seconds, lambda: anyio.from_thread.run(http.is_disconnected))

    def _sample(
        self,
        endpoint: str,
        request: Request,
        served: ServedModel,
        media: dict[str, torch.Tensor],
        config: GenerationConfig,
        cancel: CancelCheck,
    ) -> Response:
        step_started = time.perf_counter()

        def on_step(_step: int) -> None:
            nonlocal step_started
            now = time.perf_counter()
            DENOISING_STEP_SECONDS.labels(endpoint).observe(now - step_started)
            step_started = now
            cancel()  # raises Cancelled: the sampler stops here

        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if served.device.type == "cuda" else contextlib.nullcontext()
        )
        exclusive = served.sampling_lock if served.camera_motions else contextlib.nullcontext()
        try:
            cancel()  # a request may have timed out or been abandoned while it waited
            inputs = request.task_inputs(served.task, media)
            with exclusive, autocast:
                frames = served.task.sample(served.pipeline, inputs, config, on_step)
            mp4 = video_bytes(to_uint8(frames.float()).numpy(), config.fps)
        except Cancelled as cancelled:
            # A timed-out caller already has BentoML's 504; a task ends failed with this one (logged with its id).
            return error_response(
                504, f"the generation of {served.name} v{served.version} was stopped: {cancelled.reason}"
            )
        except Exception:
            error_id = new_error_id()
            log.exception("generation failed (error id %s, %s v%s, %s)", error_id, served.name, served.version, config)
            GENERATION_FAILURES.labels(endpoint).inc()
            return error_response(500, "video generation failed", error_id=error_id)
        finally:
            record_gpu_memory()
        FRAMES_GENERATED.labels(endpoint).inc(len(frames))
        return Response(mp4, media_type=MP4, headers={"X-VDM-Model": f"{served.name}/{served.version}"})

    # One API per endpoint of model/tasks (`task.endpoint`); each returns an mp4 and names
    # the version that made it in the X-VDM-Model header.
    @bentoml.api(input_spec=TextToVideo)
    def text_to_video(self, **request) -> Video:
        """An mp4 of `prompt`."""
        return self._generate("text_to_video", TextToVideo(**request))

    @bentoml.api(input_spec=ImageToVideo)
    def image_to_video(self, **request) -> Video:
        """An mp4 that starts from `image`."""
        return self._generate("image_to_video", ImageToVideo(**request))

    @bentoml.api(input_spec=Interpolate)
    def interpolate(self, **request) -> Video:
        """`video`'s frames with three generated between each pair: an mp4 at 4x the frame rate."""
        return self._generate("interpolate", Interpolate(**request))

    @bentoml.api(input_spec=Extend)
    def extend(self, **request) -> Video:
        """`video` continued to `num_frames` frames in all."""
        return self._generate("extend", Extend(**request))

    @bentoml.api(input_spec=MultiView)
    def multiview(self, **request) -> Video:
        """An orbit around the object in `image`, seen from `elevation` degrees."""
        return self._generate("multiview", MultiView(**request))

    @bentoml.api(input_spec=Upscale)
    def upscale(self, **request) -> Video:
        """`video` at 4x its width and height, frame for frame."""
        return self._generate("upscale", Upscale(**request))

    # Task variants for generations longer than a client wants to hold a connection:
    # POST /<name>/submit, then /<name>/status and /<name>/get. Their queue lives in
    # this pod's memory: lost on restart, not shared between replicas.
    @bentoml.task(input_spec=TextToVideo)
    def text_to_video_task(self, **request) -> Video:
        return self._generate("text_to_video_task", TextToVideo(**request), task=True)

    @bentoml.task(input_spec=ImageToVideo)
    def image_to_video_task(self, **request) -> Video:
        return self._generate("image_to_video_task", ImageToVideo(**request), task=True)

    @bentoml.api
    def model_info(self) -> list[dict]:
        """Each served model: name, version, alias, kind, endpoint, default clip, camera
        motions and the parts with random weights (tests and demos); to admin keys also its
        training run and lineage (git commit, run ids, data URIs)."""
        http = _request()
        admin = http is None or http.scope.get(SCOPE_KEY) is Access.ADMIN
        return [served.info(lineage=admin) for served in self.models.all()]

    @bentoml.api
    def reload(self) -> dict:
        """Check the aliases now (instead of waiting for the next poll); what changed."""
        return {"changed": self.models.refresh(), "models": [m.info() for m in self.models.all()]}
