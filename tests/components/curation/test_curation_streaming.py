"""Curation holds a bounded window of frames: a long synthetic video with cuts at known
frames is curated in a spawned worker whose peak memory stays far below the whole video's."""

from __future__ import annotations

import io
import multiprocessing
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from components.curation.annotate import KEYFRAMES_EXT, VideoResult, process_video
from components.curation.config import CurationConfig, Cuts, Decode
from components.curation.segments import segments
from components.curation.video import i420_array, open_video
from model.records import SMALL

W, H, FPS = 320, 180, 30
MINUTES = 10
# Peak RSS of the worker, its libraries (about 575 MiB) included: about 670 MiB measured; the whole
# video decoded at once (T*h*w*3/2 as I420) would take 1.6 GB, as RGB 3.1 GB.
PEAK_RSS_BOUND = 1 << 30


def _shot_lengths(total: int, rng: np.random.Generator) -> list[int]:
    """Shots of 1.5 s to 70 s (several far longer than two clips), summing to `total` frames."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.choice([rng.integers(45, 600), rng.integers(600, 2100)])))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 45:
        lengths[-2] += lengths.pop()
    return lengths


def _write_source(path: Path, lengths: list[int], black: int, rng: np.random.Generator) -> list[int]:
    """A 320x180 H.264 file of flat-coloured shots, each with a square moving over it, shot
    `black` all black; written frame by frame (never held whole). Returns the cut frames."""
    x = np.linspace(0, 1, W, dtype=np.float32)[None, :, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        previous = np.zeros(3)
        for shot, length in enumerate(lengths):
            while True:  # far from the previous shot's colour: a hard cut
                colour = np.zeros(3) if shot == black else rng.uniform(30, 225, 3)
                if np.abs(colour - previous).max() > 90:
                    break
            previous = colour
            background = np.clip(colour * (0.7 + 0.6 * x) + np.zeros((H, 1, 1)), 0, 255).astype(np.uint8)
            square = (255 - colour).astype(np.uint8)
            speed = rng.uniform(1, 4)
            for i in range(length):
                frame = background.copy()
                if shot != black:
                    left = int(10 + speed * i) % (W - 40)
                    frame[70:110, left : left + 40] = square
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return np.cumsum(lengths)[:-1].tolist()


def _peak_rss() -> int:
    """This process's peak RSS in bytes. Not `ru_maxrss`: Linux carries the forking parent's
    peak into it across exec, so a spawned worker of a large test process would report that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _curate_in_worker(path: Path, config: CurationConfig, scratch: Path) -> tuple[VideoResult, int, int]:
    """Run in a spawned process (as the curation pool's workers are): the result, and the
    process's peak RSS in bytes before (the libraries) and after curating."""
    imported = _peak_rss()
    result = process_video(str(path), path, config, scratch)
    return result, imported, _peak_rss()


def test_a_ten_minute_video_is_curated_in_bounded_memory_with_every_cut(tmp_path):
    rng = np.random.default_rng(7)
    total = MINUTES * 60 * FPS
    lengths = _shot_lengths(total, rng)
    # Shot 4 is 40 s of black: cut detection settles only when the picture returns.
    black = 4
    lengths[black + 1] += lengths[black] - 1200
    lengths[black] = 1200
    path = tmp_path / "long.mp4"
    cuts = _write_source(path, lengths, black, rng)
    # Flow at one sample in 2 s (a quarter of the default) keeps the test short; it is not what is measured.
    config = CurationConfig(decode=Decode(sample_fps=0.5))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, imported_rss, peak_rss = pool.submit(_curate_in_worker, path, config, tmp_path).result()

    assert result.rejected is None and result.decoded_frames == total
    assert peak_rss < PEAK_RSS_BOUND, f"peak RSS {peak_rss / 2**20:.0f} MiB ({imported_rss / 2**20:.0f} MiB imported)"
    starts = [c.start_frame for c in result.clips]
    ends = [c.end_frame for c in result.clips]
    black_start, black_end = cuts[black - 1], cuts[black]
    # Every true cut starts a clip (within 2 frames); the black shot is dropped, its neighbours end
    # and start at its edges; no clip runs across a true cut.
    for cut in cuts:
        if cut == black_start:
            assert min(abs(e - cut) for e in ends) <= 2, (cut, ends)
        else:
            assert min(abs(s - cut) for s in starts) <= 2, (cut, starts)
    for clip in result.clips:
        assert not any(clip.start_frame + 2 < cut < clip.end_frame - 2 for cut in cuts), clip
        assert clip.end_frame <= black_start + 2 or clip.start_frame >= black_end - 2, clip
    # The clips tile the video but the black shot, and none is longer than max_clip_s.
    bounds = [(c.start_frame, c.end_frame) for c in result.clips]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert sum(b - a for a, b in bounds) == total - lengths[black]
    max_len = config.cuts.max_clip_s * FPS
    assert all(c.num_frames <= max_len for c in result.clips)
    assert len(result.clips) == sum(_pieces(n, max_len) for shot, n in enumerate(lengths) if shot != black)
    # Each clip's files are in the spool: thumbnail, the small rendition (clips of 1 s or more), key frames.
    with tarfile.open(result.spool) as tar:
        names = set(tar.getnames())
    for clip in result.clips:
        assert {f"{clip.key}.jpg", f"{clip.key}.{KEYFRAMES_EXT}"} <= names
        assert (f"{clip.key}.mp4" in names) == (not clip.too_short) == (clip.renditions is not None)
        if clip.renditions:
            assert (clip.renditions[SMALL].width, clip.renditions[SMALL].height) == (W, H)
    assert set(result.timings_s) >= {"decode", "cuts", "flow", "encode"}


