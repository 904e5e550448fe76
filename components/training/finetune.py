"""`vdm finetune KIND`: a finetune of a trained video model (SPEC section 3) against the
platform's services. Each kind is a config (`model/configs/<name>-<kind>.yaml`) that
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

# KIND -> what it makes; the config of a kind has `stage: KIND`.
FINETUNES = {
    "i2v": "image-to-video (SVD): animates a conditioning frame",
    "temporal-decoder": "the VAE decoder made temporal (SVD's video decoder): decoded frames do not flicker",
    "spatial-hq": "image-only spatial finetune (VideoCrafter2): spatial layers on high-quality images",
    "camera-lora": "camera-motion LoRA: one adapter per motion class, added to the model's others",
    "multiview": "multi-view (SVD-MV): an orbit around the object of a view, given its camera elevation",
    "interpolation": "frame interpolation (Video LDM): three frames between each pair of key frames",
    "prediction": "long-video prediction (Video LDM): continues 0, 1 or 2 context frames",
}


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
    if kind == "temporal-decoder":  # trains the VAE decoder, not the UNet: its own loop
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
