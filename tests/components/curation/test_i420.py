"""Frames stay in the decoder's layout (I420): the stream hands them on unconverted, and the
conversions curation makes from them agree with FFmpeg's own."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from components.curation.config import CurationConfig
from components.curation.video import from_rgb, i420_array, luma, open_video, planes, reduced_rgb, to_rgb


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour noise: every channel varies, as in real footage."""
    noise = np.random.default_rng(seed).random((height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    return (cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def _write(path: Path, frames: list[np.ndarray]) -> None:
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_to_rgb_and_from_rgb_are_ffmpegs_conversions():
    rgb = _picture(180, 320)
    ffmpeg_frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    ffmpeg_i420 = ffmpeg_frame.to_ndarray()
    frame = from_rgb(rgb)
    assert (frame.format.name, frame.width, frame.height) == ("yuv420p", 320, 180)
    i420 = i420_array(frame)
    assert i420.shape == (270, 320)
    # The same luma; chroma subsampled a little differently (FFmpeg filters, OpenCV averages).
    assert np.abs(luma(frame).astype(int) - ffmpeg_i420[:180]).max() <= 1
    assert np.abs(i420.astype(int) - ffmpeg_i420).mean() < 2
    ffmpeg_rgb = ffmpeg_frame.to_ndarray(format="rgb24")
    difference = np.abs(to_rgb(ffmpeg_frame).astype(int) - ffmpeg_rgb)
    assert difference.mean() < 1.5 and difference.max() <= 4
    # The planes are views of the frame's own (padded) rows, the copy is the planes unpadded.
    y, u, v = planes(frame)
    np.testing.assert_array_equal(luma(frame), i420[:180])
    np.testing.assert_array_equal(np.concatenate([y.ravel(), u.ravel(), v.ravel()]), i420.ravel())
    y[0, 0] = 255 - y[0, 0]
    assert luma(frame)[0, 0] == y[0, 0]


@pytest.mark.parametrize(
    ("size", "halvings", "shape"),
    [((320, 180), 1, (90, 160, 3)), ((320, 180), 2, (45, 80, 3)), ((176, 320), 3, (40, 22, 3))],
)
def test_a_reduced_frame_is_the_area_reduced_rgb_frame(size, halvings, shape):
    i420 = from_rgb(_picture(size[1], size[0], seed=halvings))
    small = reduced_rgb(i420, halvings)
    assert small.shape == shape
    expected = cv2.resize(to_rgb(i420), shape[1::-1], interpolation=cv2.INTER_AREA)
    difference = np.abs(small.astype(int) - expected)
    assert difference.mean() < 1.5 and difference.max() <= 10, (difference.mean(), difference.max())
    # A flat grey stays that grey: the range expansion is right.
    grey = from_rgb(np.full((size[1], size[0], 3), 37, np.uint8))
    assert np.abs(reduced_rgb(grey, halvings).astype(int) - 37).max() <= 1


def _block_mean(plane: np.ndarray) -> np.ndarray:
    """Each 2x2 block's mean, rounded half up (OpenCV's area reduction by 2)."""
    p = plane.astype(np.int32)
    return ((p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) >> 2).astype(np.uint8)


def test_the_stream_hands_on_the_decoders_frames_and_scales_larger_ones(tmp_path):
    frames = [_picture(180, 320, seed=i) for i in range(3)]
    _write(tmp_path / "small.mp4", frames)
    config = CurationConfig()
    with open_video(tmp_path / "small.mp4", config.limits, config.decode) as video:
        streamed = list(video)
    with av.open(str(tmp_path / "small.mp4")) as container:
        decoded = [f.to_ndarray() for f in container.decode(video=0)]
    assert len(streamed) == 3
    for got, expected in zip(streamed, decoded, strict=True):
        np.testing.assert_array_equal(i420_array(got), expected)  # the decoder's frame, no conversion

    # Twice the size: each plane halved by area (OpenCV's exact 2x path), within rounding of FFmpeg's
    # area scaler. Three times: FFmpeg's area scaler, straight to I420.
    for factor in (2, 3):
        path = tmp_path / f"large-{factor}.mp4"
        _write(path, [cv2.resize(f, (320 * factor, 180 * factor)) for f in frames])
        with open_video(path, config.limits, config.decode) as video:
            assert video.size == (320, 180)
            scaled = list(video)
        assert all((frame.width, frame.height) == (320, 180) for frame in scaled)
        scaled = [i420_array(frame) for frame in scaled]
        with av.open(str(path)) as container:
            source = next(container.decode(video=0))
        ffmpeg = source.reformat(320, 180, "yuv420p", interpolation="AREA").to_ndarray()
        if factor == 3:
            np.testing.assert_array_equal(scaled[0], ffmpeg)
            continue
        i420 = source.to_ndarray()
        planes = (i420[:360], *i420[360:].reshape(2, 180, 320))
        expected = np.concatenate([_block_mean(plane).ravel() for plane in planes]).reshape(270, 320)
        np.testing.assert_array_equal(scaled[0], expected)
        assert np.abs(scaled[0].astype(int) - ffmpeg).mean() < 0.5
