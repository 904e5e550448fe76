"""KFP components of curation: plan (list inputs, group into shards), annotate one
shard (the ParallelFor body), finalize (merge, filter, shards, card). Lightweight
Python components on the project image: their bodies import our packages there.
Inputs are strings and numbers (the Kubeflow UI passes nothing else); the dataset
comes out as an artifact whose metadata carries its s3:// URIs."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def plan_curation(input_uri: str, videos_per_shard: int, config_yaml: str) -> list:
    """Input shards as [{"id", "videos"}]: fixed groups named by a hash of their members,
    so unchanged inputs keep their shard ids (and their cached steps)."""
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.curation.config import CurationConfig
    from components.curation.curate import input_shards, list_inputs

    config = CurationConfig.from_yaml(config_yaml)
    inputs = list_inputs(input_uri, ObjectStore.from_settings(load_settings()))
    if not inputs:
        raise ValueError(f"no input files under {input_uri}")
    size = videos_per_shard or config.output.videos_per_input_shard
    return [{"id": shard_id, "videos": videos} for shard_id, videos in input_shards(inputs, size)]


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
def finalize_curation(parts: list, output_uri: str, config_yaml: str, dataset: Output[Artifact]):
    """Filters over all clips, WebDataset shards, manifest, rejected list, dataset card."""
    from components.common.objectstore import ObjectStore, S3Uri
    from components.common.settings import load_settings
    from components.curation.config import CurationConfig
    from components.curation.finalize import finalize

    out = S3Uri.parse(output_uri)
    config, store = CurationConfig.from_yaml(config_yaml), ObjectStore.from_settings(load_settings())
    card = finalize([S3Uri.parse(p) for p in sorted(parts)], out, config, store)
    dataset.metadata.update(
        {
            "uri": str(out),
            "shards": str(out.join("shards")) + "/",
            "card": str(out.join("dataset_card.html")),
            "clips": int(card["clips_after_filter"]),
            "hours": float(card["hours_after_filter"]),
        }
    )
