"""The built-in video captioner and caption summary: tiny random-initialised transformers models
(an image-text-to-text LLaVA and a Llama, built here from their configs with a tokenizer trained
on a few sentences; nothing downloaded) loaded from folders, from `weights:NAME` too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common.weights import import_weights
from components.curation.annotate import Annotators
from components.curation.config import CurationConfig
from components.curation.neural import NeuralConfig, TransformersSummarizer, TransformersVideoCaptioner

CORPUS = [
    "a red disc moving right over a blue background",
    "three frames of one video clip left to right in time describe the clip in one sentence",
    "captions of one video clip from a still frame and from the whole clip combining both",
    "the camera pans left zooms in or stays static",
]


def _tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 10,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        show_progress=False,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
    )
    return tokenizer


def _llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    root = tmp_path_factory.mktemp("transformers")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    vlm = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=_llama_config(len(tokenizer)),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    LlamaForCausalLM(_llama_config(len(tokenizer))).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return {"vlm": root / "vlm", "lm": root / "lm"}


@pytest.fixture(scope="module")
def config(folders, tmp_path_factory) -> NeuralConfig:
    return NeuralConfig(
        allow_random_weights=True,
        tiny_models=True,
        batch_size=4,
        device="cpu",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        caption_max_tokens=6,
        summary_max_tokens=6,
        video_captioner_weights=str(folders["vlm"]),
        summarizer_weights=str(folders["lm"]),
    )


def _clips(count: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    # Clips of different content and frame sizes (as sources of different sizes give).
    return [[rng.integers(0, 256, (36 + 8 * (i % 2), 64, 3), dtype=np.uint8) for _ in range(3)] for i in range(count)]


def test_video_captions_one_per_clip_the_same_alone_or_batched(config):
    captioner = TransformersVideoCaptioner(config)
    clips = _clips(5)
    batched = captioner.caption_clips(clips)
    assert len(batched) == 5 and all(isinstance(c, str) and c for c in batched)
    # Left-padded batches and greedy decoding: each clip's caption does not depend on its batch.
    assert [captioner.caption_clips([clip])[0] for clip in clips] == batched
    assert captioner.caption_clips(clips) == batched
    assert captioner.caption_clips([]) == []


def test_summaries_depend_on_the_captions_and_not_on_the_batch(config):
    summarizer = TransformersSummarizer(config)
    captions = [["a red disc", "the disc moves right"], ["static blue background", "nothing moves"]] * 2
    summaries = summarizer.summarize(captions)
    assert len(summaries) == 4 and all(summaries)
    assert [summarizer.summarize([c])[0] for c in captions] == summaries
    assert summaries[0] == summaries[2] and summaries[1] == summaries[3]
    # The prompt carries the captions: other captions, another summary (a random LM, but not a constant one).
    assert summaries[0] != summaries[1]


def test_annotators_give_every_clip_three_captions_from_named_weights(config, folders, store, tmp_path):
    import_weights("test-tiny-llava", folders["vlm"], store, replace=True)
    neural = replace(config, video_captioner_weights="weights:test-tiny-llava")
    annotators = Annotators(CurationConfig(neural=neural), store)
    from model.records import ClipRecord

    clips = [
        ClipRecord(
            key=f"k{i}",
            video="v.mp4",
            start_frame=0,
            end_frame=8,
            start_s=0,
            end_s=1,
            fps=8,
            num_frames=8,
            source_size=(64, 36),
            camera_motion="static",
            scores={},
        )
        for i in range(2)
    ]
    keyframes = [np.stack(frames) for frames in _clips(2)[:1] * 2]
    annotators.annotate(clips, keyframes)
    for clip in clips:
        assert set(clip.captions) == {"image", "video", "summary"}
        assert clip.caption == clip.captions["summary"]
    # The same key frames: the same captions.
    assert clips[0].captions == clips[1].captions


def test_a_plugin_and_a_model_folder_for_the_same_caption_are_refused(config):
    with pytest.raises(ValueError, match="video_captioner and neural.video_captioner_weights are both set"):
        CurationConfig(neural=config, video_captioner="collections:OrderedDict")
    assert CurationConfig(neural=config).captioners() == {
        "image": "CoCa coca_ViT-B-32 (random weights)",
        "video": config.video_captioner_weights,
        "summary": config.summarizer_weights,
    }
    assert CurationConfig().captioners() == {"image": "CoCa coca_ViT-B-32 (random weights)"}
