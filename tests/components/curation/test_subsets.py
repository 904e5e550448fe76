"""Curation's staged subsets (SVD's LVD -> LVD-F -> HQ) on synthetic clips whose scores are known,
finalized against the real local S3 server and MLflow: exact membership (hq < lvd-f < lvd), each
subset's folder of shards read back by the training loader, and the card's figures per subset."""

from __future__ import annotations

import html as html_lib
import io
import json
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from curated_parts import mp4, publish_part

from components.common.objectstore import S3Uri
from components.common.tracking import card_digest, connect
from components.curation.config import CurationConfig, Filter, Subsets
from components.curation.finalize import EMPTY_HQ, apply_filters, apply_subsets, finalize, heldout_split, thresholds
from components.curation.tracking import finalize_and_log
from model.records import HELDOUT, HQ, SMALL, TRAIN, ClipRecord, Rendition

INPUT = "s3://raw"
SMALL_SIZE, HQ_SIZE = (64, 36), (96, 54)
FILTERS = (Filter(score="motion", min=2), Filter(score="text_ratio", max=0.05), Filter(score="aesthetic", min=3))
HQ_FILTERS = (
    Filter(score="aesthetic", min=6),
    Filter(score="motion", min=4),
    Filter(score="text_ratio", max=0.01),
    Filter(score="resolution", min=720),
)
PHASH = ("0f0f0f0f0f0f0f0f", "00ff00ff00ff00ff", "ffff0000ffff0000")
M, T, A, R = "motion:min=2.0", "text_ratio:max=0.05", "aesthetic:min=3.0", None
HQ_A, HQ_M, HQ_T, HQ_R = "aesthetic:min=6.0", "motion:min=4.0", "text_ratio:max=0.01", "resolution:min=720.0"


def _video(split: str, other: str = "") -> str:
    """A source video name under INPUT whose clips land in `split` at heldout_fraction 0.5."""
    return next(
        name
        for i in range(1000)
        if heldout_split(name := f"{INPUT}/{split}{i}.mp4", INPUT, 0.5) == split and name != other
    )


VIDEO_A = _video(TRAIN)
VIDEO_B = _video(TRAIN, VIDEO_A)
VIDEO_C = _video(HELDOUT)

# key, video, motion, aesthetic, text_ratio, shorter side, too short, phash,
# expected subsets, drop_reasons (lvd-f), hq_drop_reasons
CLIPS = [
    ("a-00", VIDEO_A, 1.0, 9.0, 0.0, 1080, False, None, ["lvd"], [M], [HQ_M]),
    ("a-01", VIDEO_A, 3.0, 9.0, 0.0, 1080, False, None, ["lvd", "lvd-f"], [], [HQ_M]),
    ("a-02", VIDEO_A, 5.0, 9.0, 0.0, 1080, False, None, ["lvd", "lvd-f", "hq"], [], []),
    ("a-03", VIDEO_A, 5.0, 2.0, 0.0, 1080, False, None, ["lvd"], [A], [HQ_A]),
    ("a-04", VIDEO_A, 5.0, 4.0, 0.0, 1080, False, None, ["lvd", "lvd-f"], [], [HQ_A]),
    ("a-05", VIDEO_A, 5.0, 9.0, 0.03, 1080, False, None, ["lvd", "lvd-f"], [], [HQ_T]),
    ("a-06", VIDEO_A, 5.0, 9.0, 0.2, 1080, False, None, ["lvd"], [T], [HQ_T]),
    ("a-07", VIDEO_A, 5.0, 9.0, 0.0, 360, False, None, ["lvd", "lvd-f"], [], [HQ_R]),
    ("b-00", VIDEO_B, 6.0, 7.0, 0.0, 2160, False, PHASH, ["lvd", "lvd-f", "hq"], [], []),
    ("b-01", VIDEO_B, 6.0, 7.0, 0.0, 720, False, None, ["lvd", "lvd-f", "hq"], [], []),  # at the bound
    ("b-02", VIDEO_B, 6.0, 9.0, 0.0, 1080, True, None, [], ["too_short"], ["too_short"]),
    # A near-copy of b-00 with a lower aesthetic score: in lvd (before any filter), never in lvd-f or hq.
    ("b-03", VIDEO_B, 6.0, 6.5, 0.0, 1080, False, PHASH, ["lvd"], ["duplicate"], []),
    ("b-04", VIDEO_B, 0.5, 1.0, 0.5, 240, False, None, ["lvd"], [M, T, A], [HQ_A, HQ_M, HQ_T, HQ_R]),
    ("c-00", VIDEO_C, 5.0, 9.0, 0.0, 1080, False, None, ["lvd", "lvd-f", "hq"], [], []),  # held out
]
SECONDS = {key: 0.25 + 0.01 * i for i, (key, *_) in enumerate(CLIPS)}
EXPECTED = {key: subsets for key, *_, subsets, _, _ in CLIPS}


