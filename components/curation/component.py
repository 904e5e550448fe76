"""KFP components of curation: plan (list inputs, group into shards), annotate one
shard (the ParallelFor body), finalize (merge, filter, shards, card). Lightweight
Python components on the project image: their bodies import our packages there.
Inputs are strings and numbers (the Kubeflow UI passes nothing else); the dataset
comes out as an artifact whose metadata carries its s3:// URIs, and the dataset card as
an HTML artifact the Kubeflow UI renders."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def plan_curation(input_uri: str, videos_per_shard: int, config_yaml: str, output_uri: str = "") -> list:
    """Input shards as [{"id", "videos"}]: groups named by a hash of their members, so unchanged
    inputs keep their shard ids (and their cached steps). With `output_uri`: fails at once unless
    it can be written, and lists the parts published there by earlier runs as shards of their own
    (videos empty: the annotate step skips them), so a grown prefix annotates only new videos."""
    from components.common.objectstore import ObjectStore, S3Uri
    from components.common.settings import load_settings
    from components.curation.config import CurationConfig
    from components.curation.curate import plan_input_shards

    config = CurationConfig.from_yaml(config_yaml)
    if videos_per_shard:
        config = config.model_copy(
            update={"output": config.output.model_copy(update={"videos_per_input_shard": videos_per_shard})}
        )
    store = ObjectStore.from_settings(load_settings())
    output = S3Uri.parse(output_uri) if output_uri else None
    if output is not None:
        store.check_writable(output)
    shards = [{"id": s.id, "videos": list(s.videos)} for s in plan_input_shards(input_uri, output, config, store)]
    if not shards:
        raise ValueError(f"no input files under {input_uri}")
    return shards


@dsl.component(base_image=IMAGE)
def annotate_input_shard(
    shard: dict, output_uri: str, config_yaml: str, random_weights: bool, workers: int, gpus: str = "0"
) -> str:
    """Decode, cut, flow, neural annotators for one input shard; publishes
    `<output>/parts/<shard id>/` (skipped when already published) and returns its URI.
    `gpus`: the GPUs the step's pod requested; "0" hides every GPU (CUDA_VISIBLE_DEVICES="",
    so a CPU pod that lands on a GPU node leaves its GPUs alone), else the neural annotators
    run on CUDA (bf16 autocast; `neural.device` "auto")."""
    import os

    if not float(gpus or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from components.common.objectstore import ObjectStore, S3Uri
    from components.common.settings import load_settings
    from components.curation.annotate import Annotators, annotate_shard
    from components.curation.config import CurationConfig, with_random_weights

    config = CurationConfig.from_yaml(config_yaml)
    config = with_random_weights(config) if random_weights else config
    store = ObjectStore.from_settings(load_settings())
    part = S3Uri.parse(output_uri).join("parts", shard["id"])
    info = annotate_shard(shard["videos"], part, config, store, Annotators(config, store), workers=workers or 1)
    print(f"{shard['id']}: {info['clips']} clips, {info['rejected']} rejected, skipped={info['skipped']}")
    return str(part)


@dsl.component(base_image=IMAGE)
def finalize_curation(
    parts: list, input_uri: str, output_uri: str, config_yaml: str, dataset: Output[Dataset], card: Output[HTML]
) -> NamedTuple(
    "CurationOutputs",
    [("shards", str), ("heldout_shards", str), ("prompt_set", str), ("hq_shards", str), ("lvd_shards", str)],
):
    """Filters over all clips, WebDataset shards of each subset, manifest, rejected list, dataset
    card (also the `card` artifact: the same self-contained page), as an MLflow run in `vdm-curation`.
    Outputs: `shards` (the filtered set lvd-f's training prefix), `heldout_shards` (the held-out
    split's prefix, the evaluation's reference clips), `prompt_set` (the evaluation prompt set,
    prompts.jsonl), `hq_shards` (the hq subset's training prefix), `lvd_shards` (every clip's)."""
    from collections import namedtuple
    from pathlib import Path

    from components.common.objectstore import ObjectStore, S3Uri
    from components.common.settings import load_settings
    from components.curation.config import CurationConfig
    from components.curation.tracking import finalize_and_log

    out = S3Uri.parse(output_uri)
    config, store = CurationConfig.from_yaml(config_yaml), ObjectStore.from_settings(load_settings())
    parts = [S3Uri.parse(p) for p in sorted(parts)]
    figures, run = finalize_and_log(parts, out, config, store, input_location=input_uri)
    card_uri = out.join("dataset_card.html")
    Path(card.path).write_bytes(store.get_bytes(card_uri))
    card.metadata["uri"] = str(card_uri)
    dataset.metadata.update(
        {
            "uri": str(out),
            "shards": str(out.join("shards")) + "/",
            "card": str(card_uri),
            "clips": int(figures["clips_after_filter"]),
            "hours": float(figures["hours_after_filter"]),
            "mlflow_run": run.url,
            "heldout_shards": figures["heldout"]["shards"],
            "heldout_clips": int(figures["splits"]["heldout"]["clips"]),
            "prompt_set": figures["heldout"]["prompt_set"],
            "prompts": int(figures["heldout"]["prompts"]),
            "subsets": {
                name: {"shards": f["shards"], "clips": int(f["clips"]), "train_clips": int(f["train_clips"])}
                for name, f in figures["subsets"].items()
            },
        }
    )
    outputs = namedtuple("CurationOutputs", ["shards", "heldout_shards", "prompt_set", "hq_shards", "lvd_shards"])
    subsets = figures["subsets"]
    return outputs(
        dataset.metadata["shards"],
        figures["heldout"]["shards"],
        figures["heldout"]["prompt_set"],
        subsets["hq"]["shards"],
        subsets["lvd"]["shards"],
    )
