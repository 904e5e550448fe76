"""A trained pipeline folder (`unet/`, `vae/`, `stage.json`: what `VideoDiffusion.save`
writes) as an MLflow pyfunc model with the folder as an artifact, registered as a new
version with the alias `candidate` and lineage tags. Its input columns are its kind's
`Inputs` (model/tasks): text models take a `prompt`; image-to-video models an `image`
(PNG/JPEG bytes), multi-view models also the view's camera `elevation`; interpolation
and prediction models `frames` (an mp4 of the key frames or the context); an input
example shows one such request. Serving and `vdm sample` resolve `models:/NAME@ALIAS`
back to the folder with `download_pipeline`."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from components.common.media import video_bytes
from components.registry.promotion import CANDIDATE, describe_version, registered_version, registry_errors

PIPELINE_ARTIFACT = "pipeline"
# Generation settings every kind takes as pyfunc params (defaults: the model's own clip spec).
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
# Params whose 0 / "" means "the model's own" (MLflow params cannot be None).
UNSET_PARAMS = {"num_frames": 0, "fps": 0.0, "height": 0, "width": 0, "adapter": ""}
_COLUMN_TYPES = {"str": "string", "float": "double", "int": "long", "int | None": "long", "float | None": "double"}
OUTPUT = Schema([ColSpec("binary", "video_mp4")])


EXAMPLE_PROMPT = "a red disc moving to the right"
EXAMPLE_ELEVATION = 20.0


def input_example(task) -> tuple[pd.DataFrame, dict]:
    """The request MLflow shows with a version: one row of the kind's required inputs (and a
    prompt where it takes one; media as small files), with the sampling steps and seed."""
    import numpy as np
    from PIL import Image

    row: dict = {}
    for f in fields(task.Inputs):
        required = f.default is MISSING and f.default_factory is MISSING
        media = f.metadata.get("media")
        if media == "image":
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (128, 96, 64)).save(buffer, format="PNG")
            row[f.name] = buffer.getvalue()
        elif media == "video":  # two frames: interpolation's keys, prediction's context
            row[f.name] = video_bytes(np.full((2, 32, 32, 3), 128, dtype=np.uint8), 8.0)
        elif f.name == "prompt":
            row[f.name] = EXAMPLE_PROMPT
        elif required and f.name == "elevation":
            row[f.name] = EXAMPLE_ELEVATION
    return pd.DataFrame([row]), {"steps": 25, "seed": 0}


class _PyfuncFlavor:
    """`mlflow.pyfunc` as the flavor `Model.log` saves with, taking `validate_serving_input`:
    given an input example, `mlflow.pyfunc.log_model` loads the model and samples the example
    on the CPU (seconds for a tiny model, minutes and gigabytes for a full-size one), and it
    offers no way to skip that. The example is still checked against the signature."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        return mlflow.pyfunc.save_model(**kwargs)


def _input_columns(task) -> list[ColSpec]:
    """A column per field of the kind's `Inputs`: media as bytes (PNG/JPEG, mp4), the rest as is."""
    columns = []
    for f in fields(task.Inputs):
        required = f.default is MISSING and f.default_factory is MISSING
        kind = "binary" if "media" in f.metadata else _COLUMN_TYPES[str(f.type)]
        columns.append(ColSpec(kind, f.name, required=required))
    return columns


def signature_of(task) -> ModelSignature:
    """The pyfunc signature of a kind (model/tasks): its `Inputs` as columns, the shared
    generation settings and the kind's own (`generation_fields`) as params."""
    from model.pipeline import GenerationConfig

    defaults = GenerationConfig()
    own = [
        ParamSpec(name, _COLUMN_TYPES[type(getattr(defaults, name)).__name__], getattr(defaults, name))
        for name in task.generation_fields
    ]
    return ModelSignature(
        inputs=Schema(_input_columns(task)), outputs=OUTPUT, params=ParamSchema([*GENERATION_PARAMS, *own])
    )


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


