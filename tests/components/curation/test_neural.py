"""Neural annotators: real PP-OCRv4 weights find the burned-in caption of the sample
videos and nothing on clean ones; tiny random CLIP and CoCa keep their contracts."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from components.curation.neural import (
    ClipScorer,
    CocaCaptioner,
    NeuralConfig,
    RandomWeightsNotAllowed,
    TextDetector,
    load_plugin,
    resolve_weights,
)
from components.sample_data.synth import SynthConfig, _Catalogue

# Every 9th frame: the caption is burned into all of them, objects move between them.
FRAME_STEP = 9


@pytest.fixture(scope="module")
def videos() -> dict[str, tuple[np.ndarray, dict]]:
    catalogue = _Catalogue(SynthConfig())
    return {name: getattr(catalogue, name)() for name in ("text", "static", "objects")}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> NeuralConfig:
    cache = tmp_path_factory.mktemp("models")
    return NeuralConfig(allow_random_weights=True, tiny_models=True, batch_size=8, device="cpu", cache_dir=str(cache))


@pytest.fixture(scope="module")
def detector(tiny_config) -> TextDetector:
    return TextDetector(tiny_config)  # real weights: the offline recipe, built into the test's cache


@pytest.fixture(scope="module")
def clip(tiny_config) -> ClipScorer:
    return ClipScorer(tiny_config)


def test_text_ratio_matches_the_burned_in_caption(detector, videos):
    frames, truth = videos["text"]
    ratios = detector.text_ratios(list(frames[::FRAME_STEP]))
    assert len(ratios) == len(frames[::FRAME_STEP])
    for ratio in ratios:
        assert 0.5 * truth["text_area_ratio"] < ratio < 3 * truth["text_area_ratio"]


def test_clean_frames_have_no_text(detector, videos):
    clean = [*videos["static"][0][::FRAME_STEP], *videos["objects"][0][::FRAME_STEP]]
    assert max(detector.text_ratios(clean)) < 0.005


def test_text_ratio_keeps_order_across_frame_sizes(detector, videos):
    """Frames of several sizes in one call: each size is a batch of its own, answers come back in order."""
    text_frame, truth = videos["text"][0][0], videos["text"][1]
    doubled = cv2.resize(text_frame, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    clean = videos["static"][0][0]
    ratios = detector.text_ratios([doubled, clean, text_frame, clean, doubled])
    for index in (0, 2, 4):
        assert 0.5 * truth["text_area_ratio"] < ratios[index] < 3 * truth["text_area_ratio"]
    assert ratios[1] < 0.005 and ratios[3] < 0.005
    assert detector.text_ratios([]) == []


@pytest.mark.parametrize(
    ("annotator", "settings", "missing"),
    [
        (ClipScorer, {}, "clip_weights, aesthetic_weights"),
        (ClipScorer, {"clip_weights": "clip.pt"}, "aesthetic_weights"),
        (CocaCaptioner, {}, "coca_weights"),
    ],
)
def test_random_weights_need_the_flag(tiny_config, annotator, settings, missing):
    config = replace(tiny_config, allow_random_weights=False, **settings)
    with pytest.raises(RandomWeightsNotAllowed, match=f"no weights configured for {missing}:") as raised:
        annotator(config)
    assert "--allow-random-weights" in str(raised.value) and "vdm weights import NAME PATH" in str(raised.value)


def test_clip_embeddings_are_unit_vectors_that_tell_frames_apart(clip, videos):
    assert clip.random_weights
    objects = videos["objects"][0]
    frames = [objects[0], objects[0].copy(), videos["static"][0][0], videos["text"][0][0], objects[40]]
    embeddings = clip.embed_images(frames)
    assert embeddings.shape == (5, 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    for other in (2, 3, 4):
        assert np.abs(embeddings[0] - embeddings[other]).max() > 1e-3
    assert clip.embed_images([]).shape == (0, 64)


def test_clip_embeddings_do_not_depend_on_batching(clip, videos):
    frames = list(videos["objects"][0][::FRAME_STEP])
    one_batch = clip.embed_images(frames)
    one_by_one = np.concatenate([clip.embed_images([frame]) for frame in frames])
    np.testing.assert_allclose(one_batch, one_by_one, atol=1e-5)


def test_aesthetic_and_text_similarity(clip, videos):
    embeddings = clip.embed_images(list(videos["objects"][0][::FRAME_STEP]))
    scores = clip.aesthetic(embeddings)
    assert scores.shape == (len(embeddings),) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    texts = ["a red ball", "BREAKING NEWS 24/7", "", "two circles on a textured background"] * 2
    similarity = clip.text_similarity(embeddings, texts)
    assert similarity.shape == (len(embeddings),) and similarity.dtype == np.float32
    assert np.all((similarity >= -1) & (similarity <= 1))
    with pytest.raises(ValueError, match="8 embeddings but 1 texts"):
        clip.text_similarity(embeddings, ["one"])


def perturbed(state: dict) -> dict:
    """Other weights than the seeded random ones, so a load that silently failed shows."""
    generator = torch.Generator().manual_seed(1)
    return {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }


def saved_weights(clip: ClipScorer, folder) -> tuple[str, str]:
    """CLIP weights as a .pt state dict; the aesthetic head in LAION's layout ("layers.N.weight")
    as .safetensors."""
    torch.save(perturbed(clip._model.state_dict()), folder / "clip.pt")
    head = perturbed(clip._aesthetic.state_dict())
    save_file({f"layers.{key}": value.contiguous() for key, value in head.items()}, folder / "aesthetic.safetensors")
    return str(folder / "clip.pt"), str(folder / "aesthetic.safetensors")


def test_clip_loads_saved_weights(clip, tiny_config, tmp_path, videos):
    clip_weights, aesthetic_weights = saved_weights(clip, tmp_path)
    config = replace(
        tiny_config, allow_random_weights=False, clip_weights=clip_weights, aesthetic_weights=aesthetic_weights
    )
    loaded, again = ClipScorer(config), ClipScorer(config)
    assert not loaded.random_weights
    frames = list(videos["objects"][0][::FRAME_STEP])
    embeddings = loaded.embed_images(frames)
    np.testing.assert_allclose(embeddings, again.embed_images(frames), atol=1e-6)
    np.testing.assert_allclose(loaded.aesthetic(embeddings), again.aesthetic(embeddings), atol=1e-6)
    assert np.abs(embeddings - clip.embed_images(frames)).max() > 1e-3  # not the random model
    assert np.abs(loaded.aesthetic(embeddings) - clip.aesthetic(embeddings)).max() > 1e-4


def test_coca_captions_one_string_per_frame(tiny_config, videos):
    captioner = CocaCaptioner(replace(tiny_config, caption_max_tokens=8))
    assert captioner.random_weights
    frames = [*videos["objects"][0][::FRAME_STEP], videos["static"][0][0]]
    captions = captioner.caption(frames)
    assert len(captions) == len(frames)
    for caption in captions:
        assert isinstance(caption, str) and caption
        assert "<start_of_text>" not in caption and "<end_of_text>" not in caption
        assert len(caption.split()) <= 8
    assert captioner.caption([]) == []


def test_resolve_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_weights(str(tmp_path / "missing.pt"), tmp_path, None)
    present = tmp_path / "present.pt"
    present.write_bytes(b"weights")
    assert resolve_weights(str(present), tmp_path / "cache", None) == present
    with pytest.raises(ValueError, match="an ObjectStore is needed"):
        resolve_weights("s3://models/clip.pt", tmp_path / "cache", None)


def test_load_plugin():
    assert load_plugin(None) is None
    assert isinstance(load_plugin("collections:OrderedDict"), OrderedDict)
    with pytest.raises(ValueError, match="package.module:ClassName"):
        load_plugin("collections.OrderedDict")
