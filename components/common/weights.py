"""Named weights, imported once: public weights a user downloaded themselves (SD 2.1, SVD,
OpenCLIP towers, the LAION aesthetic head) go into the object store under a name, and
everything that takes weights accepts `weights:NAME` (or the entry's s3:// URI).

An entry is `s3://<data bucket>/weights/NAME/`: the files, the object store's
`_MANIFEST.json`, and `weights.json` (a `WeightsManifest`) written last, so an entry
that is listed is whole. Weights are checked before anything is published: every
tensor's key and shape must be what the named architecture, built on the meta device,
expects, so a wrong file fails at import with the keys that differ, not hours later in
a training job.

Kinds:

- `diffusers`: a diffusers folder: a pipeline (`model_index.json` and one folder per
  part: SD 2.1, SVD img2vid, the SD x4 upscaler) or one model folder (`config.json`,
  e.g. a VAE, or a transformers model such as a VideoMAE). Each part with a
  `config.json` is checked against its class (diffusers' `_class_name`, transformers'
  `architectures`). Only the plain safetensors files of the parts are taken (not
  .bin/.ckpt copies, fp16 variants or single-file checkpoints beside them): what
  diffusers and transformers load by default.
- `open_clip`: one open_clip checkpoint file; the architecture is the open_clip model
  name (`ViT-H-14`, `ViT-L-14`, `coca_ViT-L-14`).
- `aesthetic_mlp`: the LAION improved-aesthetic-predictor state dict (one file), the
  MLP curation builds (components/curation/neural.py).
- `i3d`: the Kinetics I3D's state dict (one file, e.g. `i3d_pretrained_400.pt`), the
  network of FVD (model/i3d.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from components.common.objectstore import (
    BucketNotFoundError,
    ChecksumMismatchError,
    ObjectNotFoundError,
    ObjectStore,
    S3Uri,
    is_s3_uri,
)
from components.common.settings import load_settings

KINDS = ("diffusers", "open_clip", "aesthetic_mlp", "i3d")
MANIFEST = "weights.json"
PREFIX = "weights"
REF = "weights:"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Files that hold tensors; in a diffusers folder only the parts' plain safetensors are kept.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb", ".gguf", ".npz"}
# `model.safetensors`, `diffusion_pytorch_model-00001-of-00002.safetensors`; not `….fp16.safetensors`.
_PLAIN_SAFETENSORS = re.compile(r"^[^.]+?(-\d{5}-of-\d{5})?\.safetensors$")
_SHOWN = 5  # keys named in a mismatch message, per list


@dataclass(frozen=True)
class WeightsManifest:
    name: str
    kind: str
    architecture: str  # diffusers: the pipeline or model class; open_clip: the model name; i3d: InceptionI3d-CLASSES
    files: dict[str, str]  # relative path -> sha256
    source: str = ""  # where the user got them (a URL, a model id)
    licence: str = ""
    imported_at: str = ""  # ISO 8601, UTC

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WeightsManifest:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"name", "kind", "architecture", "files"} <= data.keys():
            raise ValueError(f"not a weights manifest: {text[:200]!r}")
        if unknown := sorted(data.keys() - names):
            raise ValueError(f"weights manifest of {data['name']!r} has unknown fields {unknown}")
        return cls(**data)

    @property
    def single_file(self) -> str | None:
        """The one file of a single-file kind (open_clip, aesthetic_mlp, i3d); None for folders."""
        return None if self.kind == "diffusers" else next(iter(self.files))


@dataclass(frozen=True)
class CheckedWeights:
    """What `check_weights` found: the kind, the architecture, and the files to publish
    (relative to `root`)."""

    kind: str
    architecture: str
    root: Path
    files: tuple[str, ...]


# -- names and locations ------------------------------------------------------------------


def is_weights_ref(text: str) -> bool:
    """`weights:NAME`, or the s3:// URI of an entry (`s3://bucket/weights/NAME`)."""
    text = str(text)
    if text.startswith(REF):
        return True
    return is_s3_uri(text) and re.fullmatch(rf"{PREFIX}/[^/]+/?", S3Uri.parse(text).key) is not None


def weights_uri(name: str, bucket: str | None = None) -> S3Uri:
    """Where the entry NAME lives: s3://<bucket, default the data bucket>/weights/NAME."""
    _check_name(name)
    return S3Uri(bucket or load_settings().data_bucket, f"{PREFIX}/{name}")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"bad weights name {name!r}: letters, digits, '.', '_' and '-' only (at most 100)")


