"""Batched neural annotators for SVD-style curation: burned-in text area (PP-OCRv4
detector, each box confirmed by the PP-OCRv4 recogniser), CLIP image embeddings
with a LAION aesthetic head and caption similarity, CoCa captions, and plug-in
points for a video captioner and an LLM caption summary (SVD's second and third
captions).

Frames are RGB uint8 HxWx3 numpy arrays. Each annotator loads its model once
and processes frames in batches of same-shaped frames. torch, open_clip and
paddleocr are imported inside the annotators: they take seconds to import, and
the curation config imports this module for `NeuralConfig` alone.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import yaml

from components.common import weights
from components.common.objectstore import ObjectStore, S3Uri, is_s3_uri
from components.common.weights import is_weights_ref
from model import openclip
from model.openclip import TINY_CLIP_MODEL, TINY_COCA_MODEL

if TYPE_CHECKING:
    import torch

OCR_MODEL_NAME = "PP-OCRv4_mobile_det"
OCR_REC_MODEL_NAME = "PP-OCRv4_mobile_rec"
_SOT_TOKEN, _EOT_TOKEN = 49406, 49407  # CLIP BPE vocabulary's start/end of text

# PaddleX reads DecodeImage/DetResizeForTest/NormalizeImage/ToCHWImage and
# DBPostProcess from this file; model_name picks PaddleX's PP-OCRv4 det defaults.
_OCR_INFERENCE_YML = {
    "Global": {"model_name": OCR_MODEL_NAME},
    "PreProcess": {
        "transform_ops": [
            # BGR: arrays pass through untouched, so callers hand over BGR (what PP-OCR was trained on).
            {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
            {"DetResizeForTest": {"resize_long": 960}},
            {
                "NormalizeImage": {
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                    "scale": "1./255.",
                    "order": "hwc",
                }
            },
            {"ToCHWImage": None},
        ]
    },
    "PostProcess": {
        "name": "DBPostProcess",
        "thresh": 0.3,
        "box_thresh": 0.6,
        "max_candidates": 1000,
        "unclip_ratio": 1.5,
    },
}
# PaddleX reads DecodeImage and RecResizeImg (height 48, batches padded to their widest crop) and
# CTCLabelDecode from this file; the character list is filled in from the weights' ONNX metadata.
_OCR_REC_INFERENCE_YML = {
    "Global": {"model_name": OCR_REC_MODEL_NAME},
    "PreProcess": {
        "transform_ops": [
            {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
            {"RecResizeImg": {"image_shape": [3, 48, 320]}},
        ]
    },
    "PostProcess": {"name": "CTCLabelDecode", "character_dict": None},
}


@dataclass(frozen=True)
class NeuralConfig:
    # Folders with inference.onnx + inference.yml of the text detector and recogniser; None builds the
    # offline PP-OCRv4 recipe into cache_dir.
    ocr_model_dir: str | None = None
    ocr_rec_model_dir: str | None = None
    ocr_input_side: int = 320  # frames are resized so the longer side is this before detection
    # A detected box counts as text only where the recogniser reads a character in it with at least this
    # mean confidence: detection alone also fires on strips of fine texture (hedges, gravel), which the
    # recogniser reads at about 0.5 or less; rendered captions, even 10 px high, read at 0.94 or more.
    text_min_confidence: float = 0.7
    # The recogniser confirms a box from its middle, at most this many times as wide as high.
    ocr_confirm_aspect: float = 8.0
    clip_model: str = "ViT-B-32"  # open_clip model name
    clip_weights: str | None = None  # weights:NAME, local path or s3:// URI of an open_clip checkpoint
    aesthetic_weights: str | None = None  # weights:NAME, local path or s3:// URI of the LAION aesthetic MLP
    captions: bool = True
    coca_model: str = "coca_ViT-B-32"
    coca_weights: str | None = None  # weights:NAME, local path or s3:// URI of an open_clip CoCa checkpoint
    caption_max_tokens: int = 20
    # SVD's second caption: any transformers image-text-to-text model folder (weights:NAME, a local folder or
    # an s3:// weights entry) shown a clip's key frames (first, middle, last) side by side, in order.
    video_captioner_weights: str | None = None
    video_caption_prompt: str = (
        "These are three frames of one video clip, left to right in time. Describe the clip in one sentence."
    )
    # SVD's third caption: any transformers causal LM folder merging a clip's captions into one.
    summarizer_weights: str | None = None
    summary_prompt: str = (
        "Captions of one video clip, from a still frame and from the whole clip:\n{captions}\n"
        "Write one sentence that describes the clip, combining both."
    )
    summary_max_tokens: int = 40
    allow_random_weights: bool = False  # tests and demos only: random models where weights are None
    tiny_models: bool = False  # tiny registered open_clip architectures, so tests run fast on CPU
    batch_size: int = 32
    device: str = "auto"  # auto: cuda if available (bf16 autocast), else cpu (float32)
    cache_dir: str = ".vdm/cache/models"


class RandomWeightsNotAllowed(ValueError):
    """Weights are missing and random ones were not asked for."""


def resolve_weights(uri: str, cache_dir: str | Path, store: ObjectStore | None) -> Path:
    """A local path as is; imported weights (`weights:NAME`) from the weights cache; an s3://
    object downloaded once into `cache_dir` (checked against its recorded sha256) and reused after that."""
    if is_weights_ref(uri):
        return weights.resolve_weights(uri, store, cache_dir)
    if not is_s3_uri(uri):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    location = S3Uri.parse(uri)
    cached = Path(cache_dir) / "s3" / location.bucket / location.key
    if cached.is_file():
        return cached
    if store is None:
        raise ValueError(f"an ObjectStore is needed to fetch {uri}")
    # download_file renames into place only after verification, so a cached file is always whole.
    return store.download_file(uri, cached)


def _check_weights(config: NeuralConfig, *settings: str) -> list[str]:
    """The settings among `settings` left at None; raises unless random weights are allowed."""
    missing = [name for name in settings if getattr(config, name) is None]
    if missing and not config.allow_random_weights:
        raise RandomWeightsNotAllowed(
            f"no weights configured for {', '.join(missing)}: import them once (`vdm weights import NAME PATH`, "
            "docs/training.md) and set them to weights:NAME (or a local path or s3:// URI), "
            "or pass --allow-random-weights (tests and demos only: the scores mean nothing)"
        )
    return missing


def _same_shape_batches(frames: list[np.ndarray], batch_size: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Indices and frames of up to `batch_size` frames of one shape: a batch must stack into one tensor."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        by_shape[frame.shape].append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, [frames[i] for i in chunk]


def _torch_device(config: NeuralConfig) -> torch.device:
    import torch

    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- OCR ----------------------------------------------------------------------


def _write_atomically(target: Path, data: bytes) -> None:
    """Written beside and renamed into place, so that concurrent workers never read half a file."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, target)


