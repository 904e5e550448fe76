"""`vdm personalize`: a personalized text-to-video model (model/personalize.py) against the
platform's services.

The subject images come from a local folder or an s3:// prefix (PNG, JPEG or WebP, 3 to 8 of
them); the Stage I image model and the trained video model from a folder, s3:// or
`models:/NAME@ALIAS`. Everything is checked before any training: the token, the number of
images, that the video model's spatial layout, VAE and text encoder are the image model's,
and the realignment data's shards. MLflow (`vdm-personalize`) records the subject images, the
class images the base model generated (the prior), the losses (DreamBooth's, and the
realignment's as `realign_*`) and a sample video of the subject prompt. Published under
`<output>/`: `image/` (the DreamBooth Stage I model), `final/` (the personalized video model,
of the video model's kind) and `result.json`; the final folder is registered as a `candidate`
version of `register_as` (default vdm-personalized), served by the text_to_video endpoint.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch

from components.common.media import write_video
from components.common.objectstore import ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings
from components.common.tracking import tracked_run
from components.training.request import RunResult
from components.training.run import (
    frame_grid,
    local_folder,
    metrics_logger,
    publish_final,
    random_weights_tags,
    refuse_published,
    shard_urls,
    write_png,
    write_summary,
)
from model.data import ClipSpec, fit_frames
from model.personalize import (
    PersonalizeConfig,
    check_pair,
    check_subject_images,
    dreambooth,
    personalized_model,
    realign_config,
    subject_stills,
)
from model.pipeline import GenerationConfig, generate, to_uint8
from model.stages import VideoDiffusion
from model.train import train
from model.training import OptimConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REGISTERED_NAME = "vdm-personalized"
IMAGE_FOLDER = "image"  # <output>/image: the DreamBooth Stage I model
EXPERIMENT = "vdm-personalize"


@dataclass(frozen=True)
class PersonalizationRequest:
    images: str  # folder or s3:// prefix of the subject's images
    token: str  # the rare identifier, e.g. "sks"
    class_noun: str  # what the subject is, e.g. "disc"
    image_model: str  # the Stage I model (folder, s3://, models:/NAME@ALIAS)
    video_model: str  # the trained text-to-video model whose temporal layers animate it
    output: str  # s3:// prefix
    register_as: str | None = REGISTERED_NAME  # None: not registered
    max_steps: int = 200
    prior_loss_weight: float = 1.0
    class_images: int = 8
    lr: float = 5e-4
    lora_rank: int | None = None  # None: every UNet weight trains; a rank: DreamBooth-LoRA
    # Realignment (model/personalize.py): the video data (folder or s3:// shards, e.g. what the video
    # model trained on) and steps on it; None and 0: none.
    realign_data: str | None = None
    realign_steps: int = 0
    realign_stills: int = 1
    seed: int = 0
    # The run this is (a KFP run's id; None: a CLI run): a retry of that run replaces what it published.
    run_id: str | None = None

    def config(self) -> PersonalizeConfig:
        return PersonalizeConfig(
            token=self.token,
            class_noun=self.class_noun,
            max_steps=self.max_steps,
            prior_loss_weight=self.prior_loss_weight,
            class_images=self.class_images,
            optim=OptimConfig(lr=self.lr, warmup_steps=10, ema_decay=0.0),
            lora_rank=self.lora_rank,
            realign_steps=self.realign_steps,
            realign_stills=self.realign_stills,
            seed=self.seed,
        )

    def __post_init__(self):
        if self.realign_steps > 0 and not self.realign_data:
            raise ValueError("realign data: realignment trains on video data; give its shards (--realign-data)")


def subject_image_files(images: str, store: ObjectStore) -> list[str]:
    """The image files (paths or s3:// URIs) under `images`, sorted; a ValueError unless a few."""
    if is_s3_uri(images):
        found = [str(o.uri) for o in store.list(images) if o.uri.key.lower().endswith(IMAGE_SUFFIXES)]
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"images: {images} is not a folder (or an s3:// prefix) of subject images")
        found = [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    check_subject_images(len(found))
    return sorted(found)


def read_subject_images(files: list[str], store: ObjectStore, height: int, width: int) -> torch.Tensor:
    """(N, 3, height, width) in [-1, 1]: each image resized (shorter side) and centre-cropped."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for name in files:
        data = store.get_bytes(S3Uri.parse(name)) if is_s3_uri(name) else Path(name).read_bytes()
        try:
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except UnidentifiedImageError:
            raise ValueError(f"images: {name} is not a readable image") from None
        frame = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1
        images.append(fit_frames(frame[None], height, width)[0])
    return torch.stack(images)


def refuse_published_outputs(out: S3Uri, store: ObjectStore, run_id: str | None) -> bool:
    """Whether `<out>/image` and `<out>/final`, where published, are this run's (a retried KFP
    step: they are replaced); a ValueError when another run (or any CLI run) published one."""
    owned = [refuse_published(folder, store, run_id) for folder in (out.join(IMAGE_FOLDER), out.join("final"))]
    return any(owned)


def run_personalization(
    request: PersonalizationRequest, store: ObjectStore, settings: Settings, progress: bool = True
) -> RunResult:
    """DreamBooth on the Stage I model, the video model's temporal layers onto it; publish
    and register (module docstring)."""
    config = request.config()
    out = S3Uri.parse(request.output)
    files = subject_image_files(request.images, store)
    realign_shards = shard_urls(request.realign_data, store) if config.realign_steps else []
    replace_final = refuse_published_outputs(out, store, request.run_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="vdm-personalize-") as tmp:
        scratch = Path(tmp)
        image = VideoDiffusion.load(local_folder(request.image_model, store, scratch / "image-model"))
        video = VideoDiffusion.load(local_folder(request.video_model, store, scratch / "video-model"))
        check_pair(image, video)  # before any training
        clip = image.config.clip
        subject = read_subject_images(files, store, clip.height, clip.width)
        image.to(device)
        lineage = {
            "images": request.images,
            "image_model": request.image_model,
            "video_model": request.video_model,
            "realign_data": request.realign_data or "",
            "output": request.output,
        }
        params = {**asdict(config), "subject_prompt": config.subject_prompt, "class_prompt": config.class_prompt}
        with tracked_run(
            EXPERIMENT,
            run_name=f"{config.token}-{config.class_noun}",
            config={**params, **lineage},
            inputs=[request.images],
            settings=settings,
        ) as run:
            mlflow.set_tags(
                {
                    "vdm.kind": video.config.stage,
                    "vdm.personalized_token": config.token,
                    "vdm.class_noun": config.class_noun,
                    "vdm.subject_prompt": config.subject_prompt,
                    "vdm.image_model": request.image_model,
                    "vdm.video_model": request.video_model,
                }
            )
            _log_images(subject, scratch / "subject.png")
            result = dreambooth(image, subject, config, metrics_logger(progress, config.max_steps))
            if len(result.class_images):
                _log_images(result.class_images, scratch / "class_images.png")
            mlflow.log_metric("class_images", len(result.class_images))
            personal = personalized_model(result.model, video.to(device))
            if config.realign_steps:
                personal = _realign(personal, subject, config, realign_shards, scratch, progress)
            mlflow.set_tags(random_weights_tags(personal.random_weights))
            sample = generate(personal, config.subject_prompt, GenerationConfig.for_clip(video.config.clip, steps=20))
            folder = scratch / "samples"
            folder.mkdir()
            write_video(folder / "subject.mp4", to_uint8(sample).numpy(), video.config.clip.fps, deterministic=False)
            write_png(frame_grid([sample]), folder / "frames.png")
            mlflow.log_artifacts(str(folder), "samples")
            dreambooth_folder = result.model.save(scratch / "dreambooth")
            image_uri = out.join(IMAGE_FOLDER)
            store.publish_folder(dreambooth_folder, image_uri, run_id=request.run_id, replace=replace_final)
            final, version = publish_final(
                personal.save(scratch / "final"), out, store, scratch, request.images, request.register_as, None,
                run_id=request.run_id, replace=replace_final,
            )  # fmt: skip
        metrics = {"loss": result.losses[-1]} if result.losses else {}
        if result.prior_losses:
            metrics["prior_loss"] = result.prior_losses[-1]
        return write_summary(
            out, store, settings, run, config.max_steps, final, request.register_as, version, None, metrics
        )


def _realign(
    personal: VideoDiffusion,
    subject: torch.Tensor,
    config: PersonalizeConfig,
    shards: list[str],
    scratch: Path,
    progress: bool,
) -> VideoDiffusion:
    """The transferred model's temporal layers trained on `shards` plus the subject's stills
    (model/personalize.py); its figures logged as `realign_*` in the active run."""
    start = personal.save(scratch / "transferred")
    stills = _write_stills(scratch / "stills", subject, config, personal.config.clip)
    result = train(
        realign_config(personal.config, config.realign_steps, config.seed),
        [*shards, *stills],
        scratch / "realign",
        init_from=start,
        on_log=metrics_logger(progress, config.realign_steps, prefix="realign_"),
    )
    mlflow.log_metric("realign_still_clips", len(subject) * config.realign_stills)
    return result.model.eval()


def _write_stills(folder: Path, subject: torch.Tensor, config: PersonalizeConfig, spec: ClipSpec) -> list[str]:
    """A shard of `config.realign_stills` still clips of each subject image, captioned with the
    subject prompt, motion 0 (none when realign_stills is 0)."""
    if config.realign_stills == 0:
        return []
    import webdataset as wds

    from components.sample_data.shards import clip_metadata
    from model.records import STATIC

    folder.mkdir(parents=True)
    clips, fps = subject_stills(subject, spec)
    path = folder / "subject-stills-000000.tar"
    with wds.TarWriter(str(path), mtime=0) as tar:
        for i, clip in enumerate(clips):
            video = folder / "still.mp4"
            write_video(video, to_uint8(clip).numpy(), fps)
            mp4 = video.read_bytes()  # encoded once, stored as each copy
            for copy in range(config.realign_stills):
                key = f"subject-{i:02d}-{copy:02d}"
                meta = clip_metadata(key, len(clip), fps, 0.0, STATIC, config.subject_prompt)
                tar.write({"__key__": key, "mp4": mp4, "json": meta.to_json()})
    return [str(path)]


def _log_images(images: torch.Tensor, path: Path) -> None:
    """A row of images (N, 3, H, W) as one PNG in the active run."""
    write_png(frame_grid([images], columns=len(images)), path)
    mlflow.log_artifact(str(path))