def _record(key, video, motion, aesthetic, text, side, too_short, phash, *_) -> ClipRecord:
    source = (side * 16 // 9, side)
    renditions = {SMALL: Rendition(*SMALL_SIZE)}
    if side >= 720:
        renditions[HQ] = Rendition(*HQ_SIZE)
    return ClipRecord(
        key=key,
        video=video,
        start_frame=0,
        end_frame=6,
        start_s=0.0,
        end_s=SECONDS[key],
        fps=24.0,
        num_frames=6,
        source_size=source,
        too_short=too_short or None,
        camera_motion="static",
        scores={"motion": motion, "text_ratio": text, "aesthetic": aesthetic, "clip_sim": 0.0},
        renditions=renditions,
        phash=phash,
    )


def _publish_part(store, part: S3Uri, clips: list[ClipRecord], tmp: Path) -> None:
    publish_part(store, part, clips, tmp, mp4(*SMALL_SIZE), mp4(*HQ_SIZE))


def _keys(store, uri: str) -> list[str]:
    """The sample keys of one shard, in order."""
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(uri))) as tar:
        return [m.name.split(".", 1)[0] for m in tar if m.name.endswith(".json")]


@pytest.fixture(scope="module")
def curated(stack, store, settings, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    base = S3Uri.parse(f"s3://{settings.data_bucket}/tests/subsets-{np.random.default_rng().integers(1 << 32):08x}")
    records = {row[0]: _record(*row) for row in CLIPS}
    for name in ("a", "b", "c"):
        _publish_part(store, base.join("parts", name), [r for k, r in records.items() if k[0] == name], tmp)
    config = CurationConfig(filters=FILTERS, subsets=Subsets(hq=HQ_FILTERS))
    config = config.model_copy(
        update={"output": config.output.model_copy(update={"clips_per_shard": 2, "heldout_fraction": 0.5})}
    )
    out = base.join("out")
    parts = [base.join("parts", n) for n in ("a", "b", "c")]
    card, run = finalize_and_log(parts, out, config, store, input_location=INPUT, settings=settings)
    rows = {r["key"]: r for r in map(json.loads, store.get_bytes(out.join("manifest.jsonl")).decode().splitlines())}
    return out, card, run, rows


def test_every_clip_is_in_exactly_the_subsets_its_scores_put_it_in(curated):
    _, card, _, rows = curated
    assert {k: r["subsets"] for k, r in rows.items()} == EXPECTED
    for key, *_, subsets, drop_reasons, hq_drop_reasons in CLIPS:
        assert rows[key]["drop_reasons"] == drop_reasons, key
        assert rows[key]["hq_drop_reasons"] == hq_drop_reasons, key
        assert rows[key]["kept"] == ("lvd-f" in subsets)
    members = {name: {k for k, s in EXPECTED.items() if name in s} for name in ("lvd", "lvd-f", "hq")}
    assert len(members["lvd"]) == 13 and len(members["lvd-f"]) == 8 and len(members["hq"]) == 4
    assert members["hq"] < members["lvd-f"] < members["lvd"]
    assert rows["c-00"]["split"] == HELDOUT and {rows[k]["split"] for k in rows if k[0] != "c"} == {TRAIN}
    assert card["warnings"] == []


def test_each_subset_is_a_folder_of_shards_of_its_training_clips(curated, store):
    out, card, _, rows = curated
    # Parts go in the order of their first video, each part's clips in order.
    video = {key: v for key, v, *_ in CLIPS}
    train = {
        name: sorted((k for k, s in EXPECTED.items() if name in s and k[0] != "c"), key=lambda k: (video[k], k))
        for name in ("lvd", "lvd-f", "hq")
    }
    folders = {"lvd": "subsets/lvd/shards", "lvd-f": "shards", "hq": "subsets/hq/shards"}
    for name, folder in folders.items():
        assert card["subsets"][name]["shards"] == f"{out}/{folder}/"
        # Two clips a shard, in the order of the parts and their clips.
        expected = [train[name][i : i + 2] for i in range(0, len(train[name]), 2)]
        shards = [_keys(store, str(out.join(folder, f"shard-{i:06d}.tar"))) for i in range(len(expected))]
        assert shards == expected, name
        assert not store.exists(out.join(folder, f"shard-{len(expected):06d}.tar"))
    # The high-resolution rendition: lvd-f's and hq's, shard N holding shard N's keys that have one.
    hq_shards = [_keys(store, str(out.join("subsets", "hq", "shards-hq", f"shard-{i:06d}.tar"))) for i in (0, 1)]
    assert hq_shards == [train["hq"][:2], train["hq"][2:]]
    assert card["subsets"]["hq"]["hq_shards"] == f"{out}/subsets/hq/shards-hq/"
    assert card["subsets"]["lvd"]["hq_shards"] is None and not store.exists(out.join("subsets", "lvd", "shards-hq"))
    # A subset's sample JSON is the clip's manifest row (its lvd-f shard named where it has one).
    with tarfile.open(
        fileobj=io.BytesIO(store.get_bytes(out.join("subsets", "lvd", "shards", "shard-000000.tar")))
    ) as tar:
        samples = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".json")}
    assert {k: json.loads(v) for k, v in samples.items()} == {k: rows[k] for k in samples}
    assert "shard" not in rows["a-00"] and rows["a-01"]["shard"] == f"{out}/shards/shard-000000.tar"


