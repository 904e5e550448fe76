"""A trained pipeline folder (`unet/`, `vae/`, `stage.json`: what `VideoDiffusion.save`
writes) as an MLflow pyfunc model with the folder as an artifact, registered as a new
version with the alias `candidate` and lineage tags. Text models take a `prompt`
column; image-to-video models an `image` column (PNG/JPEG bytes), multi-view models
too, with the view's camera `elevation` as a param; interpolation and prediction models
a `frames` column (an mp4 of the key frames or the context). Serving and `vdm sample` resolve
`models:/NAME@ALIAS` back to the folder with `download_pipeline`."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from components.common.media import video_bytes
from components.registry.promotion import CANDIDATE

PIPELINE_ARTIFACT = "pipeline"
# Generation settings a caller may pass as pyfunc params (defaults: the model's own clip spec).
GENERATION_PARAMS = (
    ParamSpec("num_frames", "long", 0),
    ParamSpec("fps", "double", 0.0),
    ParamSpec("height", "long", 0),
    ParamSpec("width", "long", 0),
    ParamSpec("motion", "double", 1.0),
    ParamSpec("steps", "long", 25),
    ParamSpec("guidance_min", "double", 1.0),
    ParamSpec("guidance_max", "double", 3.0),
    ParamSpec("seed", "long", 0),
    ParamSpec("adapter", "string", ""),  # camera-motion LoRA: the adapter to sample with ("": the base model)
    ParamSpec("adapter_strength", "double", 1.0),  # its LoRA update's multiplier (1: as trained)
)
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "negative_prompt", required=False)]),
    outputs=Schema([ColSpec("binary", "video_mp4")]),
    params=ParamSchema(list(GENERATION_PARAMS)),
)
# Image-to-video models: an `image` column of PNG/JPEG bytes instead of prompts.
IMAGE_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("binary", "video_mp4")]),
    params=ParamSchema([*GENERATION_PARAMS, ParamSpec("noise_aug_strength", "double", 0.02)]),
)
# Multi-view models: an `image` column too, plus the camera elevation (degrees) it was taken from.
MULTIVIEW_SIGNATURE = ModelSignature(
    inputs=IMAGE_SIGNATURE.inputs,
    outputs=IMAGE_SIGNATURE.outputs,
    params=ParamSchema([*IMAGE_SIGNATURE.params.params, ParamSpec("elevation", "double", 0.0)]),
)

# Interpolation and prediction models (known frames): `frames`, an mp4 of the key frames to
# interpolate between or of the context to continue (may have no frames), and a prompt.
# `video_frames`: the length of a predicted video (0: two of the model's clips).
FRAMES_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "frames"), ColSpec("string", "prompt", required=False)]),
    outputs=Schema([ColSpec("binary", "video_mp4")]),
    params=ParamSchema(
        [*GENERATION_PARAMS, ParamSpec("context_guidance", "double", 1.0), ParamSpec("video_frames", "long", 0)]
    ),
)


def signature_of(stage_config: dict) -> ModelSignature:
    """The pyfunc signature of a model folder's stage config (`stage.json`)."""
    if stage_config.get("stage") == "multiview":
        return MULTIVIEW_SIGNATURE
    if stage_config.get("known_frames", "none") != "none":
        return FRAMES_SIGNATURE
    return IMAGE_SIGNATURE if stage_config.get("conditioning", "text") == "image" else SIGNATURE


