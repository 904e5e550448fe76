"""`vdm serve --model` specs, the service's limits from the environment, the model set's
lookups and errors, and the endpoints' request schemas against the kinds they serve."""

from __future__ import annotations

from dataclasses import MISSING, fields
from types import SimpleNamespace

import pytest

from model.tasks import ENDPOINTS, KINDS
from serving.config import ModelSpec, ServeSettings, model_specs
from serving.models import LiveModels, ServedModel, UnknownKind, WrongModel


def test_specs_name_models_each_with_its_own_alias():
    specs = model_specs(("models:/t2v@champion", "i2v", "interp@staging"), "candidate")
    assert specs == (ModelSpec("t2v", "champion"), ModelSpec("i2v", "candidate"), ModelSpec("interp", "staging"))
    assert [str(s) for s in specs] == ["models:/t2v@champion", "models:/i2v@candidate", "models:/interp@staging"]
    for bad in ("models:/t2v", "models:/t2v/3", "t2v@", "@champion", ""):
        with pytest.raises(ValueError, match="expected NAME, NAME@ALIAS or models:/NAME@ALIAS"):
            model_specs((bad,), "champion")
    with pytest.raises(ValueError, match="t2v is listed twice"):
        model_specs(("models:/t2v@champion", "t2v@candidate"), "champion")


def test_settings_read_a_comma_separated_model_list_and_validate_limits(monkeypatch):
    monkeypatch.setenv("VDM_SERVE_MODELS", "t2v, models:/i2v@staging,mv@champion")
    monkeypatch.setenv("VDM_SERVE_ALIAS", "candidate")
    monkeypatch.setenv("VDM_SERVE_MAX_FRAMES", "14")
    settings = ServeSettings()
    assert settings.specs() == (ModelSpec("t2v", "candidate"), ModelSpec("i2v", "staging"), ModelSpec("mv", "champion"))
    assert (settings.max_frames, settings.max_video_bytes, settings.gpus) == (14, 50 * 2**20, None)
    monkeypatch.setenv("VDM_SERVE_GPUS", "0")  # declare no GPU even where torch sees one
    assert ServeSettings().gpus == 0
    monkeypatch.setenv("VDM_SERVE_MAX_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="max_concurrency"):
        ServeSettings()


def _served(name: str, kind: str) -> ServedModel:
    return ServedModel(name, "1", "champion", None, {}, SimpleNamespace(task=KINDS[kind]))


def test_each_endpoint_defaults_to_its_first_configured_model_and_a_named_one_must_serve_it(tmp_path):
    with pytest.raises(ValueError, match="no model to serve"):
        LiveModels((), tmp_path)
    specs = model_specs(("t2v", "lora", "interp", "stage1"), "champion")
    models = LiveModels(specs, tmp_path)
    with pytest.raises(UnknownKind, match=r"no model for the interpolate endpoint is served here \(loaded: none yet\)"):
        models.get("interpolate")
    models._by_name = {
        "interp": _served("interp", "interpolation"),
        "lora": _served("lora", "camera-lora"),
        "t2v": _served("t2v", "video"),
        "stage1": _served("stage1", "image"),
    }
    assert [m.name for m in models.all()] == ["t2v", "lora", "interp", "stage1"]  # configured order
    assert models.get("text_to_video").name == "t2v"
    assert models.get("text_to_video", "lora").name == "lora"
    assert models.get("interpolate").name == "interp"
    with pytest.raises(UnknownKind, match="no model for the multiview endpoint"):
        models.get("multiview")
    with pytest.raises(WrongModel, match=r"model: 'nope' is not served here"):
        models.get("text_to_video", "nope")
    with pytest.raises(WrongModel, match="model: interp is a 'interpolation' model, served by the interpolate"):
        models.get("text_to_video", "interp")
    with pytest.raises(WrongModel, match="model: stage1 is a 'image' model, served by no endpoint"):
        models.get("text_to_video", "stage1")
    assert models.ready


def test_every_endpoint_has_a_request_schema_that_fills_its_kinds_inputs():
    """Each kind that is served (task.endpoint) gets its `Inputs` and generation fields
    from its endpoint's request: media from an upload field of the medium's name, the
    rest from a request field of the same name (or the schema's `renames`)."""
    from serving.service import DECODERS, REQUESTS

    assert set(REQUESTS) == set(ENDPOINTS)
    for task in KINDS.values():
        if task.endpoint is None:
            continue
        request = REQUESTS[task.endpoint]
        assert request.endpoint == task.endpoint
        for f in fields(task.Inputs):
            medium = f.metadata.get("media")
            source = medium or request.renames.get(f.name, f.name)
            required = f.default is MISSING and f.default_factory is MISSING
            assert source in request.model_fields or not required, (task.name, f.name)
            if medium:
                assert medium in DECODERS and medium in request.model_fields, (task.name, f.name)
        for name in task.generation_fields:
            assert name in request.model_fields, (task.name, name)