def _folder(prefix: S3Uri) -> S3Uri:
    """The prefix with its trailing slash: `weights/sd21` alone also matches `weights/sd21-ema/`."""
    return S3Uri(prefix.bucket, prefix.key.rstrip("/") + "/")


def _parse_ref(location: str, bucket: str | None) -> S3Uri:
    if location.startswith(REF):
        return weights_uri(location[len(REF) :], bucket)
    if not is_weights_ref(location):
        raise ValueError(f"{location!r} is neither weights:NAME nor s3://BUCKET/{PREFIX}/NAME")
    uri = S3Uri.parse(location.rstrip("/"))
    return weights_uri(uri.key.split("/")[1], uri.bucket)


# -- the object store -----------------------------------------------------------------------


def import_weights(
    name: str,
    path: str | Path,
    store: ObjectStore,
    *,
    kind: str | None = None,
    architecture: str | None = None,
    source: str = "",
    licence: str = "",
    replace: bool = False,
    bucket: str | None = None,
    progress: bool = False,
) -> WeightsManifest:
    """Check the weights at `path`, then publish them as the entry NAME (refusing to
    replace an existing one unless `replace`; `progress`: a bar of the files uploaded).
    Raises ValueError, naming what is wrong, before anything is written."""
    prefix = weights_uri(name, bucket)
    checked = check_weights(path, kind=kind, architecture=architecture)
    store.ensure_bucket(prefix.bucket)
    if store.exists(prefix.join(MANIFEST)):
        if not replace:
            raise ValueError(f"weights named {name!r} already exist at {prefix}/; pass --replace to overwrite them")
        # The old entry goes first, weights.json before its files, so no mix of old and
        # new files is ever listed.
        store.delete(prefix.join(MANIFEST))
        for old in list(store.list(_folder(prefix))):
            store.delete(old.uri)
    with tempfile.TemporaryDirectory(prefix="vdm-weights-") as staging:
        # publish_folder takes a whole folder: links to just the files to publish.
        for rel in checked.files:
            (Path(staging) / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((checked.root / rel).resolve(), Path(staging) / rel)
        store.publish_folder(staging, prefix, progress=progress)
    published = store.read_manifest(prefix)  # publish_folder recorded each file's sha256
    manifest = WeightsManifest(
        name=name,
        kind=checked.kind,
        architecture=checked.architecture,
        files={entry["path"]: entry["sha256"] for entry in published["files"]},
        source=source,
        licence=licence,
        imported_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    store.put_bytes(prefix.join(MANIFEST), manifest.to_json().encode(), "application/json")  # last: now listed
    return manifest


def list_weights(store: ObjectStore, bucket: str | None = None) -> list[WeightsManifest]:
    """Every complete entry (one with its weights.json), by name."""
    root = S3Uri(bucket or load_settings().data_bucket, f"{PREFIX}/")
    if not store.bucket_exists(root.bucket):
        return []
    manifests = [
        WeightsManifest.from_json(store.get_bytes(info.uri).decode())
        for info in store.list(root)
        if re.fullmatch(rf"{PREFIX}/[^/]+/{re.escape(MANIFEST)}", info.uri.key)
    ]
    return sorted(manifests, key=lambda m: m.name)


def resolve_weights(
    location: str | Path, store: ObjectStore | None, cache_dir: str | Path, *, bucket: str | None = None
) -> Path:
    """A local path as is; `weights:NAME` or `s3://…/weights/NAME` downloaded once into
    `cache_dir/weights/NAME/` and returned: the folder of a diffusers entry, the file of a
    single-file one. A cached copy is reused while its weights.json is the entry's."""
    location = str(location)
    if not (location.startswith(REF) or is_s3_uri(location)):
        return Path(location)
    prefix = _parse_ref(location, bucket)
    if store is None:
        raise ValueError(f"an ObjectStore is needed to fetch {location}")
    name = prefix.key.split("/")[1]
    try:
        text = store.get_bytes(prefix.join(MANIFEST)).decode()
    except (ObjectNotFoundError, BucketNotFoundError):
        root = S3Uri(prefix.bucket, f"{PREFIX}/")
        raise ValueError(
            f"no weights named {name} in {root}; import them with `vdm weights import {name} PATH`"
        ) from None
    manifest = WeightsManifest.from_json(text)
    folder = Path(cache_dir) / PREFIX / name
    with _one_at_a_time(folder):  # the ranks of a node download once: the others wait, then find the copy
        if not _is_copy_of(folder, text):
            _fill(folder, store, prefix, manifest, text)
    return folder / manifest.single_file if manifest.single_file else folder


@contextlib.contextmanager
def _one_at_a_time(folder: Path) -> Iterator[None]:
    """An exclusive lock beside `folder` (released when the process ends, however it ends)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _is_copy_of(folder: Path, text: str) -> bool:
    local = folder / MANIFEST
    return local.is_file() and local.read_text() == text


def _fill(folder: Path, store: ObjectStore, prefix: S3Uri, manifest: WeightsManifest, text: str) -> None:
    """Download the entry beside `folder` and rename it into place whole: ranks of one job
    that resolve at the same time never see each other's partial copy (each downloads,
    the first rename wins, the others find that copy complete)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        _download(store, prefix, manifest, partial)
        (partial / MANIFEST).write_text(text)
        if folder.exists() and not _is_copy_of(folder, text):
            shutil.rmtree(folder, ignore_errors=True)  # the copy of an earlier import of the name
        with contextlib.suppress(OSError):  # lost to another process's rename of the same entry
            os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if not _is_copy_of(folder, text):
        raise ValueError(f"could not place {prefix}/ into {folder}: the folder changed while it was downloaded")


def _download(store: ObjectStore, prefix: S3Uri, manifest: WeightsManifest, folder: Path) -> None:
    # A large entry takes minutes: the step's log says what it waits for.
    print(f"fetching weights:{manifest.name} ({len(manifest.files)} files) into the cache", file=sys.stderr, flush=True)

    def fetch(rel: str) -> None:
        uri = prefix.join(rel)
        # The store records each object's sha256 and download_file checks the content
        # against it; checking that record against the manifest closes the chain.
        recorded = store.recorded_sha256(uri)
        if recorded != manifest.files[rel]:
            raise ChecksumMismatchError(
                f"{uri}: sha256 {recorded} is not the {manifest.files[rel]} that {prefix}/{MANIFEST} records; "
                f"the entry was changed after import: import it again"
            )
        store.download_file(uri, folder / rel)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fetch, manifest.files))


