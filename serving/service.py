"""BentoML service: text-to-video and image-to-video from the registry's champion.

    bentoml serve serving.service:VideoGeneration      (or `vdm serve --model NAME`)

At start-up a background thread resolves `models:/NAME@ALIAS` for each configured
model, downloads and loads it (GPU with bf16 autocast if there is one); `/readyz`
answers 200 only once every model is loaded, `/livez` at once. The alias is then
checked every `VDM_SERVE_POLL_SECONDS` (and on POST /reload): a moved alias loads the
new version next to the old one and switches atomically.

Errors: invalid inputs get 400 with the field at fault (pydantic limits from
`ServeSettings`), an endpoint without a model of its kind 404, a full server 429
(BentoML's `max_concurrency`), a generation that raises 500 with an `error_id` that
is also in the server log; the server keeps serving."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import torch
from bentoml.exceptions import InvalidArgument, NotFound, ServiceUnavailable
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from components.common.media import video_bytes
from components.common.settings import load_settings
from model.pipeline import GenerationConfig, animate, generate, to_uint8
from serving.config import ServeSettings
from serving.metrics import DENOISING_STEP_SECONDS, FRAMES_GENERATED, GENERATION_FAILURES
from serving.models import LiveModels, ServedModel, UnknownKind, record_gpu_memory

log = logging.getLogger("vdm.serving")
LIMITS = ServeSettings()
# BentoML's default duration buckets stop at 180 s; video generation can take minutes.
DURATION_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0]
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}


class VideoControls(BaseModel):
    """Controls both endpoints share; unset frames, fps and size are the model's training clip."""

    model_config = ConfigDict(extra="forbid")

    num_frames: Annotated[int, Field(ge=1, le=LIMITS.max_frames)] | None = None
    fps: Annotated[float, Field(gt=0, le=60)] | None = None
    # Curation's motion score the video should have (SVD's motion bucket, before bucketing).
    motion_bucket: Annotated[float, Field(ge=0, le=64)] = 1.0
    num_steps: Annotated[int, Field(ge=1, le=LIMITS.max_steps)] = 25
    guidance_min: Annotated[float, Field(ge=0, le=30)] = 1.0
    guidance_max: Annotated[float, Field(ge=0, le=30)] = 3.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    height: Annotated[int, Field(ge=8, le=LIMITS.max_side)] | None = None
    width: Annotated[int, Field(ge=8, le=LIMITS.max_side)] | None = None
    # Camera-motion LoRA: the adapter (motion class) to sample with, one the model has
    # (model_info lists them); unset: the base model. Strength multiplies its update.
    camera_motion: Annotated[str, Field(max_length=64)] | None = None
    camera_motion_strength: Annotated[float, Field(ge=0, le=4)] = 1.0

    def generation_settings(self, served: ServedModel, **extra) -> GenerationConfig:
        if self.camera_motion is not None and self.camera_motion not in served.camera_motions:
            have = served.camera_motions or "none"
            raise InvalidArgument(f"{served.name} has no camera-motion adapter {self.camera_motion!r}; it has {have}")
        config = GenerationConfig.for_clip(
            served.pipeline.config.clip,
            num_frames=self.num_frames,
            height=self.height,
            width=self.width,
            fps=self.fps,
            motion=self.motion_bucket,
            steps=self.num_steps,
            guidance_min=self.guidance_min,
            guidance_max=self.guidance_max,
            seed=self.seed,
            adapter=self.camera_motion,
            adapter_strength=self.camera_motion_strength,
            **extra,
        )
        # The UNet halves the latent at every level but the last; the VAE divides by its own factor.
        multiple = served.pipeline.codec.downsampling * 2 ** (len(served.pipeline.unet.config.down_block_types) - 1)
        for side in ("height", "width"):
            if getattr(config, side) % multiple:
                raise InvalidArgument(f"{side} must be a multiple of {multiple} for {served.name}")
        return config


class TextToVideo(VideoControls):
    prompt: Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
    negative_prompt: Annotated[str, Field(max_length=LIMITS.max_prompt_chars)] = ""


class ImageToVideo(VideoControls):
    image: Annotated[Path, bentoml.validators.ContentType("image/*")]  # PNG, JPEG or WebP
    noise_aug_strength: Annotated[float, Field(ge=0, le=1)] = 0.02


