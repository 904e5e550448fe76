"""Evidence that the image-to-video finetune does what it is for, end to end
through the CLI against the local stack, on the motion evidence's
artifacts (`make evidence` writes them: moving-disc shards with known velocities, the
trained tiny VAE, Stage II trained `full`):

Stage II -> `vdm finetune i2v --max-steps 0` (the widened, untrained i2v model) and
`vdm finetune i2v` for --steps -> `vdm eval` on each (each data clip's first
frame animated). Prints JSON: per model, generated frame 0 against the conditioning
frame (PSNR; against another clip's frame, what an unrelated start scores; the VAE's
reconstruction, the ceiling; where the disc starts), and speed / straightness / jerk
of the tracked disc against the data's. Then the finetuned model's SVD-format folder
sampled by diffusers' StableVideoDiffusionPipeline against our sampler.

    python benchmarks/i2v_evidence/run.py [--steps 1500] [--prefix s3://vdm/evidence] [--eval-steps 25]

The finetune resumes from its newest checkpoint under <prefix>/i2v (a shorter --steps
than a finished run's checkpoint finishes at once); the untrained model is made once.
Figures of a run: docs/evidence/i2v.md.
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


def pipeline_agreement(svd_uri: str, data: str, steps: int) -> dict:
    """Max |difference| of frames sampled from the exported folder by diffusers' pipeline and
    by ours, same seed and noise levels, conditioned on a data clip's first frame."""
    import itertools

    import numpy as np
    import torch
    from PIL import Image

    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.training.run import shard_urls
    from model.conditioning import motion_bucket
    from model.data import ClipDataset
    from model.pipeline import GenerationConfig, animate
    from model.stages import VideoDiffusion, named_config

    store = ObjectStore.from_settings(load_settings())
    with tempfile.TemporaryDirectory() as tmp:
        store.download_folder(svd_uri, Path(tmp) / "svd")
        model = VideoDiffusion.create(named_config(str(HERE / "i2v.yaml"), "i2v"), init_from=Path(tmp) / "svd")
        spec = model.config.clip
        clip = next(itertools.islice(iter(ClipDataset(shard_urls(data, store), spec, random_crop=False)), 1))
        rgb = ((clip["video"][0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
        config = GenerationConfig(
            num_frames=spec.num_frames, height=spec.height, width=spec.width, sampler="euler", steps=steps
        )
        ours = animate(model, image, config)
        from diffusers import StableVideoDiffusionPipeline

        from model.networks import restore_norm_eps

        pipeline = StableVideoDiffusionPipeline.from_pretrained(Path(tmp) / "svd")
        restore_norm_eps(pipeline.unet)  # the network ours runs: the compared part is the pipeline
        pipeline.set_progress_bar_config(disable=True)
        theirs = pipeline(
            Image.fromarray(np.ascontiguousarray(rgb)), height=spec.height, width=spec.width,
            num_frames=spec.num_frames, num_inference_steps=config.steps, fps=int(config.fps) + 1,
            motion_bucket_id=int(motion_bucket(torch.tensor(config.motion))),
            generator=torch.Generator().manual_seed(config.seed), output_type="pt",
        ).frames[0] * 2 - 1  # fmt: skip
    return {"max_abs_difference": float((ours - theirs).abs().max()), "frame_std": float(ours.std())}


def store_has(uri: str) -> bool:
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings

    return ObjectStore.from_settings(load_settings()).exists(uri)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", default="s3://vdm/evidence")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-clips", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=25)
    args = parser.parse_args()

    vdm("stack", "up")
    p, data = args.prefix, f"{args.prefix}/shapes"
    finetune = ("finetune", "i2v", "--config", str(HERE / "i2v.yaml"), "--data", data, "--init-from", f"{p}/full/final")
    seconds = {}
    if not store_has(f"{p}/i2v-untrained/final/stage.json"):
        vdm(*finetune, "--max-steps", "0", "--output", f"{p}/i2v-untrained")
    out, seconds["i2v"] = vdm(
        *finetune, "--max-steps", str(args.steps), "--output", f"{p}/i2v", "--resume",
        "--register-as", "vdm-i2v-evidence",
    )  # fmt: skip
    registered = next((line.split()[1] for line in out.splitlines() if "registered" in line), None)

    report = {"steps": args.steps, "wall_s": {k: round(v, 1) for k, v in seconds.items()}, "registered": registered}
    for name in ("i2v-untrained", "i2v"):
        out, _ = vdm(
            "eval", "--model", f"{p}/{name}/final", "--data", data,
            "--clips", str(args.eval_clips), "--sample-steps", str(args.eval_steps),
        )  # fmt: skip
        result = json.loads(out[out.index("{") :])
        details = result["details"]
        report.setdefault("data", details["data"])
        first_frame = {k.removeprefix("first_frame_"): v for k, v in result["metrics"].items() if "first_frame" in k}
        report[name] = {"first_frame": first_frame, "motion": details["generated"]}
        speed = details["generated"]["speed_px_per_frame"] / details["data"]["speed_px_per_frame"]
        report[name]["motion"]["speed_ratio"] = speed  # generated over the data's: 1 is right
        report[name]["mlflow_run"] = result["mlflow_run"]
    report["diffusers_pipeline"] = pipeline_agreement(f"{p}/i2v/svd", data, args.eval_steps)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
