"""`vdm finetune KIND`: a finetune of a trained video model against the platform's
services. Each kind (model/tasks) has a config (`model/configs/<name>-<kind>.yaml`) that
`run_training` trains like a stage — data from curated shards, checkpoints and resume,
MLflow tracking, registration as `candidate` with lineage — starting from a trained
model (`init_from`: a folder, s3://, models:/, or for image-to-video an SVD-format folder).
A plain function, so a KFP component can call it as the training component calls
`run_training`."""

from __future__ import annotations

from pathlib import Path

from components.common.objectstore import ObjectStore
from components.common.settings import Settings
from components.training.run import run_training
from model.tasks import FINETUNES


def default_model_name(kind: str, config_name: str) -> str:
    return f"vdm-{kind}-{Path(config_name).stem}"


def run_finetune(
    kind: str,
    config_name: str,
    data: str,
    output: str,
    init_from: str,
    store: ObjectStore,
    settings: Settings,
    *,
    overrides: dict | None = None,
    resume: bool = False,
    register_as: str | None = None,
    progress: bool = True,
) -> dict:
    """Finetune `init_from` as `kind`; the result is `run_training`'s summary."""
    if kind not in FINETUNES:
        raise ValueError(f"unknown finetune {kind!r}; one of {sorted(FINETUNES)}")
    if not init_from:
        raise ValueError("a finetune starts from a trained model: give --init-from")
    if FINETUNES[kind].trains == "vae":  # the temporal decoder trains the VAE decoder, not the UNet: its own loop
        from components.training.temporal_decoder import run_temporal_decoder_finetune

        return run_temporal_decoder_finetune(
            config_name, data, output, init_from, store, settings,
            overrides=overrides, resume=resume, register_as=register_as, progress=progress,
        )  # fmt: skip
    return run_training(
        kind,  # a finetune's config names its kind as its stage
        config_name,
        data,
        output,
        store,
        settings,
        init_from=init_from,
        overrides=overrides,
        resume=resume,
        register_as=register_as,
        progress=progress,
        experiment=f"vdm-finetune-{kind}",
    )