# -- checking weights against their architecture ---------------------------------------------


def check_weights(path: str | Path, *, kind: str | None = None, architecture: str | None = None) -> CheckedWeights:
    """Detect the kind (unless given) and check every key and shape against the
    architecture; ValueError, one line naming the differing keys, if they do not match."""
    path = Path(path).expanduser()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    if path.is_dir():
        if kind not in (None, "diffusers"):
            raise ValueError(f"{path} is a folder: a {kind} checkpoint is one file")
        return _check_diffusers(path, architecture)
    if kind == "diffusers":
        raise ValueError(f"{path} is a file: a diffusers entry is a folder (model_index.json or config.json)")
    shapes = _file_shapes(path)
    if kind is None:
        # The MLP's keys say what it is; an open_clip checkpoint's only fit the architecture named.
        if _strip_layers(shapes).keys() == _aesthetic_shapes(0).keys():
            kind = "aesthetic_mlp"
        elif _I3D_KEY in shapes:
            kind = "i3d"
        elif architecture is not None:
            kind = "open_clip"
        else:
            raise ValueError(
                f"{path} is one file but not the LAION aesthetic MLP: for an open_clip checkpoint "
                "give --architecture (the open_clip model name, e.g. ViT-H-14)"
            )
    if kind == "open_clip":
        if architecture is None:
            raise ValueError("an open_clip checkpoint needs --architecture (the open_clip model name, e.g. ViT-H-14)")
        _check_open_clip(path, shapes, architecture)
    elif kind == "i3d":
        architecture = _check_i3d(path, shapes, architecture)
    else:
        architecture = _check_aesthetic(path, shapes, architecture)
    return CheckedWeights(kind, architecture, path.parent, (path.name,))


