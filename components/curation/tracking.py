"""Each curation is an MLflow run in the `vdm-curation` experiment: the config and the
filters' thresholds as params, the dataset card's figures as metrics, the card as
artifacts and the outputs' URIs as tags, so curations can be compared in the MLflow UI."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow

from components.common.objectstore import ObjectStore, S3Uri
from components.common.settings import Settings
from components.common.tracking import run_url, tracked_run
from components.curation.config import CurationConfig
from components.curation.finalize import finalize

EXPERIMENT = "vdm-curation"
TAG_OUTPUT = "vdm.output"
TAG_MANIFEST = "vdm.manifest"
TAG_REJECTED = "vdm.rejected"
TAG_SHARDS = "vdm.shards"
TAG_CARD = "vdm.dataset_card"
TAG_DIGEST = "vdm.dataset_digest"
TAG_HELDOUT_SHARDS = "vdm.heldout_shards"
TAG_PROMPT_SET = "vdm.prompt_set"
# The shards of each curated subset (lvd, lvd-f, hq): `vdm.subset.<name>.shards`.
TAG_SUBSET_SHARDS = "vdm.subset.{}.shards"


@dataclass(frozen=True)
class CurationRun:
    """The MLflow run that records one curation."""

    run_id: str
    url: str


def mlflow_name(name: str) -> str:
    """A filter or reason name as an MLflow param or metric key (no `=` or `&`)."""
    return re.sub(r"[^/\w.\- :]", "_", name)


@contextmanager
def curation_run(
    input_location: str | None,
    output: S3Uri,
    config: CurationConfig,
    *,
    tags: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> Iterator[CurationRun]:
    """An MLflow run around a curation (FAILED if the body raises); log the card with `log_card`."""
    with tracked_run(
        EXPERIMENT,
        run_name=f"curate {output.key}",
        config=config.model_dump(mode="json"),
        inputs=[input_location] if input_location else [],
        tags={TAG_OUTPUT: str(output), **(tags or {})},
        settings=settings,
    ) as run:
        yield CurationRun(run.info.run_id, run_url(run, settings))


def log_card(card: dict, output: S3Uri, store: ObjectStore) -> None:
    """Log a finished curation's card (published under `output`) on the active run."""
    mlflow.set_tags(
        {
            TAG_MANIFEST: str(output.join("manifest.jsonl")),
            TAG_REJECTED: str(output.join("rejected.jsonl")),
            TAG_SHARDS: str(output.join("shards")) + "/",
            TAG_CARD: str(output.join("dataset_card.html")),
            TAG_DIGEST: card["digest"],
            TAG_HELDOUT_SHARDS: card["heldout"]["shards"],
            TAG_PROMPT_SET: card["heldout"]["prompt_set"],
            **{
                TAG_SUBSET_SHARDS.format(name): figures["shards"]
                for name, figures in card["subsets"].items()
                if figures["shards"]
            },
        }
    )
    thresholds = {
        f"threshold.{mlflow_name(name)}": bound.get("min", bound.get("max"))
        for name, bound in card["thresholds"].items()
    }
    hq_thresholds = {
        f"hq_threshold.{mlflow_name(name)}": bound.get("min", bound.get("max"))
        for name, bound in card["subsets"]["hq"]["thresholds"].items()
    }
    mlflow.log_params({**thresholds, **hq_thresholds, "random_weights": card["random_weights"]})
    metrics = {
        key: card[key]
        for key in (
            "input_files",
            "clips_before_filter",
            "clips_after_filter",
            "hours_before_filter",
            "hours_after_filter",
            "mean_clip_seconds",
            "mean_caption_words",
            "rejected_files",
        )
    }
    metrics |= {f"dropped.{mlflow_name(reason)}": n for reason, n in card["drops_per_filter"].items()}
    metrics |= {
        f"dropped_by_both.{mlflow_name(pair.replace('&', ' and '))}": n for pair, n in card["drop_overlaps"].items()
    }
    metrics |= {f"rejected.{mlflow_name(reason)}": n for reason, n in card["rejected_per_reason"].items()}
    metrics |= {f"camera_motion_kept.{mlflow_name(m)}": n for m, n in card["camera_motion_kept"].items()}
    metrics |= {f"{figure}_{split}": f[figure] for split, f in card["splits"].items() for figure in ("clips", "hours")}
    metrics["prompts"] = card["heldout"]["prompts"]
    # The subsets side by side: subset.<name>.clips, .hours, .train_clips, .train_hours, and each
    # score's median (subset.<name>.median.<score>).
    for name, figures in card["subsets"].items():
        metrics |= {f"subset.{name}.{k}": figures[k] for k in ("clips", "hours", "train_clips", "train_hours")}
        metrics |= {f"subset.{name}.median.{score}": d["median"] for score, d in figures["scores"].items() if d["n"]}
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_dict(card, "dataset_card.json")
    mlflow.log_text(store.get_bytes(output.join("dataset_card.html")).decode(), "dataset_card.html")


def finalize_and_log(
    parts: list[S3Uri],
    output: S3Uri,
    config: CurationConfig,
    store: ObjectStore,
    *,
    input_location: str | None = None,
    tags: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    write_subsets: bool = True,
) -> tuple[dict, CurationRun]:
    """`finalize` as its own MLflow run (the pipeline's finalize step, ablation subsets):
    the card and the run."""
    with curation_run(input_location, output, config, tags=tags, settings=settings) as run:
        card = finalize(parts, output, config, store, input_location=input_location, write_subsets=write_subsets)
        log_card(card, output, store)
    return card, run
