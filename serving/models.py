"""The models a pod serves: `models:/NAME@ALIAS` resolved in the MLflow registry,
downloaded once per version into a cache, loaded, and swapped atomically when the
alias moves. A request takes the current `ServedModel` once and keeps it, so requests
in flight finish on the version they started with while new ones get the new one."""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from mlflow import MlflowClient

from components.common.tracking import connect
from components.registry.pipeline_model import download_pipeline
from model.camera_lora import adapter_names
from model.stages import VideoDiffusion
from serving.metrics import GPU_MEMORY_BYTES, MODEL_LOAD_SECONDS, SERVED_MODEL

log = logging.getLogger(__name__)
Kind = Literal["text", "image"]
COMPLETE = ".complete"  # written after a download finishes: a half-downloaded version is fetched again


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str
    run_id: str | None
    lineage: dict[str, str]
    pipeline: VideoDiffusion = field(repr=False)
    # The adapter in use is state of the shared UNet: a model with adapters samples one
    # request at a time (one without them runs requests side by side).
    sampling_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def kind(self) -> Kind:
        return self.pipeline.task.conditioning

    @property
    def device(self) -> torch.device:
        return next(self.pipeline.unet.parameters()).device

    def info(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "kind": self.kind,
            "run_id": self.run_id,
            "lineage": self.lineage,
            "device": str(self.device),
            "default_clip": asdict(self.pipeline.config.clip),
            "camera_motions": self.camera_motions,
        }

    @functools.cached_property  # read on every request; a loaded model's adapters do not change
    def camera_motions(self) -> list[str]:
        """The camera-motion adapters this model can sample with (`camera_motion`)."""
        return adapter_names(self.pipeline.unet)


def serving_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def record_gpu_memory() -> None:
    if torch.cuda.is_available():
        GPU_MEMORY_BYTES.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY_BYTES.labels("reserved").set(torch.cuda.memory_reserved())


def load_version(client: MlflowClient, name: str, version: str, alias: str, cache: Path) -> ServedModel:
    """One registered version, downloaded into `cache/NAME/VERSION` unless already there."""
    start = time.perf_counter()
    destination = cache / name / version
    if not (destination / COMPLETE).exists():
        destination.mkdir(parents=True, exist_ok=True)
        folder = download_pipeline(f"models:/{name}/{version}", destination)
        (destination / COMPLETE).write_text(str(folder.relative_to(destination)))
    folder = destination / (destination / COMPLETE).read_text()
    pipeline = VideoDiffusion.load(folder).to(serving_device()).eval()
    details = client.get_model_version(name, version)
    lineage = {k: v for k, v in details.tags.items() if k.startswith("vdm.")}
    MODEL_LOAD_SECONDS.labels(name).observe(time.perf_counter() - start)
    record_gpu_memory()
    return ServedModel(name, version, alias, details.run_id, lineage, pipeline)


class UnknownKind(LookupError):
    """No served model does what the request asks (e.g. image-to-video on a text model)."""


class LiveModels:
    """The current version of each configured model, kept in step with the alias."""

    def __init__(self, names: tuple[str, ...], alias: str, cache: Path):
        if not names:
            raise ValueError("no model to serve: set VDM_SERVE_MODELS (or `vdm serve --model NAME`)")
        self.names, self.alias, self.cache = names, alias, cache
        self._by_name: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # one refresh at a time; readers never wait on it

    @property
    def ready(self) -> bool:
        return len(self._by_name) == len(self.names)

    def get(self, kind: Kind) -> ServedModel:
        for served in list(self._by_name.values()):
            if served.kind == kind:
                return served
        loaded = ", ".join(f"{m.name} v{m.version} ({m.kind})" for m in self._by_name.values()) or "none yet"
        raise UnknownKind(f"no {kind}-to-video model is served here (loaded: {loaded})")

    def all(self) -> list[ServedModel]:
        return list(self._by_name.values())

    def refresh(self) -> list[str]:
        """Load the version each alias points at where it moved; returns what changed."""
        with self._lock:
            connect()
            client = MlflowClient()
            changes = []
            for name in self.names:
                version = client.get_model_version_by_alias(name, self.alias).version
                current = self._by_name.get(name)
                if current and current.version == version:
                    continue
                served = load_version(client, name, version, self.alias, self.cache)
                clash = [m for m in self._by_name.values() if m.kind == served.kind and m.name != name]
                if clash:
                    raise ValueError(f"{name} and {clash[0].name} are both {served.kind}-to-video models")
                self._by_name = {**self._by_name, name: served}  # one assignment: readers see old or new
                if current:
                    SERVED_MODEL.labels(current.kind, name, current.version, self.alias).set(0)
                SERVED_MODEL.labels(served.kind, name, version, self.alias).set(1)
                changes.append(f"{name}@{self.alias}: v{current.version if current else '-'} -> v{version}")
                log.info("serving %s v%s (%s-to-video) on %s", name, version, served.kind, served.device)
            return changes

    def poll(self, every: float, stop: threading.Event) -> None:
        """Refresh every `every` seconds until `stop`; a failed check keeps the current models."""
        while not stop.wait(every):
            try:
                self.refresh()
            except Exception:
                log.exception("checking %s for a moved alias failed; still serving what is loaded", self.names)