def _mismatch(where: str, expected: dict, found: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise a one-line ValueError if `found` (key -> shape) is not `expected`; keys
    matching a regex of `ignore` may be left over."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(k for k in found.keys() - expected.keys() if not any(re.search(p, k) for p in ignore))
    reshaped = [
        f"{k} {tuple(found[k])} instead of {tuple(expected[k])}"
        for k in sorted(expected.keys() & found.keys())
        if tuple(expected[k]) != tuple(found[k])
    ]
    _report(where, missing, unexpected, reshaped)


def _report(where: str, missing: list[str], unexpected: list[str], reshaped: list[str]) -> None:
    def few(keys: list[str]) -> str:
        more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
        return ", ".join(keys[:_SHOWN]) + more

    problems = [
        f"{len(keys)} {what} ({few(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"{where}: keys do not match: " + "; ".join(problems))


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file, without reading its tensors: the safetensors
    header, or a memory-mapped torch.load. A `state_dict` wrapper and `module.` prefixes
    (DataParallel) are removed, as open_clip's loader does."""
    import torch

    try:
        if path.suffix == ".safetensors":
            return _safetensors_shapes(path)
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors each fail their own way on a bad file
        raise ValueError(f"cannot read {path} as a checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


def _check_open_clip(path: Path, shapes: dict, architecture: str) -> None:
    import open_clip
    from open_clip.model import convert_to_custom_text_state_dict

    from model.architectures import meta_open_clip, state_shapes

    if architecture not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().replace("-", "_") == architecture.lower()]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown open_clip architecture {architecture!r}{hint}: see open_clip.list_models()")
    model = meta_open_clip(architecture)
    # What open_clip.load_checkpoint forgives: old checkpoints with the text tower at the
    # top level, a 0-d or 1-d logit_scale, transformers' position_ids.
    if "positional_embedding" in shapes and not hasattr(model, "positional_embedding"):
        shapes = convert_to_custom_text_state_dict(shapes)
    shapes = {k: v for k, v in shapes.items() if k != "text.transformer.embeddings.position_ids"}
    expected = state_shapes(model)
    for key in ("logit_scale", "logit_bias"):
        if key in shapes and key in expected and math.prod(shapes[key]) == math.prod(expected[key]):
            shapes[key] = expected[key]
    _mismatch(f"{path} as open_clip {architecture}", expected, shapes)


def _strip_layers(shapes: dict) -> dict:
    # LAION's file is a LightningModule's state dict: the MLP's keys under "layers." (curation strips it too).
    return {k.removeprefix("layers."): v for k, v in shapes.items()}


def _aesthetic_shapes(embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the aesthetic MLP curation builds, taking `embed_dim`-wide embeddings."""
    import torch

    from components.curation.neural import _aesthetic_head  # the one definition of the MLP
    from model.architectures import state_shapes

    with torch.device("meta"):
        return state_shapes(_aesthetic_head(max(embed_dim, 1)))


def _check_aesthetic(path: Path, shapes: dict, architecture: str | None) -> str:
    """The MLP's input width is the CLIP embedding's; `architecture`, if given, is the open_clip
    model whose embeddings it scores and must have that width. Returns the architecture."""
    shapes = _strip_layers(shapes)
    width = shapes.get("0.weight", (0, 0))[-1]
    _mismatch(f"{path} as the LAION aesthetic MLP", _aesthetic_shapes(width), shapes)
    if architecture is None:
        return f"mlp-{width}"
    import open_clip

    config = open_clip.get_model_config(architecture)
    if config is not None and config["embed_dim"] != width:
        raise ValueError(f"{path} scores {width}-wide embeddings; {architecture}'s are {config['embed_dim']}-wide")
    return architecture


_I3D_KEY = "Conv3d_1a_7x7.conv3d.weight"  # the I3D's first layer: a file with it is taken for one


def _check_i3d(path: Path, shapes: dict, architecture: str | None) -> str:
    """Every key and shape of model/i3d.py's InceptionI3d with as many classes as the file's
    logits (Kinetics-400: 400); num_batches_tracked may be absent (TF conversions have none).
    Returns the architecture, `InceptionI3d-CLASSES`."""
    import torch

    from model.architectures import state_shapes
    from model.i3d import NUM_CLASSES, InceptionI3d

    classes = shapes.get("logits.conv3d.bias", (NUM_CLASSES,))[0]
    found = f"InceptionI3d-{classes}"
    if architecture is not None and architecture != found:
        raise ValueError(f"{path} holds an {found}, not an {architecture}")
    with torch.device("meta"):
        expected = state_shapes(InceptionI3d(classes))
    batches = r"\.num_batches_tracked$"
    expected = {k: v for k, v in expected.items() if not re.search(batches, k)}
    _mismatch(f"{path} as the Kinetics I3D", expected, shapes, ignore=(batches,))
    return found


def _check_diffusers(folder: Path, architecture: str | None) -> CheckedWeights:
    index = folder / "model_index.json"
    config = folder / "config.json"
    if index.is_file():
        found = _read_json(index).get("_class_name")
        parts = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file())
        if not parts:
            raise ValueError(f"{folder}: model_index.json but no model folder (a folder with config.json)")
    elif config.is_file():
        # One model folder: a diffusers model names its class in _class_name, a transformers
        # one (a VideoMAE for FVD) in architectures.
        model_config = _read_json(config)
        found = model_config.get("_class_name") or next(iter(model_config.get("architectures") or []), None)
        parts = [folder]
    else:
        raise ValueError(f"{folder} is not a diffusers folder: no model_index.json or config.json")
    if not found:
        where = index if index.is_file() else config
        raise ValueError(f"{where} names no class (_class_name or architectures): not a diffusers folder")
    if architecture is not None and architecture != found:
        raise ValueError(f"{folder} holds a {found}, not a {architecture}")
    weights = [rel for part in parts for rel in _check_part(folder, part)]
    others = [rel for rel in _files(folder) if Path(rel).suffix not in _WEIGHT_SUFFIXES]
    return CheckedWeights("diffusers", found, folder, tuple(sorted({*weights, *others})))


def _files(folder: Path) -> Iterator[str]:
    """Relative paths of the files under `folder`, hidden ones (.git, .cache) left out."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield rel.as_posix()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _check_part(root: Path, part: Path) -> list[str]:
    """Check one model folder of a diffusers folder; its weights files, relative to `root`."""
    config = _read_json(part / "config.json")
    files = sorted(p for p in part.iterdir() if p.is_file() and _PLAIN_SAFETENSORS.match(p.name))
    where = part.relative_to(root).as_posix() if part != root else str(root)
    if not files:
        present = sorted(p.name for p in part.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        raise ValueError(
            f"{part}: no plain safetensors weights (found {present or 'none'}); "
            "download the part's model.safetensors / diffusion_pytorch_model.safetensors"
        )
    if "_class_name" in config:
        _check_diffusers_part(part, config, files, where)
    elif config.get("architectures"):
        _check_transformers_part(part, config["architectures"][0], where)
    else:
        raise ValueError(f"{part / 'config.json'} names no class (_class_name or architectures)")
    return [p.relative_to(root).as_posix() for p in files]


def _check_diffusers_part(part: Path, config: dict, files: list[Path], where: str) -> None:
    import diffusers

    from model.architectures import meta_model, state_shapes

    cls = getattr(diffusers, config["_class_name"], None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"{part / 'config.json'}: {config['_class_name']!r} is not a diffusers model class")
    with _quiet("diffusers"):
        model = meta_model(cls, config)
    found: dict = {}
    for file in files:
        found.update(_safetensors_shapes(file))
    # Older checkpoints (SD 2.x's VAE) name their attention query/key/value/proj_attn;
    # diffusers renames those on load, and so do we.
    found = model._fix_state_dict_keys_on_load(found)
    _mismatch(
        f"{where} ({cls.__name__})", state_shapes(model), found, tuple(cls._keys_to_ignore_on_load_unexpected or ())
    )


def _check_transformers_part(part: Path, class_name: str, where: str) -> None:
    """transformers' own loader onto the meta device: its checkpoint renamings (e.g.
    `text_model.` prefixes, legacy position_ids) are the ones that apply when the part
    loads; it reads the safetensors headers, not the tensors."""
    import transformers

    cls = getattr(transformers, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ValueError(f"{part / 'config.json'}: {class_name!r} is not a transformers model class")
    with _quiet("transformers"):
        _, info = cls.from_pretrained(
            part, device_map="meta", output_loading_info=True, ignore_mismatched_sizes=True, use_safetensors=True
        )
    reshaped = [f"{k} {tuple(found)} instead of {tuple(wanted)}" for k, found, wanted in info["mismatched_keys"]]
    _report(f"{where} ({class_name})", sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), sorted(reshaped))


@contextlib.contextmanager
def _quiet(library: str) -> Iterator[None]:
    """The library's load reports, progress bars and config warnings off while we build or
    load on the meta device (our own message says what differs)."""
    import importlib

    logging = importlib.import_module(f"{library}.utils.logging")
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
