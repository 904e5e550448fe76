"""The clip record (model/records.py): one typed class for curation's manifest rows, the
shards' `<key>.json` and the loaders' input; JSON written before it existed still loads."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import webdataset as wds

from model import camera_lora
from model.records import CAMERA_MOTIONS, ORBIT, CameraMotion, ClipRecord, Flow, OrbitRecord

# `<key>.json` as components/sample_data wrote it before the record class (write_shapes_shards,
# write_camera_shards, write_orbit_shards), byte for byte.
SHAPES_JSON = (
    b'{"key": "shapes-0000-0000-0000", "video": "shapes-0000-0000-0000", "start_frame": 0, "end_frame": 4, '
    b'"start_s": 0.0, "end_s": 0.16666666666666666, "fps": 24.0, "kept": true, "drop_reasons": [], '
    b'"scores": {"motion": 1.5405619643444208, "text_ratio": 0.0, "aesthetic": 0.0, "clip_sim": 0.0}, '
    b'"camera_motion": "static", "caption": "a disc moving on black"}'
)
CAMERA_JSON = (
    b'{"key": "camera-0000-pan_left-0000", "video": "camera-0000-pan_left-0000", "start_frame": 0, '
    b'"end_frame": 4, "start_s": 0.0, "end_s": 0.5, "fps": 8.0, "kept": true, "drop_reasons": [], '
    b'"scores": {"motion": 4.0, "text_ratio": 0.0, "aesthetic": 0.0, "clip_sim": 0.0}, '
    b'"camera_motion": "pan_left", "caption": "a textured landscape"}'
)
ORBIT_JSON = (
    b'{"key": "orbit-0000-0000-0000", "video": "orbit-0000-0000-0000", "start_frame": 0, "end_frame": 4, '
    b'"start_s": 0.0, "end_s": 0.5, "fps": 8.0, "kept": true, "drop_reasons": [], '
    b'"scores": {"motion": 0.0, "text_ratio": 0.0, "aesthetic": 0.0, "clip_sim": 0.0}, '
    b'"camera_motion": "orbit", "caption": "an orbit around coloured boxes", "elevation": -10.0, '
    b'"azimuths": [232.98822416673002, 322.98822416673, 52.98822416672999, 142.98822416673]}'
)
# A kept clip's manifest row as finalize wrote it (sorted keys, no `too_short`).
CURATED_ROW = (
    '{"camera_motion": "pan_left", "caption": "a street at night", "captions": {"image": "a street at night"}, '
    '"codec": "h264", "drop_reasons": [], "end_frame": 72, "end_s": 3.0, "flow": {"translation": [2.1094, -0.0131], '
    '"zoom": 0.0213}, "fps": 24.0, "key": "pan_left-3c1e2a9b0d-0000", "kept": true, "num_frames": 72, '
    '"scores": {"aesthetic": 4.91234, "clip_sim": 0.28125, "motion": 1.52001, "text_ratio": 0.0}, '
    '"shard": "s3://vdm/curated/shards/shard-000000.tar", "source_size": [320, 180], "start_frame": 0, '
    '"start_s": 0.0, "video": "/data/raw/pan_left.mp4"}'
)


@pytest.mark.parametrize("raw", [SHAPES_JSON, CAMERA_JSON, ORBIT_JSON, CURATED_ROW.encode()])
def test_todays_json_round_trips_exactly(raw):
    record = ClipRecord.from_json(raw)
    assert record.to_dict() == json.loads(raw)
    assert record.to_json() == json.dumps(json.loads(raw), sort_keys=True)
    assert ClipRecord.from_json(record.to_json()) == record
    assert ClipRecord.from_json(json.loads(raw)) == record == ClipRecord.from_json(raw.decode())


def test_curated_row_reads_as_typed_attributes():
    record = ClipRecord.from_json(CURATED_ROW)
    assert type(record) is ClipRecord
    assert record.camera_motion == "pan_left" and record.frames == 72 == record.num_frames
    assert record.scores["aesthetic"] == 4.91234 and record.source_size == (320, 180)
    assert record.flow == Flow((2.1094, -0.0131), 0.0213)
    assert record.too_short is None  # the manifest says it in drop_reasons


def test_orbit_json_gives_an_orbit_record():
    record = ClipRecord.from_json(ORBIT_JSON)
    assert isinstance(record, OrbitRecord) and record.camera_motion == ORBIT
    assert record.elevation == -10.0 and len(record.azimuths) == 4
    assert OrbitRecord.from_json(ORBIT_JSON) == record
    with pytest.raises(ValueError, match="lacks required field.*elevation, azimuths"):
        OrbitRecord.from_json(SHAPES_JSON)


def test_not_set_is_none_and_absent_from_the_json():
    record = ClipRecord(
        key="k",
        video="v",
        start_frame=0,
        end_frame=8,
        start_s=0.0,
        end_s=1.0,
        fps=8.0,
        camera_motion="static",
        scores={},
    )
    assert record.caption is None and record.kept is None and record.flow is None
    assert record.to_dict() == {
        "key": "k",
        "video": "v",
        "start_frame": 0,
        "end_frame": 8,
        "start_s": 0.0,
        "end_s": 1.0,
        "fps": 8.0,
        "camera_motion": "static",
        "scores": {},
    }
    record.scores["motion"] = 1.0  # annotators set attributes; to_dict hands out a copy
    record.to_dict()["scores"]["motion"] = 2.0
    assert record.scores == {"motion": 1.0}


def test_unknown_camera_motion_is_refused():
    data = json.loads(SHAPES_JSON) | {"camera_motion": "pan_up"}
    with pytest.raises(ValueError, match=r"shapes-0000-0000-0000.*unknown camera motion 'pan_up'; one of \['static'"):
        ClipRecord.from_json(data)
    fields = {k: v for k, v in json.loads(SHAPES_JSON).items()}
    with pytest.raises(ValueError, match="unknown camera motion 'zoom-in'"):
        ClipRecord(**(fields | {"camera_motion": "zoom-in"}))
    # Only an orbit may carry the orbit label.
    with pytest.raises(ValueError, match="unknown camera motion 'orbit'"):
        ClipRecord(**(fields | {"camera_motion": ORBIT}))


@pytest.mark.parametrize("field", ["key", "fps", "end_frame", "camera_motion", "scores"])
def test_a_missing_required_field_is_named(field):
    data = json.loads(SHAPES_JSON)
    del data[field]
    with pytest.raises(ValueError, match=f"lacks required field\\(s\\): {field}$"):
        ClipRecord.from_json(data)


def test_unknown_fields_and_bad_flow_are_refused():
    with pytest.raises(ValueError, match="unknown field\\(s\\): motion_score"):
        ClipRecord.from_json(json.loads(SHAPES_JSON) | {"motion_score": 1.0})
    with pytest.raises(ValueError, match="flow must be"):
        ClipRecord.from_json(json.loads(CURATED_ROW) | {"flow": {"zoom": 0.1}})
    with pytest.raises(ValueError, match="JSON object"):
        ClipRecord.from_json("[1, 2]")


def test_one_vocabulary():
    assert typing.get_args(CameraMotion) == CAMERA_MOTIONS
    assert CAMERA_MOTIONS == ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out")
    assert camera_lora.MOTION_CLASSES == {
        "pan": ("pan_left", "pan_right"),
        "zoom_in": ("zoom_in",),
        "zoom_out": ("zoom_out",),
        "static": ("static",),
    }
    assert {label for labels in camera_lora.MOTION_CLASSES.values() for label in labels} <= set(CAMERA_MOTIONS)


def test_synthetic_writers_write_records(tmp_path: Path):
    from components.curation import motion
    from components.sample_data.orbits import write_orbit_shards
    from components.sample_data.shards import clip_metadata, write_camera_shards

    assert motion.CAMERA_MOTIONS is CAMERA_MOTIONS
    record = clip_metadata("k", 24, 24.0, 1.5, "static", "a disc moving on black")
    assert record == ClipRecord.from_json(record.to_json()) and record.scores == {"motion": 1.5}
    (camera,), _ = write_camera_shards(tmp_path / "c", labels=("zoom_in",), clips_per_label=1, shards=1, num_frames=4)
    (orbits,), truth = write_orbit_shards(tmp_path / "o", shards=1, orbits_per_shard=1, num_views=4)
    (sample,) = wds.WebDataset(str(camera), shardshuffle=False)
    assert ClipRecord.from_json(sample["json"]).camera_motion == "zoom_in"
    (sample,) = wds.WebDataset(str(orbits), shardshuffle=False)
    record = ClipRecord.from_json(sample["json"])
    assert isinstance(record, OrbitRecord) and record.azimuths == truth[record.key]["azimuths"]
    assert dataclasses.asdict(record)["elevation"] == truth[record.key]["elevation"]


def test_split_is_not_set_in_older_json_and_round_trips_when_set():
    record = ClipRecord.from_json(CURATED_ROW)
    assert record.split is None and not record.heldout  # written before the split existed: train
    heldout = ClipRecord.from_json(json.loads(CURATED_ROW) | {"split": "heldout"})
    assert heldout.split == "heldout" and heldout.heldout
    assert json.loads(heldout.to_json())["split"] == "heldout"
    assert not ClipRecord.from_json(json.loads(CURATED_ROW) | {"split": "train"}).heldout
    with pytest.raises(
        ValueError, match=r"pan_left-3c1e2a9b0d-0000.*unknown split 'test'; one of \['train', 'heldout'\]"
    ):
        ClipRecord.from_json(json.loads(CURATED_ROW) | {"split": "test"})