def _offline_ocr_model_dir(cache_dir: Path, weights_name: str, folder: str, inference: Callable[[], dict]) -> Path:
    """PP-OCRv4 weights from the rapidocr-onnxruntime wheel, laid out as a PaddleX model folder with the
    `inference()` config (PaddleOCR's own model download needs the internet)."""
    import rapidocr_onnxruntime

    weights = Path(rapidocr_onnxruntime.__file__).parent / "models" / weights_name
    model_dir = cache_dir / folder
    onnx, yml = model_dir / "inference.onnx", model_dir / "inference.yml"
    if onnx.is_file() and yml.is_file() and onnx.stat().st_size == weights.stat().st_size:
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(onnx, weights.read_bytes())
    _write_atomically(yml, yaml.safe_dump(inference(), allow_unicode=True, sort_keys=False).encode())
    return model_dir


def _offline_rec_inference(weights_name: str) -> dict:
    """The recogniser's inference.yml with the character list its ONNX file carries in its metadata."""
    import onnxruntime
    import rapidocr_onnxruntime

    weights = Path(rapidocr_onnxruntime.__file__).parent / "models" / weights_name
    session = onnxruntime.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    characters = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    return {**_OCR_REC_INFERENCE_YML, "PostProcess": {"name": "CTCLabelDecode", "character_dict": characters}}


def _model_dir(configured: str | None, offline: Callable[[], Path]) -> Path:
    """The configured PaddleX model folder, checked; or the offline recipe where none is configured."""
    if configured is None:
        return offline()
    model_dir = Path(configured)
    if not (model_dir / "inference.onnx").is_file() or not (model_dir / "inference.yml").is_file():
        raise FileNotFoundError(f"{model_dir} needs inference.onnx and inference.yml")
    return model_dir