def test_the_training_loader_reads_each_subset_by_its_folder(curated, store):
    from components.training.run import rendition_data, shard_urls, training_data
    from model.data import ClipDataset, ClipSpec

    out, card, _, _ = curated
    spec = ClipSpec(num_frames=2, fps=8.0, height=16, width=16)
    for name, folder in (("lvd", f"{out}/subsets/lvd"), ("lvd-f", str(out)), ("hq", f"{out}/subsets/hq")):
        data = training_data(folder, store)  # a subset's folder (its dataset card there) reads as its shards/
        assert data == card["subsets"][name]["shards"]
        assert card_digest(data, store) == card["subsets"][name]["digest"]
        read = ClipDataset(shard_urls(data, store), spec, epochs=1, random_crop=False)
        items = list(read)
        assert sorted(i["key"] for i in items) == sorted(k for k, s in EXPECTED.items() if name in s and k[0] != "c")
        assert all(tuple(i["video"].shape) == (2, 3, 16, 16) for i in items)
    # A stage that reads the hq rendition gets the hq subset's shards-hq/.
    hq_data = rendition_data(card["subsets"]["hq"]["shards"], HQ)
    assert hq_data == f"{out}/subsets/hq/shards-hq/"
    read = ClipDataset(shard_urls(hq_data, store), ClipSpec(2, 8.0, 16, 16, rendition=HQ), epochs=1)
    assert sorted(i["key"] for i in read) == ["a-02", "b-00", "b-01"]


def _cells(*values) -> str:
    return "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in values)


def test_the_card_shows_the_subsets_side_by_side_and_logs_them_to_mlflow(curated, store, settings):
    out, card, run, _ = curated
    subsets = card["subsets"]
    clips = {n: sum(1 for s in EXPECTED.values() if n in s) for n in ("lvd", "lvd-f", "hq")}
    train = {n: sum(1 for k, s in EXPECTED.items() if n in s and k[0] != "c") for n in clips}
    hours = {n: sum(SECONDS[k] for k, s in EXPECTED.items() if n in s) / 3600 for n in clips}
    assert list(subsets) == ["lvd", "lvd-f", "hq"]
    for name in clips:
        assert subsets[name]["clips"] == clips[name] and subsets[name]["train_clips"] == train[name]
        assert subsets[name]["hours"] == pytest.approx(hours[name], abs=1e-6)
    assert (clips, train) == ({"lvd": 13, "lvd-f": 8, "hq": 4}, {"lvd": 12, "lvd-f": 7, "hq": 3})
    assert (
        subsets["lvd-f"]["clips"] == card["clips_after_filter"]
        and subsets["lvd"]["clips"] == card["clips_before_filter"]
    )
    # Score distributions over each subset's clips (both splits).
    assert subsets["hq"]["scores"]["aesthetic"] == {
        "n": 4, "mean": 8.0, "min": 7.0, "p10": 7.0, "median": 8.0, "p90": 9.0, "max": 9.0
    }  # fmt: skip
    assert subsets["hq"]["scores"]["resolution"]["min"] == 720.0
    assert subsets["lvd"]["scores"]["resolution"]["min"] == 240.0 and subsets["lvd"]["scores"]["motion"]["n"] == 13
    assert subsets["lvd-f"]["scores"]["text_ratio"]["max"] == 0.03
    assert subsets["hq"]["thresholds"]["resolution:min=720.0"] == {"score": "resolution", "min": 720.0}
    assert subsets["lvd-f"]["thresholds"] == card["thresholds"] and subsets["lvd"]["thresholds"] == {}
    # Each subset's own card (what training finds beside its shards/) carries its figures and digest.
    for name in ("lvd", "hq"):
        own = json.loads(store.get_bytes(out.join("subsets", name, "dataset_card.json")))
        assert own["subset"] == name and own["clips"] == clips[name] and own["digest"] == subsets[name]["digest"]
    assert len({s["digest"] for s in subsets.values()}) == 3

    page = store.get_bytes(out.join("dataset_card.html")).decode()
    for name in ("lvd", "hq"):  # beside each subset's shards/ too, where a model's lineage links its data's card
        assert store.get_bytes(out.join("subsets", name, "dataset_card.html")).decode() == page
    assert "<tr><th></th><th>lvd</th><th>lvd-f</th><th>hq</th></tr>" in page
    assert (
        _cells("clips (both splits)", 13, 8, 4) in page and _cells("training clips (in its shards)", 12, 7, 3) in page
    )
    assert _cells("aesthetic", "median", "9", "9", "8") in page
    assert page.count("per subset' src='data:image/png;base64,") == 4  # aesthetic, motion, text ratio, resolution

    connect(settings)
    logged = mlflow.get_run(run.run_id).data
    for name in clips:
        assert logged.metrics[f"subset.{name}.clips"] == clips[name]
        assert logged.metrics[f"subset.{name}.train_clips"] == train[name]
        assert logged.tags[f"vdm.subset.{name}.shards"] == subsets[name]["shards"]
    assert logged.metrics["subset.hq.median.aesthetic"] == 8.0
    assert float(logged.params["hq_threshold.resolution:min_720.0"]) == 720.0


