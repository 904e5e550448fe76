"""`vdm`: the platform's command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from components.common.settings import load_settings
from model.records import MAX_MOTION, MOTION_BUCKET_SCALE
from model.tasks import STAGES

PRETRAINING_STAGES = list(STAGES)  # image, video, hq
CONFIG_HELP = (
    "A shipped size: tiny (CPU, random weights), small (one 24 GB GPU), svd (SVD's size); "
    "or a YAML file, local or s3://."
)
MODEL_OPTION = click.option(
    "--model",
    "model_location",
    required=True,
    help="models:/NAME@ALIAS, or a trained model's final folder (s3:// or local).",
)


class VdmGroup(click.Group):
    """The `vdm` group: an expected failure in any command (a server that cannot be reached, a
    model, alias, bucket or object that does not exist, refused credentials) ends in one
    `error: ...` line and exit code 1; any other exception keeps its traceback. Neither shows a
    presigned URL's signature."""

    def invoke(self, ctx: click.Context):
        import warnings

        from vdm.errors import failure_message, redact, redacted_traceback

        # kfp.Client warns on every start that it needs a KFP 2 server: noise to a user of one.
        warnings.filterwarnings("ignore", "This client only works with Kubeflow Pipeline", FutureWarning)
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            message = failure_message(e)
            if message is None:  # a bug: its traceback, without the secrets of presigned URLs
                click.echo(redacted_traceback(e), err=True, nl=False)
                sys.exit(1)
            _fail(redact(message))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from components.common.tracking import git_commit

    commit = git_commit()
    click.echo(f"vdm {version('vdm-platform')}" + (f" (commit {commit})" if commit != "unknown" else ""))
    ctx.exit()


@click.group(cls=VdmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the package version and the code's git commit, and exit.",
)
def main() -> None:
    """vdm-platform: raw videos to curated data, trained, registered and served video models."""


@main.group()
def stack() -> None:
    """The local stack: S3 (SeaweedFS), MLflow and Prometheus on 127.0.0.1."""


def _stack():
    from vdm.stack import Stack

    return Stack(load_settings(), log=lambda line: click.echo(line, err=True))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@contextmanager
