"""The evaluation step against the real local stack: a registered tiny model measured by its
kind's figures plus FVD, CLIP score and aesthetic score (random networks, said so), its
prompts taken from a prompt set, every figure and the protocol on the version, and a report
whose champion videos come from the same inputs and seeds as the candidate's."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.common.tracking import tracked_run
from components.evaluation.config import EvaluationNetworks, networks_from
from components.evaluation.evaluate import protocol_digest, run_evaluation
from components.evaluation.prompts import default_prompt_set, parse_prompt_set, read_prompt_set
from components.registry.pipeline_model import register_pipeline
from components.registry.promotion import CHAMPION
from components.sample_data.shards import write_shapes_shards
from model.stages import named_config
from model.train import train

PROMPTS = ["a red disc drifts right", "a blue square falls", "two shapes cross"]


def test_a_prompt_set_is_versioned_by_its_content_and_names_a_bad_line(store, prefix, tmp_path):
    text = "".join(json.dumps({"prompt": p, "key": f"k{i}"}) + "\n" for i, p in enumerate(PROMPTS))
    parsed = parse_prompt_set(text, "prompts.jsonl")
    assert parsed.prompts == tuple(PROMPTS) and parsed.first(2) == tuple(PROMPTS[:2])
    assert parsed.digest == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert parse_prompt_set(text + '{"prompt": "one more"}\n', "x").digest != parsed.digest
    with pytest.raises(ValueError, match=r"x line 2: expected \{\"prompt\""):
        parse_prompt_set('{"prompt": "fine"}\n{"text": "no"}\n', "x")
    with pytest.raises(ValueError, match="x line 1: the prompt must be a non-empty string"):
        parse_prompt_set('{"prompt": " "}\n', "x")
    # Curation's set beside held-out shards in the object store is the default; none there: None.
    store.put_bytes(f"{prefix}/heldout/prompts.jsonl", text.encode())
    found = default_prompt_set(f"{prefix}/heldout/", store)
    assert found is not None and found.prompts == tuple(PROMPTS) and found.uri == f"{prefix}/heldout/prompts.jsonl"
    assert default_prompt_set(f"{prefix}/elsewhere/", store) is None
    with pytest.raises(ValueError, match="no prompt set at"):
        read_prompt_set(str(tmp_path / "missing.jsonl"), store)


def test_networks_must_be_named_or_random_by_choice(tmp_path):
    with pytest.raises(ValueError, match="no evaluation networks configured"):
        networks_from(None)
    assert networks_from(None, random_networks=True) == EvaluationNetworks(allow_random_networks=True)
    (tmp_path / "n.yaml").write_text("networks:\n  i3d: weights:i3d-k400\n  clip: weights:clip\n")
    named = networks_from(str(tmp_path / "n.yaml"))
    assert named.i3d == "weights:i3d-k400" and not named.allow_random_networks
    assert named.weights_names() != EvaluationNetworks().weights_names()


def test_the_protocol_changes_with_anything_that_makes_figures_incomparable():
    base = {"kind": "video", "data": "d", "reference": None, "prompts": "p", "prompt_count": None, "clips": 8,
            "steps": 25, "networks": EvaluationNetworks().weights_names()}  # fmt: skip
    digest = protocol_digest(**base)
    assert re.fullmatch(r"[0-9a-f]{16}", digest) and protocol_digest(**dict(base)) == digest
    for key, other in (("data", "e"), ("prompts", "q"), ("clips", 9), ("steps", 20),
                       ("networks", EvaluationNetworks(i3d="weights:x").weights_names())):  # fmt: skip
        assert protocol_digest(**base | {key: other}) != digest, key


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=2)
    config = replace(named_config("tiny", "video"), max_steps=1)
    return train(config, [str(p) for p in paths], tmp_path_factory.mktemp("train")).final


def test_evaluation_records_every_figure_and_shows_the_champion_on_the_same_inputs(
    settings, store, final, request, tmp_path
):
    name = f"vdm-test-{request.node.name[:40]}"
    with tracked_run("vdm-test-evaluation", settings=settings):
        register_pipeline(final, name, {})
        register_pipeline(final, name, {})  # the same weights again: v2
    MlflowClient().set_registered_model_alias(name, CHAMPION, "1")
    write_shapes_shards(tmp_path / "heldout", shards=1, clips_per_shard=3, seed=5)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    report = run_evaluation(
        f"models:/{name}/2", str(tmp_path / "heldout"), store, settings,
        networks=EvaluationNetworks(allow_random_networks=True, tiny=True),
        clips=3, steps=2, prompts_uri=str(prompts), prompts=2, report_videos=2,
    )  # fmt: skip

    metrics = report.metrics
    assert metrics["clips"] == 3.0
    for figure in ("fvd", "clip_score", "aesthetic", "motion_speed_error"):
        assert math.isfinite(metrics[figure]), figure
    assert metrics["fvd"] >= 0 and -1 <= metrics["clip_score"] <= 1
    assert report.random_networks == ("aesthetic", "clip", "i3d")
    tags = MlflowClient().get_model_version(name, "2").tags
    for figure, value in metrics.items():
        assert float(tags[f"vdm.eval.{figure}"]) == pytest.approx(value), figure
    assert tags["vdm.eval_protocol"] == report.protocol and re.fullmatch(r"[0-9a-f]{16}", report.protocol)
    assert tags["vdm.eval_random_networks"] == "aesthetic,clip,i3d"
    assert tags["vdm.eval_report_url"] == report.report_url == f"{report.mlflow_run}/artifacts/report.html"
    digest = hashlib.sha256(prompts.read_bytes()).hexdigest()[:16]
    assert report.prompt_set == f"{prompts} ({digest})"

    run = MlflowClient().get_run(tags["vdm.eval_run"])
    assert run.data.params["prompt_set_version"] == digest and run.data.params["protocol"] == report.protocol
    page = MlflowClient().download_artifacts(run.info.run_id, "report.html", str(tmp_path))
    html = Path(page).read_text()
    assert html == report.page
    # The gate's view at evaluation time: v1, the champion, was never evaluated, so no promotion.
    assert report.promoted is False and "v1" in report.decision and report.decision in html
    # Text kinds cycle through the first `prompts` prompts: rows show prompts 0 and 1, never 2.
    assert PROMPTS[0] in html and PROMPTS[1] in html and PROMPTS[2] not in html
    images = re.findall(r"src=['\"](data:image/webp;base64,[^'\"]+)", html)
    assert len(images) == 4  # two rows, candidate and champion
    # v1 and v2 hold the same weights: on the same inputs and seeds their videos are the same.
    assert images[0] == images[1] and images[2] == images[3] and images[0] != images[2]
