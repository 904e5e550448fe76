"""The process every training rank runs: `python -m components.training.entrypoint REQUEST`
(REQUEST: a `TrainingRequest` as JSON), what TorchX launches, and what `vdm train` and
`vdm finetune` call in-process. The request's kind decides the loop (model/tasks): a
pretraining stage or a UNet finetune trains with `run_training`, the temporal decoder
with its own VAE loop. A finetune starts from a trained model (`init_from`)."""

from __future__ import annotations

import sys

from components.common.objectstore import ObjectStore, ObjectStoreError
from components.common.settings import Settings, load_settings
from components.training.request import RunResult, TrainingRequest
from model.tasks import task_of


def command_of(request: TrainingRequest) -> str:
    """The `vdm` command that trains this request's kind."""
    return f"{'finetune' if task_of(request.kind).finetune else 'train'} {request.kind}"


def run_request(request: TrainingRequest, store: ObjectStore, settings: Settings, progress: bool = True) -> RunResult:
    task = task_of(request.kind)
    if task.finetune and not request.init_from:
        raise ValueError(f"a {task.name} finetune starts from a trained model: give --init-from")
    common = {
        "overrides": request.overrides,
        "resume": request.resume,
        "register_as": request.register_as,
        "progress": progress,
        "run_id": request.run_id,
        "resume_from": request.resume_from,
        "result_uri": request.result_uri,
    }
    if task.trains == "vae":  # the temporal decoder trains the VAE decoder, not the UNet: its own loop
        from components.training.temporal_decoder import run_temporal_decoder_finetune

        return run_temporal_decoder_finetune(
            request.config, request.data, request.output, request.init_from, store, settings, **common
        )
    from components.training.run import run_training

    return run_training(
        task.name,
        request.config,
        request.data,
        request.output,
        store,
        settings,
        init_from=request.init_from,
        vae=request.vae,
        experiment=f"vdm-finetune-{task.name}" if task.finetune else None,
        **common,
    )


def main(argv: list[str] | None = None) -> None:
    """One rank's run; an expected failure (bad data, a config that does not fit) ends in one
    `error: ...` line that the launcher reports, not a traceback."""
    (text,) = sys.argv[1:] if argv is None else argv
    request = TrainingRequest.from_json(text)
    settings = load_settings()
    try:
        result = run_request(request, ObjectStore.from_settings(settings), settings)
    except (ObjectStoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result.final is not None:  # rank 0 reports
        print("\n".join(result.lines(command_of(request))), flush=True)


if __name__ == "__main__":
    main()