def inputs_from_row(task, row: dict) -> object:
    """The kind's `Inputs` of one input row (column -> value; media as file bytes): media
    decoded, missing optional values left out; a missing required one is a ValueError
    naming it."""
    values = {}
    for f in fields(task.Inputs):
        value = row.get(f.name)
        if value is None or (isinstance(value, float) and pd.isna(value)):
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"this {task.name} model needs `{f.name}`")
            continue
        media = f.metadata.get("media")
        values[f.name] = decode_image(value) if media == "image" else decode_video(value) if media else value
    return task.Inputs(**values)


class VideoPipelineModel(mlflow.pyfunc.PythonModel):
    """One video per input row (mp4 bytes), from the kind's inputs (model/tasks): prompts,
    images, key or context frames."""

    def load_context(self, context) -> None:
        from model.stages import VideoDiffusion

        self.model = VideoDiffusion.load(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from model.pipeline import GenerationConfig, to_uint8

        task = self.model.task
        schema = signature_of(task)
        p = {s.name: s.default for s in schema.params} | (params or {})
        # Every param is a GenerationConfig field; the run form's 0 / "" mean "the model's own".
        settings = {k: (None if UNSET_PARAMS.get(k, object()) == v else v) for k, v in p.items()}
        config = GenerationConfig.for_clip(self.model.config.clip, **settings)
        videos = []
        for row in model_input.to_dict("records"):
            frames = task.sample(self.model, inputs_from_row(task, row), config)
            videos.append(video_bytes(to_uint8(frames).numpy(), config.fps))
        return pd.DataFrame({"video_mp4": videos})


def register_pipeline(folder: Path, name: str, lineage: Mapping[str, str], *, alias: str = CANDIDATE) -> ModelVersion:
    """Log `folder` as a pyfunc model in the active run, register it as a new version of
    `name`, tag the version with its lineage and give it `alias`."""
    from importlib.metadata import version

    from model.camera_lora import saved_adapters
    from model.folder import ModelFolder
    from model.tasks import task_of

    layout = ModelFolder(folder)
    task = task_of(layout.kind())

    run = mlflow.active_run()
    info = Model.log(
        artifact_path=None,
        name="pipeline",
        flavor=_PyfuncFlavor,
        flavor_name="python_function",
        validate_serving_input=False,
        python_model=str(Path(__file__).with_name("pyfunc_code.py")),  # models from code: nothing is unpickled
        artifacts={PIPELINE_ARTIFACT: str(folder)},
        signature=signature_of(task),
        input_example=input_example(task),
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
    client.set_model_version_tag(name, number, "vdm.kind", task.name)  # its API and its gate's metric
    if layout.random_weights():  # a test or demo model: nobody should promote it unawares
        client.set_model_version_tag(name, number, "vdm.random_weights", "true")
        client.set_model_version_tag(name, number, "vdm.random_parts", ",".join(layout.random_weights()))
    if run:
        client.set_model_version_tag(name, number, "vdm.training_run", run.info.run_id)
        # The data the run logged with `mlflow.log_input`: its digest (the dataset card's) on the version.
        for logged in client.get_run(run.info.run_id).inputs.dataset_inputs[:1]:
            client.set_model_version_tag(name, number, "vdm.dataset_digest", logged.dataset.digest)
    adapters = saved_adapters(folder)
    if adapters:  # camera-motion LoRA: the adapters this version can sample with
        client.set_model_version_tag(name, number, "vdm.adapters", ",".join(adapters))
    client.set_registered_model_alias(name, alias, number)
    describe_version(name, number)
    return client.get_model_version(name, number)


def download_pipeline(model_uri: str, destination: Path) -> Path:
    """The pipeline folder of a registered model (`models:/NAME@ALIAS`, `models:/NAME/3`); an
    unknown model, alias or version is a RegistryError naming the ones there are."""
    name, number = registered_version(model_uri)
    with registry_errors(name):
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{number}", dst_path=str(destination))
        )
    flavor = Model.load(local).flavors["python_function"]
    return local / flavor["artifacts"][PIPELINE_ARTIFACT]["path"]