def _step_progress(total: int, what: str, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr over `total` steps, advanced by the callback this yields
    (a sampler's `callback(i)`); none when quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="step", file=sys.stderr, disable=quiet or not sys.stderr.isatty()) as bar:
        yield lambda _step: bar.update()


@stack.command("up")
def stack_up() -> None:
    """Start every server (idempotent); restart any that died, on its data."""
    from vdm.stack import StackError

    s = _stack()
    try:
        statuses = s.up()
    except StackError as e:
        _fail(str(e))
    for status in statuses:
        click.echo(status.line())
    click.echo(f'state: {s.home}   exports: eval "$(vdm stack env)"')


@stack.command("down")
def stack_down() -> None:
    """Stop exactly the servers `up` started. Data stays in the state folder."""
    stopped = _stack().down()
    if not stopped:
        click.echo("nothing was running")


@stack.command("status")
def stack_status() -> None:
    """Report each server: running, starting, dead, stopped or skipped. Exit 1 unless all run."""
    statuses = _stack().status()
    for status in statuses:
        click.echo(status.line())
    if any(s.state not in ("running", "skipped") for s in statuses):
        sys.exit(1)


@stack.command("env")
def stack_env() -> None:
    """Print shell exports for the stack's clients: eval "$(vdm stack env)"."""
    s = _stack()
    if not s.credentials():
        _fail("no credentials yet: run `vdm stack up` first")
    click.echo(s.env_exports(), nl=False)


@main.group()
def store() -> None:
    """The S3 object store (the local stack's SeaweedFS, or the server VDM_S3_ENDPOINT names)."""


@store.command("mb")
@click.argument("bucket_uri", metavar="s3://BUCKET")
def store_mb(bucket_uri: str) -> None:
    """Make a bucket (nothing to do if it exists)."""
    from components.common.objectstore import ObjectStore, ObjectStoreError, S3Uri

    try:
        target = S3Uri.parse(bucket_uri)
        if target.key:
            raise ValueError(f"give a bucket, not a prefix: s3://{target.bucket}")
        created = ObjectStore.from_settings(load_settings()).make_bucket(target.bucket)
    except (ObjectStoreError, ValueError) as e:
        _fail(str(e))
    click.echo(f"made bucket s3://{target.bucket}" if created else f"bucket s3://{target.bucket} exists already")


def _run_options(command: Callable) -> Callable:
    """The options of every training run, `vdm train` and each `vdm finetune KIND`: its length,
    where it resumes from, and the registered model it adds to."""
    options = (
        click.option(
            "--max-steps",
            type=click.IntRange(min=0),
            default=None,
            help="The step training stops at, a resumed run's steps included; 0 saves the model it starts from "
            "(default: the config's max_steps).",
        ),
        click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint under --output."),
        click.option(
            "--resume-from",
            default=None,
            help="Continue from this checkpoint folder (s3://.../checkpoints/step-N), another run's included.",
        ),
        click.option(
            "--register-as",
            default=None,
            help="MLflow model to add the final pipeline to as a new version, alias `candidate` "
            "(default: not registered).",
        ),
    )
    for option in reversed(options):  # as if written one above the other, in this order
        command = option(command)
    return command


def _check_output(output: str) -> None:
    """Stop before any work unless an s3:// output can be written (a local folder needs no check)."""
    from components.common.objectstore import ObjectStore, ObjectStoreError, is_s3_uri

    if not is_s3_uri(output):
        return
    try:
        ObjectStore.from_settings(load_settings()).check_writable(output)
    except (ObjectStoreError, ValueError) as e:
        _fail(str(e))


@main.group()
def data() -> None:
    """Sample data."""


@data.command("synth")
@click.option("--output", required=True, help="Folder or s3://bucket/prefix to write into.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same videos.")
def data_synth(output: str, seed: int) -> None:
    """Write sample videos with known truth (cuts, fades, motion, text) and bad files,
    described by manifest.json."""
    from components.common.objectstore import ObjectStore, is_s3_uri
    from components.sample_data.synth import SynthConfig, synthesize

    store = ObjectStore.from_settings(load_settings()) if is_s3_uri(output) else None
    manifest = synthesize(output, SynthConfig(seed=seed), store=store, progress=True)
    valid = sum(v["valid"] for v in manifest["videos"])
    click.echo(f"wrote {valid} videos and {len(manifest['videos']) - valid} bad files to {output} (manifest.json)")


@data.command("orbits")
@click.option("--output", required=True, help="Folder or s3://bucket/prefix to write the shards into.")
@click.option("--shards", type=int, default=2, show_default=True)
@click.option("--orbits-per-shard", type=int, default=8, show_default=True)
@click.option("--views", type=int, default=8, show_default=True, help="Frames per orbit, evenly over 360 degrees.")
@click.option("--size", type=int, default=32, show_default=True, help="Height and width in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same objects and cameras.")
def data_orbits(output: str, shards: int, orbits_per_shard: int, views: int, size: int, seed: int) -> None:
    """Write orbit shards for `vdm finetune multiview`: turns around procedural coloured boxes,
    each sample's JSON carrying its camera `elevation` and `azimuths` (degrees)."""
    import tempfile
    from pathlib import Path

    from components.common.objectstore import ObjectStore, is_s3_uri
    from components.sample_data.orbits import write_orbit_shards

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if is_s3_uri(output) else Path(output)
        paths, _ = write_orbit_shards(
            folder, shards=shards, orbits_per_shard=orbits_per_shard, num_views=views, size=size, seed=seed
        )
        if is_s3_uri(output):
            ObjectStore.from_settings(load_settings()).publish_folder(folder, output)
    click.echo(f"wrote {len(paths)} shards of {orbits_per_shard} orbits ({views} views, {size}px) to {output}")


@main.command()
@click.option("--input", "input_location", required=True, help="Folder or s3://bucket/prefix of raw videos.")
@click.option("--output", required=True, help="s3://bucket/prefix for shards, manifest and dataset card.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="curation.yaml")
@click.option("--workers", type=int, default=None, help="Processes for decoding (default: every core).")
@click.option(
    "--allow-random-weights",
    is_flag=True,
    help="Use random-initialised tiny models where no weights are configured (tests, demo only; the card says so).",
)
def curate(input_location: str, output: str, config_path: str | None, workers: int | None, allow_random_weights: bool):
    """Curate raw videos into WebDataset shards with SVD's annotations, filters and a dataset card."""
    if not output.startswith("s3://"):
        _fail(f"--output must be an s3://bucket/prefix, not {output!r}")
    _check_output(output)  # before the annotators' imports, which take seconds
    from components.common.objectstore import ObjectStore, ObjectStoreError
    from components.curation.config import CurationConfig, with_random_weights
    from components.curation.curate import curate as run_curation
    from components.curation.neural import RandomWeightsNotAllowed

    config = CurationConfig.load(config_path)
    if allow_random_weights:
        config = with_random_weights(config)
    store = ObjectStore.from_settings(load_settings())
    try:
        result = run_curation(input_location, output, config, store, workers=workers, progress=True)
    except (ObjectStoreError, RandomWeightsNotAllowed, ValueError) as e:
        _fail(str(e))
    card = result.card
    click.echo(
        f"\nvdm curate: done ({result.inputs} files, {result.input_shards} input shards, "
        f"{result.skipped_shards} already done)"
    )
    rows = {
        "clips": f"{card['clips_before_filter']} -> {card['clips_after_filter']} kept",
        "hours": f"{card['hours_before_filter']:.4f} -> {card['hours_after_filter']:.4f}",
        "splits": ", ".join(f"{n} {f['clips']} clips ({f['hours']:.4f} h)" for n, f in card["splits"].items()),
        "rejected_files": f"{card['rejected_files']} {card['rejected_per_reason']}",
        "drops_per_filter": json.dumps(card["drops_per_filter"]),
        "random_weights": str(card["random_weights"]),
        "manifest": f"{output.rstrip('/')}/manifest.jsonl",
        "shards": f"{output.rstrip('/')}/shards/",
        "heldout_shards": card["heldout"]["shards"],
        **{
            f"subset {name}": f"{f['train_clips']} training clips ({f['train_hours']:.4f} h)  {f['shards']}"
            for name, f in card["subsets"].items()
        },
        "prompt_set": f"{card['heldout']['prompt_set']} ({card['heldout']['prompts']} prompts)",
        "card": f"{output.rstrip('/')}/dataset_card.html",
        "digest": card["digest"],
        "mlflow_run": result.run_url,
    }
    for key, value in rows.items():
        click.echo(f"  {key:<16}  {value}")
    for warning in card["warnings"]:
        click.echo(f"warning: {warning}")


@main.command("curate-ablation")
@click.option("--curated", required=True, help="s3:// prefix of a finished `vdm curate` output.")
@click.option("--grid", "grid_items", multiple=True, required=True, help="SCORE=P1,P2,... e.g. motion=12.5,25,50")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="curation.yaml")
def curate_ablation(curated: str, grid_items: tuple[str, ...], config_path: str | None) -> None:
    """Filtered subsets for SVD's threshold ablation (one dataset per score and percentile), without re-annotating."""
    from components.common.objectstore import ObjectStore, ObjectStoreError
    from components.curation.ablation import ablation_subsets, parse_grid
    from components.curation.config import CurationConfig

    try:
        index = ablation_subsets(
            curated,
            parse_grid(list(grid_items)),
            ObjectStore.from_settings(load_settings()),
            CurationConfig.load(config_path),
        )
    except (ObjectStoreError, ValueError) as e:
        _fail(str(e))
    for name, subset in index.items():
        click.echo(f"  {name:<22} {subset['clips']:>6} clips  {subset['hours']:.4f} h  {subset['uri']}")
        click.echo(f"  {'':<22} mlflow run: {subset['mlflow_run']}")


@main.command("train")
@click.option("--stage", type=click.Choice(PRETRAINING_STAGES), required=True)
@click.option("--config", "config_name", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--data", required=True, help="s3:// prefix or folder of WebDataset shards.")
@click.option("--output", required=True, help="s3:// prefix for checkpoints and the final UNet.")
@click.option(
    "--init-from",
    default=None,
    help="Previous stage's final folder (s3:// or local), or imported weights: weights:sd21 (Stage I).",
)
@click.option(
    "--vae",
    default=None,
    help="A diffusers VAE or pipeline folder (weights:NAME, s3:// or local); "
    "default: the config's, else --init-from's vae/.",
)
@click.option(
    "--data-format",
    type=click.Choice(["clips", "images", "latents"]),
    default=None,
    help="What --data holds (default: the config's `data`): curated clips, images, or `vdm cache-latents` output.",
)
@click.option(
    "--strategy",
    type=click.Choice(["full", "partial", "spatial"]),
    default=None,
    help="What trains (default: the config's): all layers, temporal only, spatial only.",
)
@_run_options
def train_command(
    stage, config_name, data, output, init_from, vae, data_format, strategy, max_steps, resume, resume_from, register_as
) -> None:
    """Train one stage (I image, II video, III high quality) on the local stack or a pod."""
    from components.training.request import TrainingRequest

    _run_training(
        TrainingRequest(
            kind=stage,
            data=data,
            output=output,
            config=config_name,
            init_from=init_from,
            vae=vae,
            overrides=_set({"data": data_format, "strategy": strategy, "max_steps": max_steps}),
            register_as=register_as,
            resume=resume,
            resume_from=resume_from,
        )
    )


def _set(values: dict) -> dict:
    """The options given (click's None: not given)."""
    return {k: v for k, v in values.items() if v is not None}


def _run_training(request) -> None:
    """Run a training request in this process (under torchrun: this rank's part) and report."""
    _check_output(request.output)
    from components.common.objectstore import ObjectStore, ObjectStoreError
    from components.training.entrypoint import command_of, run_request

    settings = load_settings()
    try:
        result = run_request(request, ObjectStore.from_settings(settings), settings)
    except (ObjectStoreError, ValueError) as e:
        _fail(str(e))
    if result.final is not None:  # rank 0 reports
        click.echo("\n".join(result.lines(command_of(request))))


@main.command("cache-latents")
@click.option("--stage", type=click.Choice(PRETRAINING_STAGES), required=True)
@click.option("--config", "config_name", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--data", required=True, help="s3:// prefix or folder of curated shards.")
@click.option("--output", required=True, help="s3:// prefix for the latent shards.")
@click.option(
    "--vae", default=None, help="The diffusers VAE folder the stage trains with (weights:NAME, s3:// or local)."
)
def cache_latents_command(stage, config_name, data, output, vae) -> None:
    """Encode every clip once with the VAE; train on the result with `data: latents`."""
    from components.common.objectstore import ObjectStore
    from components.training.run import run_latent_caching

    settings = load_settings()
    try:
        result = run_latent_caching(
            stage, config_name, data, output, ObjectStore.from_settings(settings), settings, vae=vae
        )
    except ValueError as e:
        _fail(str(e))
    click.echo(f"\nvdm cache-latents: {result['shards']} shards")
    click.echo(f"  output      {result['output']}\n  mlflow_run  {result['mlflow_run']}")


@main.command("train-vae")
@click.option("--data", required=True, help="s3:// prefix or folder of WebDataset shards.")
@click.option("--output", required=True, help="s3:// prefix for the VAE (a diffusers folder).")
@click.option("--size", type=int, default=32, show_default=True, help="Frame height and width in pixels.")
@click.option("--max-steps", type=int, default=400, show_default=True, help="Training steps.")
def train_vae_command(data: str, output: str, size: int, max_steps: int) -> None:
    """Train the small frame VAE that CPU-sized models use (production uses a pretrained one)."""
    from components.common.objectstore import ObjectStore
    from components.training.run import run_autoencoder_training
    from model.autoencoder import AutoencoderTraining

    settings = load_settings()
    try:
        result = run_autoencoder_training(
            data, output, ObjectStore.from_settings(settings), settings, size=size,
            config=AutoencoderTraining(max_steps),
        )  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    click.echo(f"\nvdm train-vae: reconstruction L1 {result['reconstruction_l1']:.4f}")
    click.echo(f"  output      {result['output']}\n  mlflow_run  {result['mlflow_run']}")


@main.command("sample")
@MODEL_OPTION
@click.option("--prompt", default=None, help="Text kinds, interpolation and prediction: what the video shows.")
@click.option("--negative-prompt", default=None, help="Text kinds: what it should not show.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Image kinds: the frame to animate.")
@click.option(
    "--video", type=click.Path(exists=True, dir_okay=False), help="Interpolation: key frames; prediction: context."
)
@click.option("--elevation", type=float, default=None, help="Multi-view: the camera elevation of --image, degrees.")
@click.option("--length", type=int, default=None, help="Prediction: frames of the continued video (context included).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The mp4 to write.")
@click.option("--frames", type=int, default=None, help="Default: the model's training clip.")
@click.option("--fps", type=float, default=None, help="Default: the model's training clip.")
@click.option(
    "--motion",
    type=click.FloatRange(min=0, max=MAX_MOTION),
    default=None,
    help="How much it should move, per frame at --fps: curation's motion score (px per frame at 128 px; SVD's "
    f"motion bucket, 0 to 255, is {MOTION_BUCKET_SCALE:g}x it). Default: 1.",
)
@click.option("--size", type=int, default=None, help="Height and width in pixels; default: the model's training clip.")
@click.option("--sample-steps", type=int, default=25, show_default=True, help="Sampling steps.")
@click.option("--guidance", type=(float, float), default=(1.0, 3.0), show_default=True, help="First and last frame.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
def sample_command(
    model_location, prompt, negative_prompt, image, video, elevation, length, output, frames, fps, motion, size,
    sample_steps, guidance, seed, quiet,
) -> None:  # fmt: skip
    """Generate a video from a trained model of any kind, from what its kind takes."""
    import tempfile
    from pathlib import Path

    from components.common.media import write_video
    from components.common.objectstore import ObjectStore
    from components.registry.pipeline_model import inputs_from_row
    from components.training.run import local_folder
    from model.pipeline import GenerationConfig, to_uint8
    from model.stages import VideoDiffusion

    row = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "image": Path(image).read_bytes() if image else None,
        "frames": Path(video).read_bytes() if video else None,
        "elevation": elevation,
        "video_frames": length,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = ObjectStore.from_settings(load_settings())
            model = VideoDiffusion.load(local_folder(model_location, store, Path(tmp)))
        inputs = inputs_from_row(model.task, row)
    except ValueError as e:
        _fail(str(e).replace("needs `frames`", "needs --video").replace("needs `image`", "needs --image"))
    config = GenerationConfig.for_clip(
        model.config.clip,
        num_frames=frames,
        height=size,
        width=size,
        fps=fps,
        steps=sample_steps,
        guidance_min=guidance[0],
        guidance_max=guidance[1],
        seed=seed,
        **({} if motion is None else {"motion": motion}),
    )
    with _step_progress(config.steps, "sampling", quiet) as on_step:
        frames = model.task.sample(model, inputs, config, on_step)
    result = to_uint8(frames).numpy()
    write_video(Path(output), result, config.fps, deterministic=False)
    click.echo(f"wrote {output}: {len(result)} frames at {config.fps:g} fps, {config.width}x{config.height}")


@main.command("eval")
@MODEL_OPTION
@click.option(
    "--data",
    required=True,
    help="Held-out shards (s3:// prefix or folder: curation's heldout/); orbits for multi-view.",
)
@click.option("--reference", default=None, help="A second data set the kind compares with (spatial-hq: its images).")
@click.option(
    "--clips", type=int, default=8, show_default=True, help="Videos to generate (and held-out clips to compare with)."
)
@click.option("--sample-steps", type=int, default=25, show_default=True, help="Sampling steps per generated video.")
@click.option(
    "--networks",
    "networks_file",
    default=None,
    help="YAML of the evaluation networks (components/evaluation/public-weights.yaml: I3D, CLIP, aesthetic head).",
)
@click.option(
    "--random-networks",
    is_flag=True,
    help="Networks the YAML names no weights for run seeded random (tests and demos: the figures mean nothing).",
)
@click.option(
    "--prompts-uri", default=None, help='The prompt set (JSONL of {"prompt": ...}); default: curation\'s beside --data.'
)
@click.option(
    "--prompts", type=int, default=None, help="How many of the set's prompts text kinds cycle through (default: all)."
)
@click.option(
    "--report-videos",
    type=int,
    default=4,
    show_default=True,
    help="Inputs the report shows the candidate's and the champion's videos on, side by side.",
)
def eval_command(model_location: str, data: str, reference: str | None, clips: int, sample_steps: int,
                 networks_file: str | None, random_networks: bool, prompts_uri: str | None, prompts: int | None,
                 report_videos: int) -> None:  # fmt: skip
    """Measure a model on held-out data: its kind's figures (motion; in-between positions; velocity; view
    retrieval; camera class accuracy; image-quality proxy), FVD against the held-out clips, CLIP text-video score
    and aesthetic score. Figures, sample mp4s and a side-by-side report (beside the champion) to MLflow, and onto
    the version's tags when --model is a registered model (what `vdm registry promote` reads)."""
    from dataclasses import asdict

    from components.common.objectstore import ObjectStore
    from components.evaluation.config import networks_from
    from components.evaluation.evaluate import run_evaluation

    settings = load_settings()
    try:
        networks = networks_from(networks_file, random_networks=random_networks)
        if random_networks:
            networks = networks.model_copy(update={"allow_random_networks": True})
        report = run_evaluation(
            model_location, data, ObjectStore.from_settings(settings), settings, networks=networks,
            clips=clips, steps=sample_steps, reference=reference, prompts_uri=prompts_uri, prompts=prompts,
            report_videos=report_videos,
        )  # fmt: skip
    except ValueError as e:
        _fail(str(e))
    click.echo(json.dumps({k: v for k, v in asdict(report).items() if k != "page"}, indent=1))
    if report.random_networks:
        click.echo(f"warning: random-weight evaluation networks: {', '.join(report.random_networks)}", err=True)
    click.echo(f"report: {report.report_url}", err=True)


@main.group()
def finetune() -> None:
    """Finetunes of a trained video model: one command per kind (SVD's image-to-video, ...)."""


def _finetune_command(kind: str, title: str, help_text: str, *kind_options):
    """`vdm finetune KIND`: the options every finetune takes, then the training request.
    `kind_options`: click options of this kind only; their values replace the config's
    fields of the same name."""

    @click.option("--config", "config_name", default="tiny", show_default=True, help=CONFIG_HELP)
    @click.option("--data", required=True, help="s3:// prefix or folder of curated shards.")
    @click.option("--output", required=True, help="s3:// prefix for checkpoints and the final folder.")
    @click.option(
        "--init-from",
        required=True,
        help="The trained model: a folder, s3://, models:/NAME@ALIAS, or weights:NAME (i2v: weights:svd-img2vid).",
    )
    @_run_options
    def command(
        config_name, data, output, init_from, max_steps, resume, resume_from, register_as, **kind_values
    ) -> None:
        from components.training.request import TrainingRequest

        _run_training(
            TrainingRequest(
                kind=kind,
                data=data,
                output=output,
                config=config_name,
                init_from=init_from,
                overrides=_set({"max_steps": max_steps, **kind_values}),
                register_as=register_as,
                resume=resume,
                resume_from=resume_from,
            )
        )

    for option in kind_options:
        command = option(command)
    return finetune.command(kind, help=help_text, short_help=title)(command)


def _finetune_commands() -> None:
    """One `vdm finetune KIND` per finetune kind (model/tasks), its help and its own options from the kind."""
    from model.tasks import FINETUNES

    for kind, task in FINETUNES.items():
        options = [
            click.option(
                f"--{name.replace('_', '-')}",
                name,
                type=click.Choice(task.option_choices(name)) if task.option_choices(name) else str,
                required=True,
                help=help_text,
            )
            for name, help_text in task.run_options.items()
        ]
        _finetune_command(kind, task.title, task.description, *options)


_finetune_commands()


@main.command("personalize")
@click.option("--images", required=True, help="Folder or s3:// prefix of 3 to 8 images of one subject.")
@click.option("--token", default=None, help="Required: the subject's rare identifier word, e.g. sks ('a sks disc').")
@click.option("--class-noun", default=None, help="Required: what the subject is, e.g. disc (prior: 'a disc').")
@click.option("--image-model", required=True, help="The Stage I model: models:/NAME@ALIAS, s3:// or a folder.")
@click.option(
    "--video-model", required=True, help="The trained text-to-video model whose temporal layers animate the subject."
)
@click.option("--output", required=True, help="s3:// prefix for the DreamBooth image model and the final folder.")
@click.option("--max-steps", type=click.IntRange(min=0), default=200, show_default=True, help="DreamBooth steps.")
@click.option(
    "--prior-loss-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Weight of the class images' loss (prior preservation; 0: none).",
)
@click.option(
    "--class-images", type=click.IntRange(min=0), default=8, show_default=True, help="Class images the base generates."
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=5e-4,
    show_default=True,
    help="DreamBooth's learning rate: lower keeps the image model nearer the one the temporal layers were trained on.",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(min=1),
    default=None,
    help="Train LoRA modules of this rank in the attention projections (merged afterwards) instead of every weight: "
    "the image model moves less from the one the temporal layers were trained on.",
)
@click.option(
    "--realign-data",
    default=None,
    help="Video shards (s3:// or a folder; e.g. the video model's training data) to realign on: see --realign-steps.",
)
@click.option(
    "--realign-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="After the transfer, train the temporal layers this many steps on --realign-data with the subject's "
    "images among the clips as stills, the DreamBooth spatial layers frozen: they learn to move what those draw "
    "(0: the temporal layers as the video model trained them).",
)
@click.option(
    "--realign-stills",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Still clips of each subject image among the realignment data (more: the subject moves less).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Of the class images, DreamBooth and the realignment."
)
@click.option(
    "--register-as",
    default="vdm-personalized",
    show_default=True,
    help="MLflow model to add the result to as a new version, alias `candidate`.",
)
def personalize_command(
    images, token, class_noun, image_model, video_model, output, max_steps, prior_loss_weight, class_images,
    learning_rate, lora_rank, realign_data, realign_steps, realign_stills, seed, register_as,
) -> None:  # fmt: skip
    """Personalized text-to-video (Video LDM): DreamBooth on the Stage I model with a few images of one
    subject called "a TOKEN CLASS-NOUN" (prior preservation on images the base generates for "a CLASS-NOUN"),
    then the video model's temporal layers on the finetuned image model; registered and served as text-to-video."""
    from components.common.objectstore import ObjectStore, ObjectStoreError
    from components.training.personalize import PersonalizationRequest, run_personalization

    if not output.startswith("s3://"):
        _fail(f"--output must be an s3://bucket/prefix, not {output!r}")
    try:
        request = PersonalizationRequest(
            images=images, token=token or "", class_noun=class_noun or "", image_model=image_model,
            video_model=video_model, output=output, register_as=register_as, max_steps=max_steps,
            prior_loss_weight=prior_loss_weight, class_images=class_images, lr=learning_rate, lora_rank=lora_rank,
            realign_data=realign_data, realign_steps=realign_steps, realign_stills=realign_stills, seed=seed,
        )  # fmt: skip
        request.config()  # the token and class noun, before anything is read
    except ValueError as e:
        _fail(str(e))
    _check_output(output)
    settings = load_settings()
    try:
        result = run_personalization(request, ObjectStore.from_settings(settings), settings)
    except (ObjectStoreError, ValueError) as e:
        _fail(str(e))
    click.echo("\n".join(result.lines("personalize")))
    click.echo(f"  prompt      {request.config().subject_prompt}")


@main.group()
def registry() -> None:
    """The MLflow model registry: versions, the promotion gate, rollback."""


def _registry_call(fn, name: str, *args, **kwargs):
    """`fn(name, ...)` on the registry; its expected failures (unknown model or alias, nothing to
    roll back to, unreachable server, an invalid gate policy) as one line."""
    from components.common.tracking import connect
    from components.registry.policy import PolicyError
    from components.registry.promotion import RegistryError, registry_call

    connect()
    try:
        return registry_call(fn, name, *args, **kwargs)
    except (RegistryError, PolicyError) as e:
        _fail(str(e))


@registry.command("list")
@click.argument("name")
def registry_list(name: str) -> None:
    """Versions of a registered model, newest first, with aliases and evaluation figures; its gate policy's version."""
    from components.registry.policy import policy_record
    from components.registry.promotion import list_versions

    rows = _registry_call(list_versions, name)
    record = _registry_call(policy_record, name)
    if record is None:
        click.echo(f"{name}: no gate policy yet (the first promotion stores its kind's default)")
    else:
        click.echo(f"{name}: gate policy v{record.version}, set by {record.by} at {record.at} "
                   f"(`vdm registry policy show {name}`)")  # fmt: skip
    for row in rows:
        figures = "  ".join(f"{k}={v:.4g}" for k, v in sorted(row["eval"].items()))
        click.echo(f"v{row['version']:<4} {','.join(row['aliases']) or '-':<20} {row['created']}  {figures}")


@registry.command("promote")
@click.argument("name")
@click.option("--force", is_flag=True, help="Move champion whatever the gate says (an override; needs --reason).")
@click.option("--reason", default=None, help="Why the override: recorded with who did it and what the gate said.")
def registry_promote(name: str, force: bool, reason: str | None) -> None:
    """Move `champion` to the `candidate` if it passes the model's gate policy (`vdm registry policy show NAME`; a
    model without one gets its kind's default); exit 1 (moving no alias) if not. Prints every check; the
    candidate's tag vdm.decision and its description record the decision."""
    from components.registry.decision import decision_lines
    from components.registry.promotion import promote

    if force and not (reason or "").strip():
        _fail("--force needs --reason TEXT: why the gate is overridden (it is recorded with who did it)")
    if reason is not None and not force:
        _fail("--reason goes with --force (a promotion the gate decides records the gate's reason)")
    decision = _registry_call(promote, name, force_reason=reason if force else None)
    for line in decision_lines(decision) if decision.checks else ():
        click.echo(line)
    if not decision.promoted:
        _fail(f"not promoted: {decision.reason}")
    click.echo(f"promoted {name} v{decision.candidate} to champion: {decision.reason}")


@registry.command("rollback")
@click.argument("name")
def registry_rollback(name: str) -> None:
    """Give `champion` back to the version that held it before, also when it was moved by hand in the MLflow UI."""
    from components.registry.promotion import rollback

    demoted, restored = _registry_call(rollback, name)
    click.echo(f"{name}: champion back to v{restored} (was v{demoted})")


@registry.group("policy")
def registry_policy() -> None:
    """A registered model's gate policy (YAML): the primary figure and its margin, guards, evaluation size."""


@registry_policy.command("show")
@click.argument("name")
def registry_policy_show(name: str) -> None:
    """The model's current gate policy (YAML), its version, who set it and when, and the versions before it."""
    from components.registry.policy import policy_history

    history = _registry_call(policy_history, name)
    if not history:
        click.echo(f"{name} has no gate policy yet: the first promotion stores its candidate's kind's default "
                   f"(`vdm registry policy set {name} FILE` sets one)")  # fmt: skip
        return
    current = history[-1]
    note = f" ({current.note})" if current.note else ""
    click.echo(f"# {name} gate policy v{current.version}, set by {current.by} at {current.at}{note}")
    click.echo(current.text.rstrip())
    for past in reversed(history[:-1]):
        click.echo(f"# v{past.version}: set by {past.by} at {past.at}" + (f" ({past.note})" if past.note else ""))


@registry_policy.command("set")
@click.argument("name")
@click.argument("file")
def registry_policy_set(name: str, file: str) -> None:
    """Validate the YAML gate policy in FILE and store it as the model's next policy version (earlier ones are kept)."""
    from pathlib import Path

    from components.registry.policy import PolicyError, parse_policy, set_policy

    try:
        text = Path(file).read_text()
    except OSError as e:
        _fail(f"cannot read the policy file {file}: {e.strerror}")
    try:
        parse_policy(text)
    except PolicyError as e:
        _fail(f"{file}: {e}")
    record = _registry_call(set_policy, name, text)
    click.echo(f"{name}: gate policy v{record.version} set by {record.by}")


@main.group()
def weights() -> None:
    """Named weights, imported once into the object store; configs and commands take weights:NAME."""


@weights.command("import")
@click.argument("name")
@click.argument("path")
@click.option("--kind", default=None, help="diffusers, open_clip, aesthetic_mlp or i3d (default: detected).")
@click.option("--architecture", default=None, help="open_clip: the model name (ViT-H-14, coca_ViT-L-14, ...).")
@click.option("--source", default="", help="Where the weights come from (a URL, a model id).")
@click.option("--licence", default="", help="Their licence.")
@click.option("--replace", is_flag=True, help="Overwrite an existing entry of that name.")
def weights_import(name, path, kind, architecture, source, licence, replace) -> None:
    """Check the weights at PATH (a diffusers folder or a checkpoint file) key by key against
    their architecture, then publish them as weights:NAME."""
    from pathlib import Path

    from components.common.objectstore import ObjectStore
    from components.common.weights import import_weights, weights_uri

    store = ObjectStore.from_settings(load_settings())
    try:
        manifest = import_weights(
            name, path, store, kind=kind, architecture=architecture, source=source, licence=licence, replace=replace,
            progress=True,
        )  # fmt: skip
        uri = weights_uri(name)
    except ValueError as e:
        _fail(str(e))
    root = Path(path).expanduser() if manifest.kind == "diffusers" else Path(path).expanduser().parent
    size = sum((root / rel).stat().st_size for rel in manifest.files)
    click.echo(f"published weights:{name}")
    click.echo(f"  kind          {manifest.kind}")
    click.echo(f"  architecture  {manifest.architecture}")
    names = sorted(manifest.files)
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    unit = next((f, u) for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if size >= f or f == 1)
    click.echo(f"  files         {len(names)}, {size / unit[0]:.1f} {unit[1]}: {', '.join(names[:8])}{more}")
    click.echo(f"  uri           {uri}/")


@weights.command("list")
def weights_list() -> None:
    """Every imported entry: name, kind, architecture, files, when, from where."""
    from components.common.objectstore import ObjectStore
    from components.common.weights import list_weights

    try:
        entries = list_weights(ObjectStore.from_settings(load_settings()))
    except ValueError as e:
        _fail(str(e))
    if not entries:
        click.echo("no weights imported yet: vdm weights import NAME PATH")
        return
    click.echo(f"{'NAME':<24} {'KIND':<14} {'ARCHITECTURE':<36} {'FILES':>5}  {'IMPORTED':<25} SOURCE")
    for m in entries:
        imported = m.imported_at or "-"
        click.echo(
            f"{m.name:<24} {m.kind:<14} {m.architecture:<36} {len(m.files):>5}  {imported:<25} {m.source or '-'}"
        )


@main.group()
def pipeline() -> None:
    """Kubeflow pipelines: list, params, compile, submit, schedule."""


@pipeline.command("list")
def pipeline_list() -> None:
    """Each pipeline: its name, how many parameters its run form has, its description."""
    from pipelines.kubeflow import PIPELINES
    from pipelines.submit import run_form

    forms = [run_form(name) for name in PIPELINES]
    width = max(len(f.name) for f in forms)
    click.echo(f"{'NAME':<{width}}  PARAMS  DESCRIPTION")
    for form in forms:
        click.echo(f"{form.name:<{width}}  {len(form.parameters):>6}  {form.description}")


@pipeline.command("params")
@click.argument("name")
def pipeline_params(name: str) -> None:
    """NAME's run form as the Kubeflow UI shows it: each parameter's type, default and description."""
    import textwrap

    from pipelines.submit import run_form

    try:
        form = run_form(name)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"{form.name}: {form.description}\n")
    for p in form.parameters:
        shown = p.default if isinstance(p.default, str) and p.default else json.dumps(p.default)  # "": empty
        default = "no default" if p.default is None else f"default {shown}"
        click.echo(f"{p.name}  {p.type}  {default}")
        click.echo(textwrap.fill(p.description, 100, initial_indent="    ", subsequent_indent="    "))


@pipeline.command("compile")
@click.option("--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the YAML files.")
def pipeline_compile(out_dir: str) -> None:
    """Write every pipeline's YAML (upload them in the Kubeflow UI, or use `submit`)."""
    from pathlib import Path

    from pipelines.submit import compile_all

    for path in compile_all(Path(out_dir)):
        click.echo(str(path))


def _kfp_client(host: str):
    from pipelines.submit import connect

    return connect(host)


@pipeline.command("submit")
@click.argument("name")
@click.option("--host", required=True, help="The KFP API, e.g. http://ml-pipeline-ui.kubeflow:80")
@click.option("--experiment", default="vdm", show_default=True)
@click.option("--param", "params", multiple=True, help="KEY=VALUE pipeline parameter (repeatable).")
def pipeline_submit(name: str, host: str, experiment: str, params: tuple[str, ...]) -> None:
    """Upload NAME (a new version if it exists) and start a run."""
    from pipelines.submit import parse_params, submit

    try:
        given = parse_params(params, name)
        result = submit(_kfp_client(host), name, experiment, given)
    except ValueError as e:
        _fail(str(e))
    click.echo(json.dumps(result, indent=1))


@pipeline.command("schedule")
@click.argument("name")
@click.option("--host", required=True, help="The KFP API, e.g. http://ml-pipeline-ui.kubeflow:80")
@click.option("--experiment", default="vdm", show_default=True)
@click.option("--cron", required=True, help="Six-field cron (seconds first), e.g. '0 0 3 * * *'.")
@click.option("--param", "params", multiple=True, help="KEY=VALUE pipeline parameter (repeatable).")
def pipeline_schedule(name: str, host: str, experiment: str, cron: str, params: tuple[str, ...]) -> None:
    """Upload NAME and create a recurring run."""
    from pipelines.submit import parse_params, schedule

    try:
        given = parse_params(params, name)
        result = schedule(_kfp_client(host), name, experiment, cron, given)
    except ValueError as e:
        _fail(str(e))
    click.echo(json.dumps(result, indent=1))


@main.command("serve")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="NAME, NAME@ALIAS or models:/NAME@ALIAS (repeatable: any number of models of any kind, each at its own "
    "alias). Default: the comma-separated list in VDM_SERVE_MODELS (the cluster's ConfigMap vdm-serving-models).",
)
@click.option("--alias", default="champion", show_default=True, help="Alias served for plain NAMEs.")
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 only in a pod).")
@click.option("--poll-seconds", default=30.0, show_default=True, help="How often the alias is checked (0: never).")
@click.option("--max-concurrency", default=2, show_default=True, help="Generations at once; more get HTTP 429.")
def serve_command(models, alias, port, host, poll_seconds, max_concurrency) -> None:
    """Serve registered models with BentoML (`bentoml serve serving.service:VideoGeneration`);
    API docs at /docs. Each port keeps its own BentoML state in $VDM_HOME/serving/PORT.
    Callers need an API key: unless VDM_SERVE_API_KEYS_FILE / VDM_SERVE_ADMIN_KEYS_FILE (or
    VDM_SERVE_ALLOW_ANONYMOUS=true) are set, keys are made once into $VDM_HOME/serving/api-keys
    and admin-keys (0600) and reused. BentoML dies with this command, even when it is killed."""
    import ctypes
    import os
    import signal
    import socket
    import subprocess

    from serving.auth import ApiKeys, NoKeys, local_key_files
    from serving.config import ServeSettings, model_specs

    listed = tuple(m.strip() for m in os.environ.get("VDM_SERVE_MODELS", "").split(",") if m.strip())
    if not (models or listed):
        _fail("no model to serve: give --model NAME (repeatable) or set VDM_SERVE_MODELS")
    try:
        specs = model_specs(models or listed, alias)
    except ValueError as e:
        _fail(str(e))
    # BentoML would say it serves and only then fail to bind; and the port names the state folder.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            _fail(f"cannot listen on {host}:{port} ({e.strerror}): another server has it; choose another --port")
    stack = _stack()
    try:
        given = ServeSettings()
    except ValueError as e:
        _fail(f"VDM_SERVE_* settings: {e}")
    keys: dict[str, str] = {}
    if given.api_keys_file is None and given.admin_keys_file is None and not given.allow_anonymous:
        api_keys, admin_keys = local_key_files(load_settings().home / "serving")
        keys = {"VDM_SERVE_API_KEYS_FILE": str(api_keys), "VDM_SERVE_ADMIN_KEYS_FILE": str(admin_keys)}
    else:  # the files given: readable, with a key
        try:
            ApiKeys(given)
        except (OSError, NoKeys) as e:
            _fail(f"API keys: {e}")
    env = (
        os.environ
        | keys
        | {
            "VDM_HOME": str(load_settings().home),
            # Its own BentoML home: each BentoML start clears its home's task database and metrics folder.
            "BENTOML_HOME": str(stack.serving_dir(port) / "bentoml"),
            "VDM_SERVE_MODELS": ",".join(f"{spec.name}@{spec.alias}" for spec in specs),
            "VDM_SERVE_ALIAS": alias,
            "VDM_SERVE_POLL_SECONDS": str(poll_seconds),
            "VDM_SERVE_MAX_CONCURRENCY": str(max_concurrency),
        }
    )
    from model.tasks import ENDPOINTS

    url = f"http://{host}:{port}"
    click.echo(f"serving {', '.join(map(str, specs))} at {url}", err=True)
    endpoints = "  ".join(f"{url}/{name}" for name in [*ENDPOINTS, "model_info"])
    click.echo(f"  POST {endpoints};  GET {url}/readyz;  API docs {url}/docs", err=True)
    if keys:
        click.echo(
            f"  API key in {keys['VDM_SERVE_API_KEYS_FILE']}, admin key in {keys['VDM_SERVE_ADMIN_KEYS_FILE']}: "
            "send `Authorization: Bearer <key>`",
            err=True,
        )
    # The local stack's Prometheus scrapes every target file in this folder.
    target = stack.prometheus_targets_dir / f"serving-{port}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([{"targets": [f"{host}:{port}"], "labels": {"part": "serving"}}]))
    bentoml = [sys.executable, "-m", "bentoml", "serve", "serving.service:VideoGeneration"]
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, before exec: SIGTERM when this process dies, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)

    # Same process group (no new session): a terminal's Ctrl-C reaches BentoML too.
    server = subprocess.Popen([*bentoml, "--host", host, "--port", str(port)], env=env, preexec_fn=die_with_parent)
    # Ctrl-C reaches the server from the terminal; a SIGTERM (a supervisor, a test) is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _frame: server.send_signal(signum))
    try:
        code = server.wait()
    finally:
        target.unlink(missing_ok=True)
    sys.exit(code)


@main.command("run")
@click.option("--input", "input_uri", default=None, help="Videos (s3:// prefix); default: the built-in sample videos.")
@click.option("--output", "work_uri", default=None, help="s3:// prefix for this run's outputs.")
@click.option("--model-name", default="vdm-text-to-video", show_default=True)
@click.option("--i2v-model-name", default="vdm-image-to-video", show_default=True)
@click.option("--param", "params", multiple=True, help="KEY=VALUE end-to-end pipeline parameter (repeatable).")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.option("--seed", default=0, show_default=True, help="Sample videos' seed (without --input).")
def run_command(input_uri, work_uri, model_name, i2v_model_name, params, summary_json, seed) -> None:
    """The main job: the end-to-end pipeline through kfp.local against the local stack, tiny configs."""
    import time
    from pathlib import Path

    from components.common.objectstore import ObjectStore
    from components.sample_data.synth import MANIFEST_NAME, SynthConfig, synthesize
    from pipelines.local_run import run_end_to_end
    from pipelines.submit import parse_params
    from vdm.stack import StackError

    try:
        _stack().up()
    except StackError as e:
        _fail(str(e))
    settings = load_settings()
    if input_uri is None:
        input_uri = f"s3://{settings.data_bucket}/samples/seed-{seed}"
        store = ObjectStore.from_settings(settings)
        if not store.exists(f"{input_uri}/{MANIFEST_NAME}"):
            synthesize(input_uri, SynthConfig(seed=seed), store=store)
    work_uri = work_uri or f"s3://{settings.data_bucket}/runs/end-to-end-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        given = parse_params(params, "end-to-end")
    except ValueError as e:
        _fail(str(e))
    summary = run_end_to_end(
        settings, input_uri, work_uri, model_name=model_name, i2v_model_name=i2v_model_name,
        params=given,
        progress=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    click.echo("\nvdm run: done")
    for key, value in summary.items():
        click.echo(f"  {key:<18} {json.dumps(value) if isinstance(value, dict) else value}")
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=1))


