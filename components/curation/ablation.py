"""SVD's threshold ablation: from a finished curation, one filtered subset per
(score, percentile), each a complete dataset (shards, manifest, card) that a small
training run can consume, and each an MLflow run in `vdm-curation` (tagged with the
curation it was cut from). Nothing is re-annotated: the subsets are cut from the
published parts the curation run recorded in its card."""

from __future__ import annotations

import json

from components.common.objectstore import ObjectStore, S3Uri
from components.curation.config import SCORES, CurationConfig, Filter
from components.curation.tracking import finalize_and_log

TAG_ABLATION_OF = "vdm.ablation_of"

# Higher is worse for these scores: their ablation drops the top percent.
_HIGHER_IS_WORSE = {"text_ratio"}


def subset_filter(score: str, percent: float) -> Filter:
    if score in _HIGHER_IS_WORSE:
        return Filter(score=score, drop_highest_percent=percent)
    return Filter(score=score, drop_lowest_percent=percent)


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """['motion=12.5,25,50', 'aesthetic=25'] -> {'motion': [12.5, 25.0, 50.0], 'aesthetic': [25.0]}"""
    grid = {}
    for item in items:
        score, _, percents = item.partition("=")
        if score not in SCORES or not percents:
            raise ValueError(f"bad grid item {item!r}: expected SCORE=P1,P2,... with SCORE one of {SCORES}")
        grid[score] = [float(p) for p in percents.split(",")]
    return grid


def ablation_subsets(curated: str, grid: dict[str, list[float]], store: ObjectStore, config: CurationConfig) -> dict:
    """Write `<curated>/ablation/<score>-drop<percent>/` for every grid point and an
    `index.json` summarising them; returns the index."""
    base = S3Uri.parse(curated)
    card = json.loads(store.get_bytes(base.join("dataset_card.json")))
    parts = [S3Uri.parse(p) for p in card["parts"]]
    index = {}
    for score, percents in grid.items():
        for percent in percents:
            name = f"{score}-drop{percent:g}"
            subset_config = config.model_copy(update={"filters": (subset_filter(score, percent),)})
            sub, run = finalize_and_log(
                parts,
                base.join("ablation", name),
                subset_config,
                store,
                input_location=card.get("provenance", {}).get("input"),
                tags={TAG_ABLATION_OF: str(base)},
                write_subsets=False,  # an ablation point trains on its filtered set alone
            )
            index[name] = {
                "uri": str(base.join("ablation", name)),
                "clips": sub["clips_after_filter"],
                "hours": sub["hours_after_filter"],
                "thresholds": sub["thresholds"],
                "digest": sub["digest"],
                "mlflow_run": run.url,
            }
    store.put_bytes(base.join("ablation", "index.json"), json.dumps(index, indent=1).encode())
    return index
