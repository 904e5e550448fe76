"""Sample videos: the truth in the manifest is what the pixels show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import webdataset as wds

from components.common.objectstore import sha256_file
from components.sample_data.render import HOLLOW_KINDS, SHAPE_KINDS, draw_shapes, moving_shapes
from components.sample_data.shards import write_shapes_shards
from components.sample_data.synth import (
    REJECT_EMPTY,
    REJECT_NO_VIDEO,
    REJECT_TRUNCATED,
    REJECT_UNDECODABLE,
    SynthConfig,
    synthesize_local,
)
from model.records import CAMERA_MOTIONS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    manifest = synthesize_local(folder, SynthConfig(seed=7))
    return folder, {v["file"]: v for v in manifest["videos"]}


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def gray(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32).mean(axis=-1)


def test_manifest_describes_every_file(samples):
    folder, videos = samples
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert on_disk == set(videos)
    for name, entry in videos.items():
        assert entry["sha256"] == sha256_file(folder / name)
        if entry["valid"]:
            frames = decode(folder / name)
            assert frames.shape == (entry["num_frames"], entry["height"], entry["width"], 3)
    # A sample for every label curation can give.
    assert {v["truth"]["camera_motion"] for v in videos.values() if v["valid"]} == set(CAMERA_MOTIONS)


def test_same_seed_same_bytes_other_seed_other_bytes(samples, tmp_path):
    _, videos = samples
    again = {v["file"]: v["sha256"] for v in synthesize_local(tmp_path / "a", SynthConfig(seed=7))["videos"]}
    other = {v["file"]: v["sha256"] for v in synthesize_local(tmp_path / "b", SynthConfig(seed=8))["videos"]}
    assert again == {name: v["sha256"] for name, v in videos.items()}
    assert other["cuts.mp4"] != again["cuts.mp4"]


def test_hard_cuts_are_where_the_manifest_says(samples):
    folder, videos = samples
    frames = gray(decode(folder / "cuts.mp4"))
    change = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2))  # change[i]: frame i -> i+1
    cuts = videos["cuts.mp4"]["truth"]["cuts"]
    assert cuts == [40, 96]
    top = sorted((np.argsort(change)[-len(cuts) :] + 1).tolist())
    assert top == cuts
    inside = np.delete(change, [c - 1 for c in cuts])
    assert change[[c - 1 for c in cuts]].min() > 5 * inside.max()


def test_fade_goes_through_black(samples):
    folder, videos = samples
    truth = videos["fade.mp4"]["truth"]
    luma = gray(decode(folder / "fade.mp4")).mean(axis=(1, 2))
    black_start, black_end = truth["black_frames"]
    assert luma[black_start:black_end].max() < 3
    out, fade_in = truth["fades"]
    assert np.all(np.diff(luma[out["start_frame"] - 1 : out["end_frame"]]) < 0)
    assert np.all(np.diff(luma[fade_in["start_frame"] : fade_in["end_frame"] + 1]) > 0)
    assert luma[: out["start_frame"]].min() > 30 and luma[fade_in["end_frame"] :].min() > 30
    assert truth["cuts"] == []


def test_static_scene_does_not_move(samples):
    folder, _ = samples
    frames = gray(decode(folder / "static.mp4"))
    assert np.abs(np.diff(frames, axis=0)).mean() < 0.5


@pytest.mark.parametrize("name", ["pan_left.mp4", "pan_right.mp4", "tilt_up.mp4", "tilt_down.mp4"])
def test_pans_and_tilts_move_content_at_the_recorded_velocity(samples, name):
    folder, videos = samples
    expected = np.array(videos[name]["truth"]["content_velocity_px_per_frame"])
    frames = gray(decode(folder / name))
    shifts = [np.array(cv2.phaseCorrelate(frames[t], frames[t + 1])[0]) for t in range(0, len(frames) - 1, 7)]
    assert np.abs(np.median(shifts, axis=0) - expected).max() < 0.25, (name, np.median(shifts, axis=0))


@pytest.mark.parametrize("name", ["zoom_in.mp4", "zoom_out.mp4"])
def test_zooms_scale_content_at_the_recorded_rate(samples, name):
    folder, videos = samples
    rate = videos[name]["truth"]["zoom_rate_per_frame"]
    frames = gray(decode(folder / name)).astype(np.uint8)
    h, w = frames.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    rx, ry = xs - w / 2, ys - h / 2
    step = 6
    estimates = []
    for t in range(0, len(frames) - step, 12):
        flow = cv2.calcOpticalFlowFarneback(frames[t], frames[t + step], None, 0.5, 3, 21, 3, 5, 1.1, 0)
        # Radial expansion per unit radius over `step` frames, fitted by least squares.
        k = (flow[..., 0] * rx + flow[..., 1] * ry).sum() / (rx**2 + ry**2).sum()
        estimates.append((1 + k) ** (1 / step))
    assert abs(np.median(estimates) - rate) < 0.3 * abs(rate - 1), (name, np.median(estimates), rate)


def test_objects_move_at_the_recorded_velocities(samples):
    folder, videos = samples
    objects = videos["objects.mp4"]["truth"]["objects"]
    assert len(objects) == 3
    frames = decode(folder / "objects.mp4").astype(np.int16)
    for obj in objects:
        color = np.array(obj["color_rgb"])
        start, velocity = np.array(obj["start_xy"]), np.array(obj["velocity_px_per_frame"])
        assert np.linalg.norm(velocity) > 0.5
        for t in (0, 30, 71):
            x, y = np.round(start + velocity * t).astype(int)
            assert np.abs(frames[t, y, x] - color).max() < 40, (obj, t)
        # Where the object will be in 30 frames is not yet its colour (it really moves).
        x, y = np.round(start + velocity * 30).astype(int)
        if np.linalg.norm(velocity * 30) > 2.5 * obj["radius"]:
            assert np.abs(frames[0, y, x] - color).max() > 40


def test_burned_in_text_is_inside_its_box(samples):
    folder, videos = samples
    truth = videos["text.mp4"]["truth"]
    assert truth["has_text"] and truth["text"]
    x0, y0, x1, y1 = truth["text_boxes"][0]
    frame = gray(decode(folder / "text.mp4")[10])
    inside = frame[y0:y1, x0:x1]
    assert (inside > 200).mean() > 0.1 and (inside < 40).mean() > 0.3  # white glyphs on black
    h, w = frame.shape
    assert truth["text_area_ratio"] == pytest.approx((x1 - x0) * (y1 - y0) / (w * h), abs=1e-4)
    assert all(not v["truth"]["has_text"] for n, v in videos.items() if v["valid"] and n != "text.mp4")


def test_bad_files_fail_the_way_the_manifest_says(samples):
    folder, videos = samples
    bad = {n: v for n, v in videos.items() if not v["valid"]}
    assert {v["expected_rejection"] for v in bad.values()} == {
        REJECT_EMPTY,
        REJECT_UNDECODABLE,
        REJECT_NO_VIDEO,
        REJECT_TRUNCATED,
    }
    assert (folder / "zero_byte.mp4").stat().st_size == 0
    for name in ("random_bytes.mp4", "truncated_index_at_end.mp4"):
        with pytest.raises(av.error.InvalidDataError):
            av.open(str(folder / name))
    with av.open(str(folder / "audio_only.mp4")) as container:
        assert len(container.streams.video) == 0 and len(container.streams.audio) == 1
    # Truncated faststart: opens, its header claims every frame, far fewer decode.
    entry = bad["truncated_faststart.mp4"]
    decoded = 0
    with av.open(str(folder / "truncated_faststart.mp4")) as container:
        assert container.streams.video[0].frames == entry["header_frames"]
        try:
            for _ in container.decode(video=0):
                decoded += 1
        except av.error.InvalidDataError:
            pass
    assert 0 < decoded < 0.8 * entry["header_frames"]


def test_moving_shapes_render_at_their_recorded_positions():
    shapes = moving_shapes(16, 64, 96, num_shapes=1, max_speed=3, radius_range=(6, 6), seed=3)
    assert shapes.frames.shape == (16, 64, 96, 3)
    np.testing.assert_allclose(shapes.positions[5], shapes.positions[0] + 5 * shapes.velocities)
    for t in (0, 7, 15):
        weight = shapes.frames[t].astype(np.float64).sum(axis=-1)
        ys, xs = np.mgrid[0:64, 0:96]
        centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        np.testing.assert_allclose(centroid, shapes.positions[t, 0], atol=0.1)


@pytest.mark.parametrize("kind", [k for k in SHAPE_KINDS if k != "disc"])
def test_every_polygon_kind_has_a_discs_area_stays_whole_in_the_frame_and_is_centred_where_recorded(kind):
    # Fast enough to reach the frame's edges: a shape cut off there would lose area.
    shapes = moving_shapes(24, 48, 48, num_shapes=1, max_speed=3, radius_range=(8, 8), kinds=(kind,), seed=2)
    assert shapes.kinds == (kind,)
    ys, xs = np.mgrid[0:48, 0:48]
    for t in range(24):
        coverage = shapes.frames[t].max(axis=-1) / shapes.colors[0].max()
        assert coverage.sum() == pytest.approx(np.pi * 8**2, rel=0.015), t
        centroid = np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / coverage.sum()
        np.testing.assert_allclose(centroid, shapes.positions[t, 0], atol=0.05)


def test_a_frame_is_hollow_and_its_ring_solid():
    shapes = moving_shapes(1, 32, 32, num_shapes=1, max_speed=0, radius_range=(8, 8), kinds=("frame",), seed=0)
    brightness = shapes.frames[0].max(axis=-1).astype(float) / shapes.colors[0].max()
    x, y = np.round(shapes.positions[0, 0]).astype(int)
    half = 8 * np.sqrt(np.pi / 3)  # outer half side; the hole's is half that
    assert brightness[y - 2 : y + 3, x - 2 : x + 3].max() == 0  # the hole
    ring = int(round(0.75 * half))  # midway between the hole's edge and the outline
    assert brightness[y, x - ring] == brightness[y, x + ring] == brightness[y - ring, x] == 1.0


@pytest.mark.parametrize("kind", list(HOLLOW_KINDS))
def test_every_hollow_kind_is_its_filled_kinds_outline_with_a_half_size_hole(kind):
    centre, colour = np.array([[24.3, 23.6]]), np.array([[200, 200, 200]])
    hollow, filled = np.zeros((2, 48, 48, 3), np.uint8)
    draw_shapes(hollow, centre, np.array([8.0]), colour, (kind,))
    draw_shapes(filled, centre, np.array([8.0]), colour, (HOLLOW_KINDS[kind],))
    brightness = hollow.max(axis=-1) / 200
    assert brightness[23:26, 23:26].max() == 0  # the hole
    # The filled kind's outermost pixels, moved out from the centre to midway between the hole
    # and the hollow kind's outline (the filled outline grown by sqrt(4/3) to keep the area):
    # there the wall is solid.
    ys, xs = np.nonzero(filled.max(axis=-1))
    offsets = np.stack([xs, ys], axis=1) - centre
    distance = np.linalg.norm(offsets, axis=1)
    wall = np.round(centre + offsets[distance > 0.8 * distance.max()] * np.sqrt(4 / 3) * 0.75).astype(int)
    assert brightness[wall[:, 1], wall[:, 0]].min() > 0.9


def test_polygons_are_another_shape_per_variant_half_of_them_hollow_each_of_a_discs_area():
    centre, ys, xs = np.array([[24.3, 23.6]]), *np.mgrid[0:48, 0:48]
    masks = []
    for variant in range(16):
        frame = np.zeros((48, 48, 3), np.uint8)
        draw_shapes(frame, centre, np.array([8.0]), np.array([[200, 200, 200]]), ("polygon",), np.array([variant]))
        coverage = frame.max(axis=-1) / 200
        assert coverage.sum() == pytest.approx(np.pi * 8**2, rel=0.015), variant
        centroid = np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / coverage.sum()
        np.testing.assert_allclose(centroid, centre[0], atol=0.05)
        masks.append(coverage > 0.5)
    hollow = [not mask[22:26, 22:26].any() for mask in masks]
    assert 4 <= sum(hollow) <= 12
    differing = [(a ^ b).sum() for i, a in enumerate(masks) for b in masks[i + 1 :]]
    assert min(differing) >= 10  # no two variants alike
    again = moving_shapes(1, 48, 48, num_shapes=3, radius_range=(6, 8), kinds=("polygon",), seed=4)
    assert len(set(again.variants)) == 3
    np.testing.assert_array_equal(
        again.frames, moving_shapes(1, 48, 48, num_shapes=3, radius_range=(6, 8), kinds=("polygon",), seed=4).frames
    )


def test_shape_kinds_are_drawn_per_shape_and_unknown_ones_refused():
    mixed = moving_shapes(4, 32, 32, num_shapes=30, radius_range=(2, 3), kinds=("square", "cross"), seed=1)
    assert set(mixed.kinds) == {"square", "cross"}
    with pytest.raises(ValueError, match="kinds: some of"):
        moving_shapes(4, 32, 32, kinds=("ring",))


def test_shapes_shards_caption_each_clip_with_its_kind(tmp_path):
    paths, truth = write_shapes_shards(tmp_path, shards=1, clips_per_shard=8, num_frames=4, kinds=SHAPE_KINDS, seed=1)
    captions = {sample["__key__"]: json.loads(sample["json"])["caption"] for sample in wds.WebDataset([str(paths[0])])}
    assert captions == {key: f"a {clip['kind']} moving on black" for key, clip in truth.items()}
    assert len({clip["kind"] for clip in truth.values()}) >= 3


def test_moving_shapes_stay_inside_the_frame():
    shapes = moving_shapes(64, 32, 32, num_shapes=5, max_speed=4, radius_range=(2, 4), seed=11)
    lo = shapes.positions - shapes.radii[None, :, None]
    hi = shapes.positions + shapes.radii[None, :, None]
    assert lo.min() >= 0 and hi[..., 0].max() <= 32 and hi[..., 1].max() <= 32


def test_moving_shapes_with_a_direction_all_move_that_way_at_speeds_in_range():
    shapes = moving_shapes(24, 64, 64, num_shapes=20, max_speed=1.0, min_speed=0.5, direction=(3, 4), seed=2)
    speeds = np.linalg.norm(shapes.velocities, axis=1)
    assert speeds.min() >= 0.5 and speeds.max() <= 1.0 and speeds.std() > 0.05  # drawn per disc
    np.testing.assert_allclose(shapes.velocities / speeds[:, None], np.tile([0.6, 0.8], (20, 1)))
    unchanged = moving_shapes(24, 64, 64, num_shapes=20, max_speed=1.0, seed=2)
    assert (unchanged.velocities < 0).any()  # without a direction: per axis in [-max, max], as before


def test_moving_shapes_from_the_edge_enter_from_the_side_they_move_away_from():
    right = moving_shapes(16, 32, 48, num_shapes=6, max_speed=1.0, direction=(1, 0), from_edge=True, seed=5)
    np.testing.assert_allclose(right.positions[0, :, 0], right.radii)  # touching the left edge
    assert right.positions[0, :, 1].std() > 1  # the other axis stays drawn
    left = moving_shapes(16, 32, 48, num_shapes=6, max_speed=1.0, direction=(-1, 0), from_edge=True, seed=5)
    np.testing.assert_allclose(left.positions[0, :, 0], 48 - left.radii)


@pytest.mark.parametrize(("direction", "min_speed"), [((0, 0), 0.0), ((1, 0), 2.0), ((1, 0), -0.1)])
def test_moving_shapes_reject_a_zero_direction_or_a_speed_range_out_of_order(direction, min_speed):
    with pytest.raises(ValueError, match="direction" if direction == (0, 0) else "min_speed"):
        moving_shapes(8, 32, 32, max_speed=1.0, min_speed=min_speed, direction=direction)


def test_shapes_shards_with_a_direction_record_the_speed_as_the_motion_score(tmp_path):
    paths, truth = write_shapes_shards(
        tmp_path, shards=1, clips_per_shard=3, num_frames=8, max_speed=0.6, min_speed=0.2, direction=(1, 0), seed=4
    )
    velocities = np.array([clip["velocities"][0] for clip in truth.values()])
    assert (velocities[:, 1] == 0).all() and ((velocities[:, 0] >= 0.2) & (velocities[:, 0] <= 0.6)).all()
    scores = {s["__key__"]: json.loads(s["json"])["scores"]["motion"] for s in wds.WebDataset(str(paths[0]))}
    for key, clip in truth.items():
        assert scores[key] == pytest.approx(clip["velocities"][0][0])


def test_synth_cli_publishes_to_the_object_store(stack, store, prefix, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "data", "synth", "--output", prefix, "--seed", "7"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 11 videos and 5 bad files" in result.stdout
    paths = store.download_folder(prefix, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(paths) == len(manifest["videos"]) + 1
    for entry in manifest["videos"]:
        assert sha256_file(tmp_path / entry["file"]) == entry["sha256"]
