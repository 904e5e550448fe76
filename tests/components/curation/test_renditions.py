"""A clip's renditions: stream copies decode to exactly the source's frames, encoded ones
have the configured size and stay close to the source; small synthetic sources made here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from components.common.media import write_video
from components.curation.config import CurationConfig, Decode, Limits, Output
from components.curation.renditions import (
    KEY_INTERVAL_S,
    SMALL_X264,
    ClipEncoder,
    PacketStore,
    SourceVideo,
    VideoEncoding,
)
from components.curation.video import VideoStream, from_rgb
from model.data import ClipDataset, ClipSpec
from model.records import HQ, SMALL, ClipRecord, Rendition

FPS = 24.0


def _pattern(frames: int, height: int, width: int) -> np.ndarray:
    """Smooth moving gradients, a different picture every frame (compressible, so an encode
    at the default CRF stays close to it)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = 128 + 100 * np.sin((xs + 3 * t) / width * 2 * np.pi)
        out[t, ..., 1] = 128 + 100 * np.cos((ys - 2 * t) / height * 2 * np.pi)
        out[t, ..., 2] = (4 * t) % 256
    return out


def _source(path: Path, frames: int, height: int, width: int) -> SourceVideo:
    # x264's defaults at this preset: B-frames (decode order differs from presentation order).
    write_video(path, _pattern(frames, height, width), FPS, crf=18)
    return SourceVideo(path, width, height, "h264", FPS)