def _conditioning_image(path: Path) -> torch.Tensor:
    """An uploaded PNG/JPEG/WebP as (3, H, W) in [-1, 1] (`animate` fits it to the video's
    size), or 400: checked before any model work."""
    if path.stat().st_size > LIMITS.max_image_bytes:
        raise InvalidArgument(f"image is larger than {LIMITS.max_image_bytes} bytes")
    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise InvalidArgument(f"image must be one of {sorted(IMAGE_FORMATS)}, not {image.format}")
            if max(image.size) > 4 * LIMITS.max_side:
                raise InvalidArgument(f"image is {image.size[0]}x{image.size[1]}; at most {4 * LIMITS.max_side} a side")
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InvalidArgument(f"image could not be read: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


@bentoml.service(
    name="vdm-video-generation",
    workers=1,  # one copy of the model per pod; scale with replicas
    traffic={"timeout": LIMITS.timeout_seconds, "max_concurrency": LIMITS.max_concurrency},
    metrics={"enabled": True, "namespace": "bentoml_service", "duration": {"buckets": DURATION_BUCKETS}},
)
class VideoGeneration:
    def __init__(self) -> None:
        self.models = LiveModels(LIMITS.models, LIMITS.alias, load_settings().home / "cache" / "serving")
        self._stop = threading.Event()
        threading.Thread(target=self._load_then_poll, name="vdm-model-loader", daemon=True).start()

    def _load_then_poll(self) -> None:
        delay = 1.0
        while not self.models.ready and not self._stop.is_set():
            try:
                self.models.refresh()
            except Exception:
                log.exception("loading %s@%s failed; retrying in %.0f s", LIMITS.models, LIMITS.alias, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
        if LIMITS.poll_seconds > 0:
            self.models.poll(LIMITS.poll_seconds, self._stop)

    def __is_ready__(self) -> bool:
        return self.models.ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()

    def _served(self, kind: str) -> ServedModel:
        if not self.models.ready:
            raise ServiceUnavailable("the model is still loading; see /readyz")
        try:
            return self.models.get(kind)
        except UnknownKind as error:
            raise NotFound(str(error)) from error

    def _video(self, endpoint: str, served: ServedModel, config: GenerationConfig, run) -> Response:
        """Run one generation on `served` (the caller's snapshot) and answer with an mp4,
        or with a 500 carrying an error id; the exception goes to the log, not the caller."""
        step_started = time.perf_counter()

        def on_step(_step: int) -> None:
            nonlocal step_started
            now = time.perf_counter()
            DENOISING_STEP_SECONDS.labels(endpoint).observe(now - step_started)
            step_started = now

        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if served.device.type == "cuda" else contextlib.nullcontext()
        )
        exclusive = served.sampling_lock if served.camera_motions else contextlib.nullcontext()
        try:
            with exclusive, autocast:
                frames = run(served.pipeline, config, on_step)
            mp4 = video_bytes(to_uint8(frames.float()).numpy(), config.fps)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("generation failed (error id %s, %s v%s, %s)", error_id, served.name, served.version, config)
            GENERATION_FAILURES.labels(endpoint).inc()
            return JSONResponse({"error": "video generation failed", "error_id": error_id}, status_code=500)
        finally:
            record_gpu_memory()
        FRAMES_GENERATED.labels(endpoint).inc(config.num_frames)
        return Response(mp4, media_type="video/mp4", headers={"X-VDM-Model": f"{served.name}/{served.version}"})

    def _text_to_video(self, endpoint: str, request: TextToVideo) -> Response:
        served = self._served("text")
        config = request.generation_settings(served)
        return self._video(
            endpoint,
            served,
            config,
            lambda pipeline, c, on_step: generate(
                pipeline, request.prompt, c, request.negative_prompt, on_step=on_step
            ),
        )

    def _image_to_video(self, endpoint: str, request: ImageToVideo) -> Response:
        image = _conditioning_image(request.image)
        served = self._served("image")
        config = request.generation_settings(served, noise_aug_strength=request.noise_aug_strength)

        def run(pipeline, c, on_step):
            return animate(pipeline, image, c, on_step=on_step)

        return self._video(endpoint, served, config, run)

    @bentoml.api(input_spec=TextToVideo)
    def text_to_video(self, **request) -> Annotated[Path, bentoml.validators.ContentType("video/mp4")]:
        """An mp4 of `prompt`."""
        return self._text_to_video("text_to_video", TextToVideo(**request))

    @bentoml.api(input_spec=ImageToVideo)
    def image_to_video(self, **request) -> Annotated[Path, bentoml.validators.ContentType("video/mp4")]:
        """An mp4 that starts from `image`."""
        return self._image_to_video("image_to_video", ImageToVideo(**request))

    # Task variants for generations longer than a client wants to hold a connection:
    # POST /<name>/submit, then /<name>/status and /<name>/get. Their queue lives in
    # this pod's memory: lost on restart, not shared between replicas.
    @bentoml.task(input_spec=TextToVideo)
    def text_to_video_task(self, **request) -> Annotated[Path, bentoml.validators.ContentType("video/mp4")]:
        return self._text_to_video("text_to_video_task", TextToVideo(**request))

    @bentoml.task(input_spec=ImageToVideo)
    def image_to_video_task(self, **request) -> Annotated[Path, bentoml.validators.ContentType("video/mp4")]:
        return self._image_to_video("image_to_video_task", ImageToVideo(**request))

    @bentoml.api
    def model_info(self) -> list[dict]:
        """Each served model: name, version, alias, kind, training run and lineage tags."""
        return [served.info() for served in self.models.all()]

    @bentoml.api
    def reload(self) -> dict:
        """Check the aliases now (instead of waiting for the next poll); what changed."""
        return {"changed": self.models.refresh(), "models": [m.info() for m in self.models.all()]}