def crop_box(image: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """A detected quadrilateral (clockwise from top left) warped upright to a rectangle, as PP-OCR's
    pipeline crops for its recogniser; tall boxes are turned a quarter so text reads left to right."""
    points = np.asarray(polygon, np.float32)[:4]
    width = max(1, round(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3]))))
    height = max(1, round(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2]))))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(points, target)
    crop = cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(np.rot90(crop)) if height >= 1.5 * width else crop


def middle_of(crop: np.ndarray, max_aspect: float) -> np.ndarray:
    """The middle of a text line crop, at most `max_aspect` times as wide as high: the recogniser's cost
    grows with the width (it reads at 48 px high), and a part of a line tells text from texture."""
    height, width = crop.shape[:2]
    keep = max(1, round(max_aspect * height))
    if width <= keep:
        return crop
    left = (width - keep) // 2
    return crop[:, left : left + keep]


class TextDetector:
    """Fraction of each frame covered by burned-in text (captions, logos, subtitles): boxes found by the
    detector that the recogniser reads. `store` is unused (OCR models are local folders); it keeps the
    annotators' signatures alike."""

    def __init__(self, config: NeuralConfig, store: ObjectStore | None = None):
        # Without this PaddleX probes model hosters on import, which fails offline.
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        import onnxruntime
        from paddleocr import TextDetection, TextRecognition

        self.config = config
        cache_dir = Path(config.cache_dir)
        det_dir = _model_dir(
            config.ocr_model_dir,
            lambda: _offline_ocr_model_dir(
                cache_dir, "ch_PP-OCRv4_det_infer.onnx", "pp-ocrv4-det", lambda: _OCR_INFERENCE_YML
            ),
        )
        rec_weights = "ch_PP-OCRv4_rec_infer.onnx"
        rec_dir = _model_dir(
            config.ocr_rec_model_dir,
            lambda: _offline_ocr_model_dir(
                cache_dir, rec_weights, "pp-ocrv4-rec", lambda: _offline_rec_inference(rec_weights)
            ),
        )
        # PaddleX picks "gpu" whenever torch sees CUDA, and onnxruntime then fails without its CUDA provider.
        on_gpu = (
            _torch_device(config).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        )
        device = "gpu:0" if on_gpu else "cpu"
        self._detector = TextDetection(
            model_name=_model_name_in(det_dir),
            model_dir=str(det_dir),
            engine="onnxruntime",
            device=device,
            # Frames arrive already resized to ocr_input_side; "max" only rounds them to multiples of 32.
            limit_side_len=config.ocr_input_side,
            limit_type="max",
        )
        self._recogniser = TextRecognition(
            model_name=_model_name_in(rec_dir), model_dir=str(rec_dir), engine="onnxruntime", device=device
        )

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        """BGR frame whose longer side is ocr_input_side."""
        height, width = frame.shape[:2]
        scale = self.config.ocr_input_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return cv2.cvtColor(cv2.resize(frame, size, interpolation=interpolation), cv2.COLOR_RGB2BGR)

    def detect(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """RGB uint8 HxWx3 frames -> per frame, the BGR image the detector saw and its text polygons."""
        detected: list[tuple[np.ndarray, list[np.ndarray]]] = [(np.zeros((0, 0, 3), np.uint8), [])] * len(frames)
        resized = [self._resize(frame) for frame in frames]
        for indices, batch in _same_shape_batches(resized, self.config.batch_size):
            results = self._detector.predict(batch, batch_size=self.config.batch_size)
            for index, image, result in zip(indices, batch, results, strict=True):
                detected[index] = (image, [np.asarray(polygon) for polygon in result["dt_polys"]])
        return detected

    def read(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """BGR crops of text boxes -> (text, mean confidence) per crop."""
        read: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        if not crops:
            return read
        # Batches are padded to their widest crop: crops of like shape batched together waste least.
        order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / crops[i].shape[0])
        results = self._recogniser.predict([crops[i] for i in order], batch_size=self.config.batch_size)
        for index, result in zip(order, results, strict=True):
            read[index] = (str(result["rec_text"]), float(result["rec_score"]))
        return read

    def text_ratios(self, frames: list[np.ndarray], confirm: bool = True) -> list[float]:
        """RGB uint8 HxWx3 frames -> fraction of frame area covered by text polygons (union), one per frame.
        With `confirm`, only polygons the recogniser reads at least one character in, at text_min_confidence."""
        detected = self.detect(frames)
        boxes = [(frame, polygon) for frame, (_, polygons) in enumerate(detected) for polygon in polygons]
        confirmed = [True] * len(boxes)
        if confirm and boxes:
            crops = [crop_box(detected[frame][0], polygon) for frame, polygon in boxes]
            read = self.read([middle_of(crop, self.config.ocr_confirm_aspect) for crop in crops])
            confirmed = [bool(text.strip()) and score >= self.config.text_min_confidence for text, score in read]
        masks = [np.zeros(image.shape[:2], np.uint8) for image, _ in detected]
        for (frame, polygon), keep in zip(boxes, confirmed, strict=True):
            if keep:
                # One polygon per call: fillPoly given several fills their overlaps by parity, not union.
                cv2.fillPoly(masks[frame], [polygon.astype(np.int32)], 1)
        return [float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0 for mask in masks]


def _model_name_in(model_dir: Path) -> str:
    # The C loader where PyYAML has it: the recogniser's file lists thousands of characters.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((model_dir / "inference.yml").read_text(), Loader=loader)["Global"]["model_name"]


# -- open_clip models -----------------------------------------------------------


def _model_name(config: NeuralConfig, name: str, tiny_name: str) -> str:
    """`tiny_name` (registered on first use) when config.tiny_models, else `name`."""
    if not config.tiny_models:
        return name
    openclip.register_tiny_models(config.cache_dir)
    return tiny_name


def _build_open_clip(
    config: NeuralConfig, name: str, weights: str | None, store: ObjectStore | None, device: torch.device
) -> torch.nn.Module:
    """An open_clip model in eval mode on `device`: `weights` loaded, or seeded random where None."""
    path = resolve_weights(weights, config.cache_dir, store) if weights is not None else None
    return openclip.build(name, path).to(device)


def _to_model_input(model: torch.nn.Module, frames: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Same-shaped RGB uint8 frames -> the model's normalised input: shorter side resized to its
    image size, centre crop, mean/std of its training (OpenAI's for CLIP and CoCa)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", model.visual.image_size)
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    mean = torch.tensor(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)

    images = torch.from_numpy(np.stack(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    height, width = images.shape[-2:]
    scale = max(crop_h / height, crop_w / width)
    resized_h, resized_w = max(crop_h, round(height * scale)), max(crop_w, round(width * scale))
    images = F.interpolate(images, size=(resized_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized_h - crop_h) // 2, (resized_w - crop_w) // 2
    images = images[:, :, top : top + crop_h, left : left + crop_w].clamp(0.0, 1.0)  # bicubic overshoots
    return (images - mean) / std


def _aesthetic_head(embed_dim: int) -> torch.nn.Sequential:
    """LAION improved-aesthetic-predictor MLP; its state dict is this one's with a "layers." prefix."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(embed_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def _load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class ClipScorer:
    """CLIP image embeddings, their LAION aesthetic score, and image-caption similarity."""

    def __init__(self, config: NeuralConfig, store: ObjectStore | None = None):
        missing = _check_weights(config, "clip_weights", "aesthetic_weights")
        import open_clip

        self.config = config
        self.random_weights = bool(missing)
        self._device = _torch_device(config)
        name = _model_name(config, config.clip_model, TINY_CLIP_MODEL)
        self.embed_dim: int = open_clip.get_model_config(name)["embed_dim"]
        self._model = _build_open_clip(config, name, config.clip_weights, store, self._device)
        with openclip.fixed_seed():
            self._aesthetic = _aesthetic_head(self.embed_dim)
        self._tokenizer = open_clip.get_tokenizer(name)
        if config.aesthetic_weights is not None:
            path = resolve_weights(config.aesthetic_weights, config.cache_dir, store)
            state = {key.removeprefix("layers."): value for key, value in _load_state_dict(path).items()}
            self._aesthetic.load_state_dict(state)
        self._aesthetic.to(self._device).eval()

    def embed_images(self, frames: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 L2-normalised image embeddings."""
        import torch
        import torch.nn.functional as F

        embeddings = np.zeros((len(frames), self.embed_dim), np.float32)
        with torch.inference_mode(), _autocast(self._device):
            for indices, batch in _same_shape_batches(frames, self.config.batch_size):
                features = self._model.encode_image(_to_model_input(self._model, batch, self._device))
                embeddings[indices] = F.normalize(features.float(), dim=-1).cpu().numpy()
        return embeddings

    def aesthetic(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) float32 aesthetic scores (LAION's scale is about 1-10 with real weights)."""
        import torch
        import torch.nn.functional as F

        scores = []
        with torch.inference_mode(), _autocast(self._device):
            for start in range(0, len(embeddings), self.config.batch_size):
                batch = torch.from_numpy(np.asarray(embeddings[start : start + self.config.batch_size], np.float32))
                scores.append(self._aesthetic(F.normalize(batch.to(self._device), dim=-1)).float()[:, 0].cpu())
        return torch.cat(scores).numpy() if scores else np.zeros(0, np.float32)

    def text_similarity(self, embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
        """(N,) cosine similarity of image embedding i and text i."""
        import torch
        import torch.nn.functional as F

        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embeddings but {len(texts)} texts")
        similarities = np.zeros(len(texts), np.float32)
        with torch.inference_mode(), _autocast(self._device):
            for start in range(0, len(texts), self.config.batch_size):
                stop = start + self.config.batch_size
                tokens = self._tokenizer(texts[start:stop]).to(self._device)
                text_features = F.normalize(self._model.encode_text(tokens).float(), dim=-1)
                image_features = F.normalize(torch.from_numpy(embeddings[start:stop]).float().to(self._device), dim=-1)
                similarities[start:stop] = (image_features * text_features).sum(-1).cpu().numpy()
        # Float rounding can land a hair outside the range cosine similarity promises.
        return np.clip(similarities, -1.0, 1.0)


class CocaCaptioner:
    """One CoCa caption per frame, batched greedy decoding."""

    def __init__(self, config: NeuralConfig, store: ObjectStore | None = None):
        missing = _check_weights(config, "coca_weights")
        import open_clip
        import torch

        self.config = config
        self.random_weights = bool(missing)
        self._device = _torch_device(config)
        name = _model_name(config, config.coca_model, TINY_COCA_MODEL)
        self._model = _build_open_clip(config, name, config.coca_weights, store, self._device)
        with openclip.fixed_seed():
            if self.random_weights:
                # open_clip never initialises this parameter: torch.empty leaves whatever memory held
                # (zeros: every caption one repeated token; or values near 1e20: NaN logits).
                torch.nn.init.normal_(self._model.text_decoder.text_projection, std=0.02)
        self._tokenizer = open_clip.get_tokenizer(name)
        # The text tower sees the start token plus every generated token.
        self._max_tokens = min(config.caption_max_tokens, self._model.context_length - 1)

    def caption(self, frames: list[np.ndarray]) -> list[str]:
        captions = [""] * len(frames)
        for indices, batch in _same_shape_batches(frames, self.config.batch_size):
            for index, tokens in zip(indices, self._generate(batch), strict=True):
                captions[index] = self._tokenizer.decode(tokens).strip()
        return captions

    def _generate(self, frames: list[np.ndarray]) -> list[list[int]]:
        """Greedy token ids per frame, without start/end tokens. open_clip's generate() is out
        of reach: it imports BeamSearchScorer, which transformers 5 removed."""
        import torch

        model = self._model
        with torch.inference_mode(), _autocast(self._device):
            images = _to_model_input(model, frames, self._device)
            image_latent, image_embs = model._encode_image(images)  # once; every step reuses it
            tokens = torch.full((len(frames), 1), _SOT_TOKEN, dtype=torch.long, device=self._device)
            finished = torch.zeros(len(frames), dtype=torch.bool, device=self._device)
            for step in range(self._max_tokens):
                out = model(images, tokens, image_latent=image_latent, image_embs=image_embs, output_labels=False)
                logits = out["logits"][:, -1].float()
                if step == 0:
                    logits[:, _EOT_TOKEN] = -torch.inf  # no empty captions
                next_token = logits.argmax(-1)
                next_token[finished] = model.pad_id
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                finished |= next_token == _EOT_TOKEN
                if finished.all():
                    break
        generated = []
        for row in tokens[:, 1:].tolist():
            generated.append(row[: row.index(_EOT_TOKEN)] if _EOT_TOKEN in row else row)
        return generated


def _model_folder(location: str, config: NeuralConfig, store: ObjectStore | None) -> Path:
    """A transformers model folder: `weights:NAME` (or its s3:// entry) from the weights cache, or a
    local folder."""
    if is_weights_ref(location):
        return weights.resolve_weights(location, store, config.cache_dir)
    path = Path(location).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a transformers model folder (no config.json): {path}")
    return path


def _generation_pipeline(task: str, location: str, config: NeuralConfig, store: ObjectStore | None) -> Any:
    import torch
    from transformers import pipeline

    device = _torch_device(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return pipeline(task, model=str(_model_folder(location, config, store)), device=device, dtype=dtype)


class TransformersVideoCaptioner:
    """A `VideoCaptioner`: an image-text-to-text model (transformers' pipeline, so any family it
    loads) shown each clip's frames side by side in one picture, in order, with
    `video_caption_prompt`; greedy decoding."""

    def __init__(self, config: NeuralConfig, store: ObjectStore | None = None):
        assert config.video_captioner_weights is not None
        self.config = config
        self._pipe = _generation_pipeline("image-text-to-text", config.video_captioner_weights, config, store)

    def caption_clips(self, clips: list[list[np.ndarray]]) -> list[str]:
        from PIL import Image

        if not clips:
            return []
        images = [Image.fromarray(np.concatenate(frames, axis=1)) for frames in clips]
        prompt = self.config.video_caption_prompt
        generation = {
            "max_new_tokens": self.config.caption_max_tokens,
            "return_full_text": False,
            "batch_size": self.config.batch_size,
            "generate_kwargs": {"do_sample": False, "min_new_tokens": 1},
        }
        if getattr(self._pipe.processor, "chat_template", None):
            content = [[{"type": "image", "image": image}, {"type": "text", "text": prompt}] for image in images]
            outputs = self._pipe(text=[[{"role": "user", "content": c}] for c in content], **generation)
        else:  # a captioning model without a chat format (BLIP, GIT): the prompt as the caption's start
            outputs = self._pipe(images=images, text=[prompt] * len(images), **generation)
        return [_text(output) for output in outputs]


class TransformersSummarizer:
    """A `CaptionSummarizer`: a causal LM (transformers' text-generation pipeline) given each clip's
    captions in `summary_prompt`, in its chat format where it has one; greedy decoding."""

    def __init__(self, config: NeuralConfig, store: ObjectStore | None = None):
        assert config.summarizer_weights is not None
        self.config = config
        self._pipe = _generation_pipeline("text-generation", config.summarizer_weights, config, store)
        tokenizer = self._pipe.tokenizer
        tokenizer.padding_side = "left"  # batched generation continues every prompt from its end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def summarize(self, captions: list[list[str]]) -> list[str]:
        if not captions:
            return []
        prompts = [
            self.config.summary_prompt.format(captions="\n".join(f"- {c}" for c in clip if c)) for clip in captions
        ]
        if self._pipe.tokenizer.chat_template:
            prompts = [[{"role": "user", "content": prompt}] for prompt in prompts]
        outputs = self._pipe(
            prompts,
            max_new_tokens=self.config.summary_max_tokens,
            return_full_text=False,
            batch_size=self.config.batch_size,
            do_sample=False,
            min_new_tokens=1,
        )
        return [_text(output) for output in outputs]


def _text(output: list[dict] | dict) -> str:
    """The generated text of one pipeline output (a list of one candidate, or the candidate)."""
    candidate = output[0] if isinstance(output, list) else output
    return str(candidate["generated_text"]).strip()


# -- plug-ins -------------------------------------------------------------------


class VideoCaptioner(Protocol):
    """A captioner that watches whole clips (SVD's second caption)."""

    def caption_clips(self, clips: list[list[np.ndarray]]) -> list[str]: ...


class CaptionSummarizer(Protocol):
    """An LLM that merges each clip's captions into one (SVD's third caption)."""

    def summarize(self, captions: list[list[str]]) -> list[str]: ...


def load_plugin(spec: str | None) -> object | None:
    """'package.module:ClassName' -> an instance built with no arguments; None (the default: off) -> None."""
    if spec is None:
        return None
    module_name, colon, class_name = spec.partition(":")
    if not colon or not module_name or not class_name:
        raise ValueError(f"plug-in {spec!r} is not of the form 'package.module:ClassName'")
    return getattr(importlib.import_module(module_name), class_name)()