def _pieces(frames: int, max_len: float) -> int:
    """Clips of one shot: pieces of max_len while more than two remain, the rest split evenly."""
    count = 0
    while frames > 2 * max_len:
        frames -= int(max_len)
        count += 1
    return count + int(np.ceil(frames / max_len))


def test_segments_close_long_shots_in_pieces_and_trim_each_piece():
    fps, config = 10.0, Cuts(min_clip_s=1.0, max_clip_s=4.0, dark_luma=16)
    luma = np.full(200, 100.0)
    luma[:3] = luma[38:42] = 0.0  # dark at the start and across the end of the first piece
    got = [(s.start, s.end, s.too_short) for s in segments(200, fps, [150], luma, config)]
    # 150 frames to the cut: pieces of 40 while over 80 remain, then the last 70 in two; 50 after it in two.
    assert got == [
        (3, 38, False),
        (42, 80, False),
        (80, 115, False),
        (115, 150, False),
        (150, 175, False),
        (175, 200, False),
    ]


def test_a_stream_without_a_duration_decodes_and_is_cut(tmp_path):
    """A raw H.264 stream has no duration nor frame count in its header: nothing to check
    truncation against, and every frame still decodes."""
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(90):
            frame = np.full((96, 160, 3), 40 if i < 45 else 200, np.uint8)
            frame[30:50, i : i + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    config = CurationConfig()
    with open_video(path, config.limits, config.decode) as video:
        assert video.header_frames == 0 and video.size == (160, 96)
        assert sum(1 for _ in video) == 90
    result = process_video("raw.h264", path, config, tmp_path)
    assert result.rejected is None and result.decoded_frames == 90
    assert [(c.start_frame, c.end_frame) for c in result.clips] == [(0, 45), (45, 90)]
    # No duration to check before decoding: the limit holds for the frames decoded.
    short = config.model_copy(update={"limits": config.limits.model_copy(update={"max_duration_s": 2.0})})
    limited = process_video("raw.h264", path, short, tmp_path)
    assert limited.rejected["reason"] == "duration_over_limit" and not limited.clips
    assert "more than 2 s of frames decoded" in limited.rejected["detail"]
    assert list(tmp_path.glob("clips-*.tar")) == [result.spool]  # the rejected video's spool is gone


def test_clips_of_a_larger_source_are_copied_out_of_one_encoding_with_their_own_frames(tmp_path):
    """640x360 (the decode size halved once): the small rendition is encoded once for the video and
    each clip copied out of it. Frame t shows a bar at column t of the decode size, so a frame one
    off is told apart; the shots change colour at frames 40 and 85. With the content detector alone
    a clip closes a few frames after its last one, before the encoder (a few frames behind) has
    encoded it: clips wait for it, in order, and none is lost."""
    cuts, total = [40, 85], 120
    colours = [(220, 60, 60), (20, 20, 90), (90, 160, 20)]  # far apart in hue and value: hard cuts
    path = tmp_path / "larger.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for t in range(total):
            frame = np.empty((360, 640, 3), np.uint8)
            frame[:] = colours[int(np.searchsorted(cuts, t, side="right"))]
            frame[:, 2 * t : 2 * t + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    config = CurationConfig(cuts=Cuts(detectors=("content",), min_clip_s=0.5))
    result = process_video("larger.mp4", path, config, tmp_path)

    assert [(c.start_frame, c.end_frame) for c in result.clips] == [(0, 40), (40, 85), (85, 120)]
    with tarfile.open(result.spool) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    for clip in result.clips:
        small = clip.renditions[SMALL]
        assert (small.width, small.height, small.remuxed) == (320, 180, False)
        assert small.first_frame == 0  # x264 puts a key frame at each cut
        with av.open(io.BytesIO(files[f"{clip.key}.mp4"])) as container:
            frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
        bars = frames[: clip.num_frames].mean(axis=1).argmax(axis=1)  # the bar's left column
        np.testing.assert_array_equal(bars, np.arange(clip.start_frame, clip.end_frame))


def _write_plain(path: Path, width: int, height: int, frames: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            frame = np.full((height, width, 3), 60, np.uint8)
            frame[:, (i * 4) % width :][:, :16] = 250  # a bar moving right: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "decoder"]


def test_frames_decode_on_a_thread_of_their_own_that_stops_with_the_stream(tmp_path):
    """The decoder runs ahead of the caller on its own thread: every packet comes before the frames
    it gives, in the decoder's order, and closing the stream part way stops the thread."""
    path = tmp_path / "bar.mp4"
    _write_plain(path, 160, 96, 120)
    config = CurationConfig()
    with av.open(str(path)) as container:
        expected = [f.to_ndarray() for f in container.decode(video=0)]
        container.seek(0)
        expected_packets = [bytes(p) for p in container.demux(video=0) if p.size]
    events: list[object] = []
    with open_video(path, config.limits, config.decode) as video:
        for frame in video.frames(on_packet=lambda p: events.append(bytes(p))):
            events.append(frame)
    packets = [e for e in events if isinstance(e, bytes)]
    frames = [e for e in events if not isinstance(e, bytes)]
    assert packets == expected_packets
    assert len(frames) == 120 and all(np.array_equal(i420_array(f), e) for f, e in zip(frames, expected, strict=True))
    # A frame comes after the packet it is decoded from: H.264 from x264 here has no frame reordering
    # delay beyond its B-frames, so frame k follows packet k at least.
    positions = [i for i, e in enumerate(events) if not isinstance(e, bytes)]
    assert all(position > 2 * k for k, position in enumerate(positions))
    assert not _decoder_threads()

    with open_video(path, config.limits, config.decode) as video:
        frames = iter(video)
        for _ in range(5):
            next(frames)
        assert len(_decoder_threads()) == 1
    assert not _decoder_threads()  # closed part way: the decoder's thread is gone too
    with pytest.raises(RuntimeError, match="read once"):
        list(video.frames())
    # Without read-ahead (each of several workers): the same packets and frames, on this thread.
    inline: list[object] = []
    with open_video(path, config.limits, Decode(read_ahead=False)) as video:
        for frame in video.frames(on_packet=lambda p: inline.append(bytes(p))):
            assert not _decoder_threads()
            inline.append(frame)
    assert [e for e in inline if isinstance(e, bytes)] == expected_packets
    assert [i420_array(e).tobytes() for e in inline if not isinstance(e, bytes)] == [e.tobytes() for e in expected]


def test_small_sources_decode_on_one_thread_and_larger_ones_on_ffmpegs(tmp_path):
    """FFmpeg's frame threads cost small frames more than they save: up to 640x480 one decoder
    thread, above it FFmpeg's choice; `decode.threads` decides where it is set."""
    config = CurationConfig()
    for (width, height), threads in (((320, 180), 1), ((640, 480), 1), ((1280, 720), 0)):
        path = tmp_path / f"{width}.mp4"
        _write_plain(path, width, height, 2)
        with open_video(path, config.limits, config.decode) as video:
            assert video.threads == threads, (width, height)
        with open_video(path, config.limits, Decode(threads=3)) as video:
            assert video.threads == 3