@main.command("plan")
@click.option("--config", "config_name", default="tiny", show_default=True, help="A shipped size or a local YAML file.")
@click.option("--stage", required=True, help="The kind of model: image, video, hq or a finetune kind.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs per node.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--gpu-memory-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=80.0,
    show_default=True,
    help="Memory of one GPU in GiB (80 for an 80 GB A100 or H100).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch per GPU (default: the config's).")
def plan_command(config_name, stage, gpus, nodes, gpu_memory_gb, batch_size) -> None:
    """Know before you launch: the memory per GPU of a training run (parameters, weights,
    gradients, AdamW, EMA, activations) from its config alone, at full size on the meta
    device (nothing allocated or downloaded), and which settings fit the GPU."""
    import yaml

    from model.plan import GIB, plan, settings_that_fit, table
    from model.stages import named_config
    from model.tasks import task_of

    world = gpus * nodes
    memory = int(gpu_memory_gb * GIB)
    try:
        if task_of(stage).trains != "unet":
            raise ValueError(f"the {stage} kind trains the VAE's decoder in its own loop: vdm plan plans UNet training")
        config = named_config(config_name, stage)
        if batch_size is not None:
            config = config.with_fields(batch_size=batch_size)
        memory_plan = plan(config, world)
        rows = settings_that_fit(config, world, memory)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        _fail(str(e))
    where = f"{world} GPU{'s' if world > 1 else ''} ({nodes} x {gpus} per node), {gpu_memory_gb:g} GiB each"
    click.echo(f"vdm plan: {config_name} {stage} on {where}")
    click.echo("\n".join(memory_plan.lines()))
    click.echo("")
    click.echo("\n".join(table(rows, memory)))
    verdict = "fits" if memory_plan.fits(memory) else "does NOT fit"
    click.echo(
        f"\nthe config's setting needs {memory_plan.total / GIB:.1f} GiB of {gpu_memory_gb:g} GiB per GPU: {verdict}"
    )


if __name__ == "__main__":
    main()