def test_hq_percentiles_are_over_the_filters_clips_so_a_higher_percent_is_stricter():
    clips = [
        ClipRecord(
            key=f"k{i:03d}", video="v", start_frame=0, end_frame=6, start_s=0.0, end_s=0.25, fps=24.0,
            source_size=(1920, 1080), camera_motion="static",
            scores={"motion": float(i), "text_ratio": 0.0, "aesthetic": float(99 - i), "clip_sim": 0.0},
        )
        for i in range(100)
    ]  # fmt: skip
    apply_filters(clips, thresholds(clips, (Filter(score="motion", drop_lowest_percent=25),)))
    hq = thresholds(clips, (Filter(score="motion", drop_lowest_percent=50), Filter(score="resolution", min=1080)))
    apply_subsets(clips, hq)
    assert hq["motion:drop_lowest_percent=50.0"]["min"] == pytest.approx(49.5)
    assert sum(c.kept for c in clips) == 75 and sum("hq" in c.subsets for c in clips) == 50
    assert all(c.kept for c in clips if "hq" in c.subsets)
    with pytest.raises(ValueError, match="unknown subset 'best'"):
        ClipRecord.from_json({**clips[0].to_dict(), "subsets": ["lvd", "best"]})


def test_an_empty_hq_subset_is_a_card_warning_and_bad_thresholds_name_the_field(stack, store, prefix, tmp_path):
    base = S3Uri.parse(prefix)
    _publish_part(store, base.join("parts", "a"), [_record(*CLIPS[2])], tmp_path)
    config = CurationConfig(filters=FILTERS, subsets=Subsets(hq=(Filter(score="resolution", min=4000),)))
    config = config.model_copy(update={"output": config.output.model_copy(update={"heldout_fraction": 0})})
    card = finalize([base.join("parts", "a")], base.join("out"), config, store, input_location=INPUT)
    assert card["subsets"]["hq"]["train_clips"] == 0 and EMPTY_HQ in card["warnings"]
    assert not list(store.list(str(base.join("out", "subsets", "hq", "shards")) + "/"))
    # Without the subsets' shards (threshold ablations): lvd-f alone is written, the card still counts them.
    card = finalize([base.join("parts", "a")], base.join("bare"), config, store, write_subsets=False)
    folders = {o.uri.key.rsplit("/", 2)[-2] for o in store.list(str(base.join("bare")) + "/") if "/shard-" in o.uri.key}
    assert folders == {"shards", "shards-hq"}
    assert card["subsets"]["lvd"]["train_clips"] == 1 and card["subsets"]["lvd"]["shards"] is None
    assert card["subsets"]["lvd-f"]["shards"] == f"{base.join('bare')}/shards/" and EMPTY_HQ not in card["warnings"]
    with pytest.raises(ValueError, match="subsets.hq.0") as error:
        CurationConfig.from_yaml("subsets: {hq: [{score: resolution, min: 1, max: 2}]}")
    assert "exactly one of" in str(error.value)
    with pytest.raises(ValueError, match="subsets.hq.0.score"):
        CurationConfig.from_yaml("subsets: {hq: [{score: sharpness, min: 1}]}")
