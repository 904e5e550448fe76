"""`vdm serve --model` specs, the service's limits from the environment, the model set's errors."""

from __future__ import annotations

import pytest

from serving.config import ServeSettings, model_names
from serving.models import LiveModels, UnknownKind


def test_specs_name_models_and_one_alias():
    assert model_names(("models:/t2v@champion", "i2v"), "champion") == (("t2v", "i2v"), "champion")
    assert model_names(("t2v",), "staging") == (("t2v",), "staging")
    with pytest.raises(ValueError, match="one alias per service"):
        model_names(("models:/t2v@champion", "models:/i2v@candidate"), "champion")
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS"):
        model_names(("models:/t2v",), "champion")


def test_settings_read_a_comma_separated_model_list_and_validate_limits(monkeypatch):
    monkeypatch.setenv("VDM_SERVE_MODELS", "t2v, i2v")
    monkeypatch.setenv("VDM_SERVE_MAX_FRAMES", "14")
    settings = ServeSettings()
    assert (settings.models, settings.max_frames, settings.alias) == (("t2v", "i2v"), 14, "champion")
    monkeypatch.setenv("VDM_SERVE_MAX_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="max_concurrency"):
        ServeSettings()


def test_live_models_need_a_name_and_say_what_kind_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no model to serve"):
        LiveModels((), "champion", tmp_path)
    with pytest.raises(UnknownKind, match=r"no image-to-video model is served here \(loaded: none yet\)"):
        LiveModels(("t2v",), "champion", tmp_path).get("image")