def decode_image(data: bytes):
    """PNG/JPEG bytes -> (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def decode_video(data: bytes):
    """mp4 bytes -> (T, 3, H, W) tensor in [-1, 1]; T may be 0."""
    import av
    import numpy as np
    import torch

    with av.open(io.BytesIO(data)) as container:
        rgb = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    if not rgb:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 127.5 - 1


class VideoPipelineModel(mlflow.pyfunc.PythonModel):
    """prompts (or, for image-to-video, images) in, mp4 bytes out (one video per row)."""

    def load_context(self, context) -> None:
        from model.stages import VideoDiffusion

        self.model = VideoDiffusion.load(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from model.pipeline import GenerationConfig, animate, generate, to_uint8

        spec = self.model.config.clip
        image_model = self.model.config.conditioning == "image"
        known_frames = self.model.config.known_frames
        schema = signature_of(asdict(self.model.config))
        p = {s.name: s.default for s in schema.params} | (params or {})
        config = GenerationConfig.for_clip(
            spec,
            num_frames=p["num_frames"],
            height=p["height"],
            width=p["width"],
            fps=p["fps"],
            motion=p["motion"],
            steps=p["steps"],
            guidance_min=p["guidance_min"],
            guidance_max=p["guidance_max"],
            seed=p["seed"],
            adapter=p["adapter"] or None,
            adapter_strength=p["adapter_strength"],
            **({"noise_aug_strength": p["noise_aug_strength"]} if image_model else {}),
            **({"elevation": p["elevation"]} if "elevation" in p else {}),
            **({"context_guidance": p["context_guidance"]} if known_frames != "none" else {}),
        )
        if known_frames != "none":
            return self._from_known_frames(model_input, config, p["video_frames"] or 2 * spec.num_frames)
        if image_model:  # animate resizes and centre-crops each image to the requested size
            videos = [animate(self.model, decode_image(data), config) for data in model_input["image"]]
            return pd.DataFrame({"video_mp4": [video_bytes(to_uint8(v).numpy(), config.fps) for v in videos]})
        negatives = model_input.get("negative_prompt", pd.Series([""] * len(model_input))).fillna("")
        videos = []
        for prompt, negative in zip(model_input["prompt"], negatives, strict=True):
            frames = to_uint8(generate(self.model, prompt, config, negative_prompt=negative)).numpy()
            videos.append(video_bytes(frames, config.fps))
        return pd.DataFrame({"video_mp4": videos})

    def _from_known_frames(self, model_input: pd.DataFrame, config, video_frames: int) -> pd.DataFrame:
        """Interpolation: the frames at 4x their frame rate (`config.fps` is the output's);
        prediction: a `video_frames` long video continuing them."""
        from model.masked import interpolate, predict
        from model.pipeline import to_uint8

        prompts = model_input.get("prompt", pd.Series([""] * len(model_input))).fillna("")
        videos = []
        for data, prompt in zip(model_input["frames"], prompts, strict=True):
            frames = decode_video(data)
            if self.model.config.known_frames == "interpolation":
                video = interpolate(self.model, frames, config, prompt)
            else:
                video = predict(self.model, frames, video_frames, config, prompt)
            videos.append(video_bytes(to_uint8(video).numpy(), config.fps))
        return pd.DataFrame({"video_mp4": videos})


def register_pipeline(folder: Path, name: str, lineage: Mapping[str, str], *, alias: str = CANDIDATE) -> ModelVersion:
    """Log `folder` as a pyfunc model in the active run, register it as a new version of
    `name`, tag the version with its lineage and give it `alias`."""
    from importlib.metadata import version

    from model.camera_lora import saved_adapters
    from model.stages import STAGE_FILE

    stage_config = json.loads((folder / STAGE_FILE).read_text())

    run = mlflow.active_run()
    info = mlflow.pyfunc.log_model(
        name="pipeline",
        python_model=VideoPipelineModel(),
        artifacts={PIPELINE_ARTIFACT: str(folder)},
        signature=signature_of(stage_config),
        # The project image provides the package; naming it skips MLflow's slow inference.
        pip_requirements=[f"vdm-platform=={version('vdm-platform')}"],
        registered_model_name=name,
    )
    client = MlflowClient()
    number = str(info.registered_model_version)
    # The run's tags now (active_run() holds those of its start), then the lineage given.
    tags = {**client.get_run(run.info.run_id).data.tags, **lineage} if run else dict(lineage)
    for key, value in tags.items():
        if key.startswith("vdm."):
            client.set_model_version_tag(name, number, key, value)
    if run:
        client.set_model_version_tag(name, number, "vdm.training_run", run.info.run_id)
    adapters = saved_adapters(folder)
    if adapters:  # camera-motion LoRA: the adapters this version can sample with
        client.set_model_version_tag(name, number, "vdm.adapters", ",".join(adapters))
    client.set_registered_model_alias(name, alias, number)
    return client.get_model_version(name, number)


def download_pipeline(model_uri: str, destination: Path) -> Path:
    """The pipeline folder of a registered model (`models:/NAME@ALIAS`, `models:/NAME/3`)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
    flavor = Model.load(local).flavors["python_function"]
    return local / flavor["artifacts"][PIPELINE_ARTIFACT]["path"]