def _decode(data: bytes | Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24", width=width, height=height) for f in container.decode(video=0)])


def _i420(frames: np.ndarray) -> list[np.ndarray]:
    """RGB frames as curation hands them to the encoder."""
    return [from_rgb(frame) for frame in frames]


def _fed(encoder: ClipEncoder, path: Path, on_packet=None) -> ClipEncoder:
    """`encoder`, fed every packet and frame of `path` as curation feeds it (frames at the decode
    size); `on_packet` (packet, its number) may change a packet first."""
    limits = Limits(max_width=4096, max_height=4096)
    count = 0

    def demuxed(packet: av.Packet) -> None:
        nonlocal count
        if on_packet is not None:
            on_packet(packet, count)
        count += 1
        encoder.demuxed(packet)

    with VideoStream(path, limits, Decode(max_side=encoder.config.decode.max_side)) as stream:
        for index, frame in enumerate(stream.frames(on_packet=demuxed)):
            encoder.feed(index, frame)
    encoder.finish()
    return encoder


def _config(clip_max_side: int = 320, hq_max_side: int | None = 1920) -> CurationConfig:
    return CurationConfig(output=Output(clip_max_side=clip_max_side, hq_max_side=hq_max_side))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> SourceVideo:
    """160x96, 3 s: fits the small rendition, so every rendition is a stream copy."""
    return _source(tmp_path_factory.mktemp("renditions") / "small.mp4", 72, 96, 160)


def _store(path: Path) -> PacketStore:
    """Every packet of `path`'s video stream, kept as curation keeps a source's."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        store = PacketStore(stream, stream.time_base)
        for packet in container.demux(stream):
            if packet.size:
                store.add(bytes(packet), packet.pts, packet.dts, packet.is_keyframe)
    return store


def test_the_packet_index_sees_b_frames_and_key_frames(small_source):
    index = _store(small_source.path).index()
    assert index.frames == 72
    assert not np.array_equal(index.frame_packet, np.arange(72))  # B-frames: decoded out of order
    assert index.key_frames[0] == 0 and 48 in index.key_frames  # a GOP of 2 s at 24 fps


@pytest.mark.parametrize("start, end", [(0, 30), (48, 72), (20, 41), (50, 61)])
def test_a_remuxed_clip_decodes_to_exactly_the_source_frames(small_source, start, end):
    """Starting on a key frame (0, 48) and between them: the file starts at the key frame before."""
    source = _decode(small_source.path)
    with _fed(ClipEncoder(small_source, _config()), small_source.path) as encoder:
        out = encoder.renditions(start, end, _i420(source[start:end]))
    small, hq = out[SMALL], out[HQ]
    assert small.ext == "mp4" and hq.ext == "hq.mp4"
    assert small.rendition == hq.rendition
    key = 0 if start < 48 else 48
    assert small.rendition == Rendition(160, 96, first_frame=start - key, remuxed=True)
    decoded = _decode(small.mp4)
    first = small.rendition.first_frame
    assert len(decoded) >= first + end - start
    np.testing.assert_array_equal(decoded[first : first + end - start], source[start:end])


def test_a_source_copy_after_packets_are_released_still_gives_exactly_its_frames(small_source):
    """Packets before the key frame at or before a frame are let go (memory stays bounded on
    any length); frames keep their numbers, so a later clip copies exactly its own frames, and
    an earlier one is refused."""
    source = _decode(small_source.path)
    store = _store(small_source.path)
    store.release_before(20)  # key frame 0: nothing to let go yet
    assert store.frames == store.kept == 72
    store.release_before(50)
    assert store.frames == 72 and store.kept == 72 - 48  # from key frame 48 on
    mp4, first = store.clip(50, 61)
    assert first == 2
    np.testing.assert_array_equal(_decode(mp4)[first : first + 11], source[50:61])
    with pytest.raises(ValueError, match="released"):
        store.clip(40, 50)
    store.close()


def test_an_open_gop_source_remuxes_without_the_previous_gops_frames(tmp_path):
    """Open GOP: B-frames after a key frame in decode order that show before it need the GOP
    before; a clip from that key frame on leaves them out and still decodes exactly."""
    path = tmp_path / "open-gop.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.options = {"crf": "18", "x264-params": "open-gop=1:keyint=24:min-keyint=24:scenecut=0:bframes=3"}
        for array in _pattern(72, 96, 160):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    source = _decode(path)
    with _fed(ClipEncoder(SourceVideo(path, 160, 96, "h264", FPS), _config()), path) as encoder:
        for start, end in [(24, 50), (30, 72)]:
            clip = encoder.renditions(start, end, _i420(source[start:end]))[SMALL]
            first = clip.rendition.first_frame
            assert clip.rendition.remuxed and first == start % 24
            np.testing.assert_array_equal(_decode(clip.mp4)[first : first + end - start], source[start:end])


def test_a_larger_source_encodes_small_and_hq_and_remuxes_hq_at_its_size(tmp_path):
    """640x384 source: small (320 px) encoded once for the video and each clip copied out of it,
    from the key frame before it; hq at the source's size (under hq_max_side 1920) remuxed;
    hq_max_side 256 encodes hq at 256x154 from the source."""
    width, height, start, end = 640, 384, 10, 40
    source = _source(tmp_path / "large.mp4", 60, height, width)
    truth = _decode(source.path)
    decode_size = _decode(source.path, 320, 192)
    with _fed(ClipEncoder(source, _config()), source.path) as encoder:
        out = encoder.renditions(start, end, _i420(decode_size[start:end]))
    first = out[SMALL].rendition.first_frame
    key_interval = round(KEY_INTERVAL_S * FPS)
    assert out[SMALL].rendition == Rendition(320, 192, first_frame=first) and 0 <= first < key_interval
    small = _decode(out[SMALL].mp4)
    assert small.shape[1:] == (192, 320, 3) and len(small) >= first + end - start
    assert _psnr(small[first : first + end - start], decode_size[start:end]) > 30
    assert out[HQ].rendition == Rendition(640, 384, first_frame=start, remuxed=True)
    hq = _decode(out[HQ].mp4)
    np.testing.assert_array_equal(hq[start : start + end - start], truth[start:end])

    with _fed(ClipEncoder(source, _config(clip_max_side=128, hq_max_side=256)), source.path) as encoder:
        clips = [encoder.renditions(s, e, _i420(decode_size[s:e])) for s, e in [(0, 20), (25, 50)]]
    for (s, e), out in zip([(0, 20), (25, 50)], clips, strict=True):
        first = out[SMALL].rendition.first_frame
        assert out[SMALL].rendition == Rendition(128, 76, first_frame=first) and first == s % key_interval
        small = _decode(out[SMALL].mp4)
        assert small.shape[1:] == (76, 128, 3)
        assert _psnr(small[first : first + e - s], _decode(source.path, 128, 76)[s:e]) > 30
        assert out[HQ].rendition == Rendition(256, 154)
        hq = _decode(out[HQ].mp4)
        assert hq.shape == (e - s, 154, 256, 3)
        assert _psnr(hq, _decode(source.path, 256, 154)[s:e]) > 30


def _assert_bars(encoding: VideoEncoding, start: int, end: int) -> None:
    """The clip [start, end) decodes to frames with bars at columns start, ..., end - 1."""
    mp4, first = encoding.clip(start, end)
    assert 0 <= first < 25  # from the key frame before it
    decoded = _decode(mp4)[first : first + end - start]
    np.testing.assert_array_equal(decoded.mean(axis=(1, 3)).argmax(axis=1), np.arange(start, end))


def test_a_video_encoding_gives_each_clip_its_own_frames(tmp_path):
    """Frame t shows a bright bar at column t, so a frame one off is told apart: clips copied out
    of the video's one encoding, at and between key frames, decode to their own frames; packets
    before the last clip's key frame are let go; a clip not yet encoded is refused."""
    frames, fps = 75, 25.0
    video = np.zeros((frames, 64, 96, 3), np.uint8)
    for t in range(frames):
        video[t, :, t : t + 4] = 255
    encoding = VideoEncoding((96, 64), fps, 18, SMALL_X264, key_interval_s=1.0)
    try:
        for index, array in enumerate(video):
            encoding.feed(index, from_rgb(array))
            if index == 30:  # x264 holds the newest frames back
                assert not encoding.encoded(40)
                with pytest.raises(ValueError, match=r"frames \[20, 40\) are not all encoded"):
                    encoding.clip(20, 40)
        encoding.finish()
        for start, end in [(0, 25), (25, 40), (31, 60), (60, 75)]:
            _assert_bars(encoding, start, end)
        kept = encoding._store.kept
        encoding.release_before(60)
        # From the key frame at or before 60 on (x264 puts one at most 25 frames apart).
        assert 75 - 60 <= encoding._store.kept <= 75 - 60 + 25 < kept
        _assert_bars(encoding, 61, 75)
        with pytest.raises(ValueError, match="released"):
            encoding.clip(10, 30)
    finally:
        encoding.close()


def test_no_hq_rendition_when_hq_max_side_is_none(small_source):
    frames = _decode(small_source.path)[:24]
    with _fed(ClipEncoder(small_source, _config(hq_max_side=None)), small_source.path) as encoder:
        out = encoder.renditions(0, 24, _i420(frames))
    assert set(out) == {SMALL}


def test_a_codec_outside_the_remux_list_is_encoded(small_source):
    """The same file declared mpeg4: nothing is copied, both renditions are H.264 at the source's size."""
    frames = _decode(small_source.path)[10:30]
    declared = SourceVideo(small_source.path, 160, 96, "mpeg4", FPS)
    with _fed(ClipEncoder(declared, _config()), small_source.path) as encoder:
        out = encoder.renditions(10, 30, _i420(frames))
    assert out[SMALL].rendition == Rendition(160, 96, first_frame=10) and not out[SMALL].rendition.remuxed
    assert _psnr(_decode(out[SMALL].mp4)[10:30], frames) > 30


def test_packets_that_cannot_be_told_apart_are_not_copied(small_source):
    """A packet whose timestamp repeats the one before: the source's frames cannot be matched to
    its packets from there on, so nothing is copied and each clip is encoded from its frames."""
    frames = _decode(small_source.path)

    seen: list[int] = []

    def repeat_a_timestamp(packet: av.Packet, number: int) -> None:
        if number == 5:
            packet.pts = seen[-1]
        seen.append(packet.pts)

    with _fed(ClipEncoder(small_source, _config()), small_source.path, repeat_a_timestamp) as encoder:
        out = encoder.renditions(10, 30, _i420(frames[10:30]))
    for name in (SMALL, HQ):
        assert out[name].rendition == Rendition(160, 96) and not out[name].rendition.remuxed
        assert _psnr(_decode(out[name].mp4), frames[10:30]) > 30
    with _fed(ClipEncoder(small_source, _config()), small_source.path) as encoder:  # untouched: copied
        assert encoder.renditions(10, 30, _i420(frames[10:30]))[SMALL].rendition.remuxed


def _shard(path: Path, mp4: bytes, record: ClipRecord) -> str:
    with wds.TarWriter(str(path)) as tar:
        tar.write({"__key__": record.key, "mp4": mp4, "json": record.to_json().encode()})
    return str(path)


def test_the_loader_skips_the_frames_before_a_remuxed_clip(small_source, tmp_path):
    """A clip [21, 45) stream-copied from key frame 0 (first_frame 21) in the small shards and one
    with first_frame 3 in the hq shards: each loader reads frames from the clip's own first frame."""
    source = _decode(small_source.path)
    with _fed(ClipEncoder(small_source, _config()), small_source.path) as encoder:
        out = encoder.renditions(21, 45, _i420(source[21:45]))
    record = ClipRecord(
        key="clip", video="small.mp4", start_frame=21, end_frame=45, start_s=21 / FPS, end_s=45 / FPS, fps=FPS,
        camera_motion="static", scores={"motion": 0.0}, renditions={SMALL: out[SMALL].rendition},
    )  # fmt: skip
    assert out[SMALL].rendition.first_frame == 21
    spec = ClipSpec(num_frames=24, fps=FPS, height=96, width=160)  # every frame of the clip, at its size
    item = next(iter(ClipDataset([_shard(tmp_path / "small.tar", out[SMALL].mp4, record)], spec, random_crop=False)))
    got = ((item["video"].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    np.testing.assert_allclose(got, source[21:45], atol=1)

    # The hq shard's file starts 3 frames before its clip [3, 27): its record says so under `hq`.
    hq_record = ClipRecord.from_json(record.to_json())
    hq_record.renditions = {SMALL: Rendition(160, 96), HQ: Rendition(160, 96, first_frame=3, remuxed=True)}
    hq_shard = _shard(tmp_path / "hq.tar", out[SMALL].mp4, hq_record)
    hq_spec = ClipSpec(num_frames=24, fps=FPS, height=96, width=160, rendition=HQ)
    item = next(iter(ClipDataset([hq_shard], hq_spec, random_crop=False)))
    got = ((item["video"].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    np.testing.assert_allclose(got, source[3:27], atol=1)
    assert json.loads(hq_record.to_json())["renditions"]["hq"]["first_frame"] == 3

    # The wrong folder for the stage's rendition is an error naming the right one, never silently other frames.
    with pytest.raises(ValueError, match="has no 'hq' rendition"):
        next(iter(ClipDataset([_shard(tmp_path / "small.tar", out[SMALL].mp4, record)], hq_spec)))
    hq_record.renditions[HQ] = Rendition(320, 192, first_frame=3, remuxed=True)
    with pytest.raises(ValueError, match=r"160x96, not its 'hq' rendition's 320x192.*shards-hq/"):
        next(iter(ClipDataset([_shard(tmp_path / "hq.tar", out[SMALL].mp4, hq_record)], hq_spec)))
    with pytest.raises(ValueError, match="clip rendition 'large'"):
        ClipSpec(rendition="large")


def test_a_stage_reads_the_rendition_it_asks_for_from_a_curated_output():
    from components.training.run import rendition_data

    assert rendition_data("s3://b/cur/shards/", "hq") == "s3://b/cur/shards-hq/"
    assert rendition_data("s3://b/cur/shards-hq", "small") == "s3://b/cur/shards/"
    assert rendition_data("s3://b/cur/shards/", "small") == "s3://b/cur/shards/"
    assert rendition_data("/data/cur/shards", "hq") == "/data/cur/shards-hq/"
    # Anything that is not a curated output's training folder is read as given.
    assert rendition_data("s3://b/my-clips/", "hq") == "s3://b/my-clips/"
    assert rendition_data("shards", "hq") == "shards"
