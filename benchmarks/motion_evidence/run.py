"""Evidence that the video stage (Stage II) learns motion, end to end
through the CLI against the local stack:

moving-shapes shards (known velocities) -> `vdm train-vae` -> `vdm train --stage image`
-> the inflated, untrained video model (`vdm train --stage video --max-steps 0`) and
Stage II trained `full` and `partial` on the same step budget -> `vdm eval` on
each. Prints JSON: per model the tracked speed, straightness and jerk of generated
clips against the data's, and each step's wall time. Samples land in MLflow.

    python benchmarks/motion_evidence/run.py [--video-steps 3000] [--prefix s3://vdm/evidence]

Method and figures: docs/evidence/motion.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def vdm(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"vdm {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    print(f"  vdm {args[0]} {args[1] if len(args) > 1 else ''}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return result.stdout, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", default="s3://vdm/evidence")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--image-steps", type=int, default=1000)
    parser.add_argument("--video-steps", type=int, default=3000)
    parser.add_argument("--eval-clips", type=int, default=8)
    args = parser.parse_args()

    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.sample_data.shards import write_shapes_shards

    vdm("stack", "up")
    data, p = f"{args.prefix}/shapes", args.prefix
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_shards(Path(tmp), shards=8, clips_per_shard=args.clips // 8, num_frames=24, seed=1)
        ObjectStore.from_settings(load_settings()).publish_folder(Path(tmp), data)

    seconds = {}
    _, seconds["vae"] = vdm("train-vae", "--data", data, "--output", f"{p}/vae", "--max-steps", str(args.vae_steps))
    common = ("--data", data, "--max-steps")
    _, seconds["stage_1"] = vdm(
        "train", "--stage", "image", "--config", str(HERE / "image.yaml"), *common, str(args.image_steps),
        "--output", f"{p}/stage1", "--vae", f"{p}/vae",
    )  # fmt: skip
    video = ("train", "--stage", "video", "--config", str(HERE / "video.yaml"), "--init-from", f"{p}/stage1/final")
    vdm(*video, *common, "0", "--output", f"{p}/untrained")
    for strategy in ("full", "partial"):
        _, seconds[f"stage_2_{strategy}"] = vdm(
            *video, *common, str(args.video_steps), "--strategy", strategy, "--output", f"{p}/{strategy}"
        )

    report = {"video_steps": args.video_steps, "wall_s": {k: round(v, 1) for k, v in seconds.items()}}
    for name in ("untrained", "full", "partial"):
        out, _ = vdm("eval", "--model", f"{p}/{name}/final", "--data", data, "--clips", str(args.eval_clips))
        result = json.loads(out[out.index("{") :])
        report.setdefault("data", result["details"]["data"])
        report[name] = result["details"]["generated"] | {"mlflow_run": result["mlflow_run"]}
    for name in ("untrained", "full", "partial"):  # generated speed over the data's: 1 is right
        report[name]["speed_ratio"] = report[name]["speed_px_per_frame"] / report["data"]["speed_px_per_frame"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
