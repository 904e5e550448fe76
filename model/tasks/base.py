"""What every kind of model shares, and the hooks where kinds differ.

A `Task` is one kind of model: Stage I text-to-image, text-to-video (Stages II/III),
image-to-video, and each finetune. Everything that differs between kinds lives on
its task, never in a branch on the kind's name elsewhere:

- `Options`: the config fields beyond the shared ones (a frozen dataclass; YAML keeps
  them flat beside the shared fields, `StageConfig.options` holds them typed);
- `check(config)`: what a config of this kind must satisfy;
- `prepare_unet(unet, config, init_from)`: the UNet it trains (widened input, adapters);
- `network(unet, codec)`: how the network's inputs are built from the denoiser's;
- `training_inputs(model, batch, latents, generator)`: the training conditioning;
- `dataset(config, shards, **split)`: what its data loader reads;
- `Inputs` and `sample(model, inputs, config, on_step)`: its sampling entry point
  (`generate`, `animate`, `interpolate`, `predict`, `orbit`) on typed inputs;
- `endpoint`: the served API that calls `sample`;
- `metric`: the figure its promotion gate compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, Literal

from model.config_fields import typed_fields

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from model.stages import StageConfig, VideoDiffusion

Conditioning = Literal["text", "image"]


@dataclass(frozen=True)
class NoOptions:
    """A kind without config fields of its own."""


@dataclass(frozen=True)
class Evaluation:
    """What evaluating a model gives: the figures the gate and the UI read (`metrics`, the
    kind's `metric` among them), details for the report, and sample videos to look at.
    `references` and `prompts`, where a kind has them, pair each sample with the held-out
    clip it stands for and the text it was generated from (or the clip's caption): the
    evaluation step measures the distribution distance (FVD) and the text alignment with them."""

    metrics: dict[str, float]
    details: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # (T, 3, H, W) frames in [-1, 1]
    references: list = field(default_factory=list)  # held-out clips, (T, 3, H, W) in [-1, 1]; [] if none
    prompts: list[str] = field(default_factory=list)  # one per sample; [] if the kind has none


@dataclass(frozen=True)
class Metric:
    """The evaluation figure a kind's promotion gate compares (`vdm.eval.<name>` on a version)."""

    name: str
    direction: Literal["minimize", "maximize"]
    description: str


MOTION_SPEED_ERROR = Metric(
    "motion_speed_error",
    "minimize",
    "relative error of the generated object's speed against the data's (0 is right)",
)


class Task:
    """One kind of model. Subclasses override the hooks where their kind differs."""

    name: ClassVar[str]  # the kind: a config's `stage`, `vdm finetune NAME`, `finetune-NAME`
    title: ClassVar[str]  # one line: what it makes
    description: ClassVar[str]  # a paragraph: how, and what it starts from (CLI help, pipeline)
    finetune: ClassVar[bool] = True  # `vdm finetune NAME` (else a pretraining stage of `vdm train`)
    conditioning: ClassVar[Conditioning] = "text"  # what a video is generated from
    video: ClassVar[bool] = True  # a video model (Stage I is an image model)
    trains: ClassVar[Literal["unet", "vae"]] = "unet"  # the temporal decoder trains the VAE's decoder
    Options: ClassVar[type] = NoOptions
    # Command-line options of `vdm finetune NAME` beyond the shared ones: Options fields
    # given per run (name -> help); their choices come from `option_choices`.
    run_options: ClassVar[dict[str, str]] = {}
    endpoint: ClassVar[str | None] = None  # the served API (serving/service.py)
    # Training samples come from the first batch's clips (`inputs_of`), not the sample prompts.
    samples_from_data: ClassVar[bool] = False
    # GenerationConfig fields a caller may set for this kind beyond the shared ones.
    generation_fields: ClassVar[tuple[str, ...]] = ()
    metric: ClassVar[Metric] = MOTION_SPEED_ERROR
    # A figure the gate also checks: not worse than the champion's by more than the tolerance.
    guard: ClassVar[Metric | None] = None
    guard_tolerance: ClassVar[float] = 0.0
    registered_name: ClassVar[str]  # the registered model a finetune pipeline adds to
    # What a finetune pipeline's run form offers by default: the registered model it starts
    # from, its training data, the held-out data it is evaluated on, and whether the
    # evaluation also compares with the training data (`reference`).
    starts_from: ClassVar[str] = "vdm-text-to-video"
    training_data: ClassVar[str] = "s3://vdm/curated/kfp/shards/"
    evaluation_data: ClassVar[str] = "s3://vdm/curated/kfp/heldout/"
    training_data_is_reference: ClassVar[bool] = False
    # The registered model whose videos a finetune pipeline also passes through the candidate
    # (the upsampler's cascade); None: no such step.
    cascade_base: ClassVar[str | None] = None

    def option_choices(self, option: str) -> list[str] | None:
        """The allowed values of a run option (None: any)."""
        return None

    def options(self, raw: dict) -> object:
        """This kind's options from the flat config fields that are not shared ones."""
        known = {f.name for f in fields(self.Options)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not config fields of a {self.name!r} model")
        return self.Options(**typed_fields(self.Options, raw))

    # -- training -----------------------------------------------------------------------

    def check(self, config: StageConfig) -> None:
        """Raise ValueError naming what a config of this kind gets wrong."""
        if config.data == "images" and config.strategy != "spatial" and self.video:
            raise ValueError("image data trains Stage I or the spatial layers only (strategy: spatial)")
        if config.data == "orbits":
            raise ValueError("orbit data trains the multi-view finetune only (stage: multiview)")
        if config.strategy == "lora":
            raise ValueError("strategy lora trains camera-motion adapters only (stage: camera-lora)")

    def prepare_unet(self, unet: torch.nn.Module, config: StageConfig, init_from: Path | None) -> torch.nn.Module:
        """The UNet this kind trains, from the one it starts from."""
        return unet

    def input_channels(self, latent_channels: int) -> int:
        return latent_channels

    def network_frame_size(self, config: StageConfig) -> tuple[int, int]:
        """(height, width) in pixels of the frames the network trains on: the clip's."""
        return config.clip.height, config.clip.width

    def network(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The denoiser's network: the UNet behind the inputs this kind gives it."""
        from model.networks import VideoNetwork

        return VideoNetwork(unet)

    def condition(self, model: VideoDiffusion, batch: dict, generator: torch.Generator) -> dict:
        """The network's conditioning of a training batch (text and micro-conditioning)."""
        return model.text_condition(batch, generator)

    def training_inputs(
        self, model: VideoDiffusion, batch: dict, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """(latents, network conditioning) the denoising loss trains on."""
        return latents, self.condition(model, batch, generator)

    def dataset(self, config: StageConfig, shards: list[str], **split):
        from model.data import ClipDataset, ImageDataset
        from model.latents import LatentDataset

        if config.data == "images":
            return ImageDataset(shards, config.clip.height, config.clip.width, **split)
        if config.data == "latents":
            return LatentDataset(shards, config.clip, **split)
        return ClipDataset(shards, config.clip, **split)

    def adapter(self, config: StageConfig) -> str | None:
        """The LoRA adapter a config trains (None: the model's own weights)."""
        return None

    # -- sampling -----------------------------------------------------------------------

    @dataclass(frozen=True)
    class Inputs:
        """What one video is generated from. Tensor fields say in their metadata which
        medium carries them (`media`: an image or a video file)."""

        prompt: str = ""
        negative_prompt: str = ""

    def sample(self, model: VideoDiffusion, inputs, config, on_step=None) -> torch.Tensor:
        """(T, 3, H, W) frames in [-1, 1] generated from `inputs` (this kind's `Inputs`)."""
        from model.pipeline import generate

        return generate(model, inputs.prompt, config, inputs.negative_prompt, on_step=on_step)

    def inputs_of(self, clip: dict) -> object:
        """What a video like a data clip (a loader item) is generated from, for evaluations
        that compare generated videos with data: text kinds the empty prompt (the data's
        motion, not a caption's), image kinds the clip's first frame."""
        return self.Inputs()

    def training_samples(self, config: StageConfig, first_batch: dict) -> list:
        """The `Inputs` training samples with: the config's sample prompts, or (kinds that
        generate from frames) what each clip of the first batch gives (`inputs_of`)."""
        if not self.samples_from_data:
            return [self.Inputs(prompt=prompt) for prompt in config.sample_prompts]
        items = [{k: v[i] for k, v in first_batch.items()} for i in range(len(first_batch["video"]))]
        return [self.inputs_of(item) for item in items]

    def generation_defaults(self, config: StageConfig) -> dict:
        """GenerationConfig fields a model of this config samples with unless told otherwise."""
        return {"adapter": self.adapter(config)}

    # -- evaluation ---------------------------------------------------------------------

    def evaluate(
        self,
        model: VideoDiffusion,
        shards: list[str],
        *,
        clips: int,
        steps: int,
        reference: list[str] | None = None,
        prompts: list[str] | None = None,
    ) -> Evaluation:
        """The kind's figures on held-out data `shards` (`reference`: a second data set a kind
        compares with, e.g. spatial-HQ's image set; `prompts`: what text kinds generate from,
        in turn, else the empty prompt): motion of generated videos against the data's,
        unless the kind measures what it is for otherwise."""
        from model.evaluation import evaluate_motion, motion_gate_metrics

        report = evaluate_motion(model, shards, clips=clips, steps=steps, prompts=prompts)
        metrics = motion_gate_metrics(report)
        # image-to-video: how well generated frame 0 keeps the conditioning frame
        metrics |= {f"first_frame_{k}": v for k, v in report.get("first_frame", {}).items()}
        details = {"data": report["data"], "generated": report["generated"]}
        return Evaluation(metrics, details, report["samples"], report["clips"], report["prompts"])

    def evaluation_inputs(self, clip: dict, prompt: str | None) -> object:
        """What an evaluation video is generated from: `inputs_of(clip)`, with the evaluation
        `prompt` where that leaves the text empty (text kinds; None: keep it empty)."""
        from dataclasses import replace

        inputs = self.inputs_of(clip)
        if prompt is not None and getattr(inputs, "prompt", None) == "":
            inputs = replace(inputs, prompt=prompt)
        return inputs

    def __repr__(self) -> str:
        return f"<task {self.name}>"
