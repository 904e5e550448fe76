"""Named weights: checked key by key at import (full-size open_clip architectures on the
meta device, reduced-width diffusers folders), published to the real local S3 server,
resolved back into a cache and loaded by our code with the same outputs."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from components.common.objectstore import ChecksumMismatchError, S3Uri
from components.common.weights import (
    WeightsManifest,
    check_weights,
    import_weights,
    is_weights_ref,
    list_weights,
    resolve_weights,
    weights_uri,
)
from components.curation.neural import _aesthetic_head
from model.architectures import meta_open_clip, state_shapes
from model.conditioning import LatentCodec
from model.networks import CONFIGS, image_unet, load_image_unet
from model.openclip import fixed_seed
from vdm.cli import main

# The LAION improved-aesthetic-predictor's file for ViT-L-14 embeddings: a LightningModule's
# state dict, its Sequential under "layers." (Linear layers at 0, 2, 4, 6, 7; dropouts between).
LAION_AESTHETIC_KEYS = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def _cheap(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of these shapes that cost one float each: torch.save stores a view's
    storage, and an expanded scalar's storage is one element."""
    return {k: torch.zeros(1).expand(shape) if shape else torch.zeros(()) for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def bucket(store) -> str:
    """A bucket of this module's own, so listings hold exactly what the tests imported."""
    name = f"weights-test-{random.getrandbits(32):08x}"
    store.ensure_bucket(name)
    return name


# -- references -------------------------------------------------------------------------------


def test_weights_references():
    assert is_weights_ref("weights:sd21") and is_weights_ref("s3://vdm/weights/sd21/")
    assert is_weights_ref("s3://other/weights/sd21")
    assert not is_weights_ref("s3://vdm/weights/sd21/unet") and not is_weights_ref("s3://vdm/runs/s1/final")
    assert not is_weights_ref("/data/sd21") and not is_weights_ref("models:/vdm@champion")
    assert weights_uri("sd21", "vdm") == S3Uri("vdm", "weights/sd21")
    with pytest.raises(ValueError, match="bad weights name"):
        weights_uri("../x", "vdm")


def test_a_local_path_resolves_as_is(tmp_path):
    assert resolve_weights(tmp_path / "w.pt", None, tmp_path / "cache") == tmp_path / "w.pt"


def test_manifest_json_round_trip():
    manifest = WeightsManifest("sd21", "diffusers", "StableDiffusionPipeline", {"unet/x.safetensors": "ab"}, "hf", "")
    assert WeightsManifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(ValueError, match="unknown fields"):
        WeightsManifest.from_json(json.dumps(json.loads(manifest.to_json()) | {"extra": 1}))


# -- open_clip checkpoints at full size ---------------------------------------------------------


@pytest.mark.parametrize("architecture", ["ViT-H-14", "ViT-L-14", "coca_ViT-L-14"])
def test_open_clip_checkpoints_are_checked_key_by_key(architecture, tmp_path):
    shapes = state_shapes(meta_open_clip(architecture))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(_cheap(shapes), path)
    checked = check_weights(path, architecture=architecture)
    assert (checked.kind, checked.architecture, checked.files) == ("open_clip", architecture, (path.name,))
    # A training checkpoint: wrapped in state_dict, DDP's module. prefixes (open_clip loads it).
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in _cheap(shapes).items()}}, path)
    check_weights(path, kind="open_clip", architecture=architecture)

    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    dropped = {k: v for k, v in shapes.items() if k != key}
    renamed = {k.replace("attn.in_proj", "attn.qkv") if k == key else k: v for k, v in shapes.items()}
    reshaped = shapes | {key: (shapes[key][0] + 3, shapes[key][1])}
    for broken, message in [
        (dropped, f"1 missing \\({key}\\)"),
        (renamed, f"1 missing \\({key}\\); 1 unexpected \\(visual.transformer.resblocks.0.attn.qkv_weight\\)"),
        (reshaped, rf"1 of another shape \({key} \({shapes[key][0] + 3}, {shapes[key][1]}\) instead of"),
    ]:
        torch.save(_cheap(broken), path)
        with pytest.raises(ValueError, match=f"as open_clip {architecture}: keys do not match: {message}") as e:
            check_weights(path, architecture=architecture)
        assert "\n" not in str(e.value)


def test_an_open_clip_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vit-l.bin"
    torch.save(_cheap(state_shapes(meta_open_clip("ViT-L-14"))), path)
    with pytest.raises(ValueError, match=r"as open_clip ViT-H-14: keys do not match: .*missing .*of another shape"):
        check_weights(path, architecture="ViT-H-14")
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'vit_h_14' \(did you mean ViT-H-14\?\)"):
        check_weights(path, architecture="vit_h_14")
    with pytest.raises(ValueError, match="give --architecture"):
        check_weights(path)  # one file, not the aesthetic MLP: which open_clip model is it?


# -- the LAION aesthetic MLP ----------------------------------------------------------------------


def test_the_aesthetic_mlp_is_laions_key_set(tmp_path):
    with torch.device("meta"):
        ours = state_shapes(_aesthetic_head(768))
    assert {f"layers.{k}": v for k, v in ours.items()} == LAION_AESTHETIC_KEYS
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_cheap(LAION_AESTHETIC_KEYS), path)
    checked = check_weights(path)  # detected by its keys
    assert (checked.kind, checked.architecture) == ("aesthetic_mlp", "mlp-768")
    assert check_weights(path, architecture="ViT-L-14").architecture == "ViT-L-14"
    with pytest.raises(ValueError, match="scores 768-wide embeddings; ViT-H-14's are 1024-wide"):
        check_weights(path, kind="aesthetic_mlp", architecture="ViT-H-14")
    torch.save(_cheap({k: v for k, v in LAION_AESTHETIC_KEYS.items() if k != "layers.7.bias"}), path)
    with pytest.raises(ValueError, match=r"as the LAION aesthetic MLP: keys do not match: 1 missing \(7.bias\)"):
        check_weights(path, kind="aesthetic_mlp")


# -- diffusers folders (reduced width) ---------------------------------------------------------------


def _sd21_layout(folder, seed: int = 0):
    """A reduced-width folder laid out as the public SD 2.1 download: model_index.json,
    unet/, vae/ (attention under the old query/key/value names, as SD 2.x's VAE file has
    them), text_encoder/ (transformers, `text_model.` prefix and position_ids as SD 2.1's
    file), scheduler/, tokenizer/, plus what a download brings and an import leaves out."""
    with fixed_seed(seed):
        unet = image_unet(CONFIGS["tiny"]).eval()
        vae = LatentCodec.tiny().vae
        text = CLIPTextModel(
            CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        ).eval()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    DDIMScheduler().save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    for new, legacy in old.items():
        state = {k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}."): v for k, v in state.items()}
    assert any(".query." in k for k in state)
    save_file(state, folder / "vae" / "diffusion_pytorch_model.safetensors")
    state = {f"text_model.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}
    save_file(
        state | {"text_model.embeddings.position_ids": torch.arange(77)[None]},
        folder / "text_encoder" / "model.safetensors",
    )

    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    # Left out: a single-file checkpoint, an fp16 variant, a .bin copy, the hub cache.
    (folder / "v2-1_768-ema-pruned.ckpt").write_bytes(b"\0" * 100)
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\0" * 100)
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 100)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "unet.lock").write_text("")
    return unet, vae, text


PUBLISHED = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def test_a_diffusers_folder_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    folder = tmp_path / "sd21"
    _sd21_layout(folder)
    checked = check_weights(folder)
    assert (checked.kind, checked.architecture, set(checked.files)) == (
        "diffusers",
        "StableDiffusionPipeline",
        PUBLISHED,
    )
    vae = check_weights(folder / "vae")  # a single model folder (its .bin copy left out)
    assert (vae.architecture, vae.files) == ("AutoencoderKL", ("config.json", "diffusion_pytorch_model.safetensors"))

    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 96}))
    with pytest.raises(
        ValueError,
        match=r"unet \(UNet2DConditionModel\): keys do not match: \d+ of another shape \(.*attn2.to_k.weight "
        r"\(64, 64\) instead of \(64, 96\)",
    ):
        check_weights(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(config))

    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "final_layer_norm.bias" not in k}, weights)
    with pytest.raises(
        ValueError, match=r"text_encoder \(CLIPTextModel\): keys do not match: 1 missing \(final_layer_norm.bias\)"
    ):
        check_weights(folder)
    weights.unlink()
    with pytest.raises(ValueError, match="text_encoder: no plain safetensors weights"):
        check_weights(folder)

    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline, not a StableVideoDiffusionPipeline"):
        check_weights(folder, architecture="StableVideoDiffusionPipeline")
    with pytest.raises(ValueError, match="is a folder: a open_clip checkpoint is one file"):
        check_weights(folder, kind="open_clip")


def test_import_resolve_and_load_give_the_same_outputs(store, bucket, tmp_path, monkeypatch):
    folder = tmp_path / "sd21"
    unet, vae, text = _sd21_layout(folder)
    name = f"sd21-{random.getrandbits(24):06x}"
    manifest = import_weights(
        name, folder, store, source="stabilityai/stable-diffusion-2-1", licence="openrail++", bucket=bucket
    )
    assert (manifest.name, manifest.kind, manifest.architecture) == (name, "diffusers", "StableDiffusionPipeline")
    assert set(manifest.files) == PUBLISHED
    assert manifest in list_weights(store, bucket)

    cache = tmp_path / "cache"
    resolved = resolve_weights(f"weights:{name}", store, cache, bucket=bucket)
    assert resolved == cache / "weights" / name
    # Resolved again (by URI): the cached copy, nothing downloaded.
    monkeypatch.setattr(store, "download_file", lambda *a: pytest.fail("downloaded again"))
    assert resolve_weights(f"s3://{bucket}/weights/{name}/", store, cache) == resolved
    monkeypatch.undo()

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    tokens = torch.randn(2, 5, CONFIGS["tiny"].cross_attention_dim, generator=generator)
    frames = torch.rand(1, 2, 3, 32, 32, generator=generator) * 2 - 1
    ids = torch.randint(0, 1000, (2, 7), generator=generator)
    with torch.no_grad():
        loaded = load_image_unet(resolved)(latents, torch.tensor([10, 500]), encoder_hidden_states=tokens).sample
        original = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=tokens).sample
        torch.testing.assert_close(loaded, original, rtol=0, atol=0)
        codec, ours = LatentCodec.from_folder(resolved), LatentCodec(vae)
        torch.testing.assert_close(
            codec.vae.encode(frames[0]).latent_dist.mean, ours.vae.encode(frames[0]).latent_dist.mean, rtol=0, atol=0
        )
        torch.testing.assert_close(codec.decode(latents[None]), ours.decode(latents[None]), rtol=0, atol=0)
        back = CLIPTextModel.from_pretrained(resolved / "text_encoder").eval()
        torch.testing.assert_close(back(ids).last_hidden_state, text(ids).last_hidden_state, rtol=0, atol=0)

    # Importing the name again is refused; --replace takes the new folder and nothing of the old.
    with pytest.raises(
        ValueError, match=f"weights named '{name}' already exist at s3://{bucket}/weights/{name}/; pass --replace"
    ):
        import_weights(name, folder, store, bucket=bucket)
    (folder / "tokenizer" / "vocab.json").unlink()
    replaced = import_weights(name, folder, store, replace=True, bucket=bucket)
    assert set(replaced.files) == PUBLISHED - {"tokenizer/vocab.json"}
    assert not store.exists(f"s3://{bucket}/weights/{name}/tokenizer/vocab.json")
    assert resolve_weights(f"weights:{name}", store, cache, bucket=bucket) == resolved  # a new manifest: fetched again
    assert not (resolved / "tokenizer").exists()

    # A file changed in the store after import is refused when it is fetched.
    store.put_bytes(f"s3://{bucket}/weights/{name}/unet/diffusion_pytorch_model.safetensors", b"not the weights")
    with pytest.raises(ChecksumMismatchError, match="unet/diffusion_pytorch_model.safetensors: sha256 .* is not the"):
        resolve_weights(f"weights:{name}", store, tmp_path / "fresh-cache", bucket=bucket)


def test_single_file_weights_resolve_to_the_file(store, bucket, tmp_path):
    with fixed_seed(1):
        head = _aesthetic_head(64)
    path = tmp_path / "aesthetic.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    name = f"aesthetic-{random.getrandbits(24):06x}"
    manifest = import_weights(name, path, store, bucket=bucket)
    assert (manifest.kind, manifest.architecture, list(manifest.files)) == (
        "aesthetic_mlp",
        "mlp-64",
        ["aesthetic.pth"],
    )
    # Two ranks resolving at once: one whole copy, no partial folder left behind.
    with ThreadPoolExecutor(2) as pool:
        both = list(
            pool.map(lambda _: resolve_weights(f"weights:{name}", store, tmp_path / "cache", bucket=bucket), "ab")
        )
    resolved = tmp_path / "cache" / "weights" / name / "aesthetic.pth"
    assert both == [resolved, resolved] and resolved.read_bytes() == path.read_bytes()
    # the copy and the lock the resolvers took turns on (the second found the first's copy)
    assert sorted(p.name for p in (tmp_path / "cache" / "weights").iterdir()) == [f".{name}.lock", name]
    assert sorted(p.name for p in resolved.parent.iterdir()) == ["aesthetic.pth", "weights.json"]


def test_a_half_imported_entry_is_not_listed_and_does_not_resolve(store, bucket, tmp_path):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    store.publish_folder(tmp_path / "half", f"s3://{bucket}/weights/half")  # files, no weights.json
    assert "half" not in [m.name for m in list_weights(store, bucket)]
    message = f"no weights named half in s3://{bucket}/weights/; import them with `vdm weights import half PATH`"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_weights("weights:half", store, tmp_path / "cache", bucket=bucket)


# -- FVD's networks: the I3D checkpoint, a transformers VideoMAE folder ------------------------------------


def test_the_i3d_checkpoint_is_checked_key_by_key(tmp_path):
    from model.i3d import InceptionI3d

    with torch.device("meta"):
        shapes = state_shapes(InceptionI3d())
    # Converted from TF (i3d_pretrained_400.pt): no num_batches_tracked.
    converted = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(_cheap(converted), path)
    checked = check_weights(path)  # detected by its keys
    assert (checked.kind, checked.architecture, checked.files) == ("i3d", "InceptionI3d-400", (path.name,))
    torch.save(_cheap(shapes), path)  # a state_dict() of our own network has them
    assert check_weights(path, kind="i3d").architecture == "InceptionI3d-400"
    with pytest.raises(ValueError, match="holds an InceptionI3d-400, not an InceptionI3d-600"):
        check_weights(path, kind="i3d", architecture="InceptionI3d-600")

    key = "Mixed_4c.b1b.bn.running_var"
    reshaped = r"1 of another shape \(logits.conv3d.weight \(400, 1000, 1, 1, 1\) instead of \(400, 1024, 1, 1, 1\)\)"
    for broken, message in [
        ({k: v for k, v in converted.items() if k != key}, rf"1 missing \({key}\)"),
        (converted | {"logits.conv3d.weight": (400, 1000, 1, 1, 1)}, reshaped),
    ]:
        torch.save(_cheap(broken), path)
        with pytest.raises(ValueError, match=f"as the Kinetics I3D: keys do not match: {message}") as e:
            check_weights(path)
        assert "\n" not in str(e.value)


def test_a_transformers_model_folder_is_a_diffusers_entry(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEModel

    from model.fvd import TINY_VIDEOMAE_CONFIG

    with fixed_seed(0):
        VideoMAEModel(VideoMAEConfig(**TINY_VIDEOMAE_CONFIG)).save_pretrained(tmp_path / "videomae")
    checked = check_weights(tmp_path / "videomae")
    assert (checked.kind, checked.architecture) == ("diffusers", "VideoMAEModel")
    assert checked.files == ("config.json", "model.safetensors")
    config = json.loads((tmp_path / "videomae" / "config.json").read_text())
    (tmp_path / "videomae" / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"\(VideoMAEModel\): keys do not match: \d+ missing \(encoder.layer.2."):
        check_weights(tmp_path / "videomae")
    (tmp_path / "videomae" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ValueError, match=r"config.json names no class \(_class_name or architectures\)"):
        check_weights(tmp_path / "videomae")


# -- the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, error",
    [
        (["--kind", "onnx"], "error: unknown kind 'onnx': one of diffusers, open_clip, aesthetic_mlp, i3d"),
        (
            ["--architecture", "ViT-Q-99"],
            "error: unknown open_clip architecture 'ViT-Q-99': see open_clip.list_models()",
        ),
        (["--kind", "open_clip"], "error: an open_clip checkpoint needs --architecture"),
    ],
)
def test_cli_import_refuses_with_one_error_line(args, error, tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"x": torch.zeros(1)}, path)
    result = CliRunner().invoke(main, ["weights", "import", "clip", str(path), *args])
    assert result.exit_code == 1 and result.output.splitlines()[0].startswith(error), result.output
    assert len(result.output.splitlines()) == 1


def test_cli_import_of_a_missing_path_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["weights", "import", "sd21", str(tmp_path / "nowhere")])
    assert (result.exit_code, result.output) == (1, f"error: no such file or folder: {tmp_path / 'nowhere'}\n")


def test_cli_imports_and_lists(stack, settings, tmp_path):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_cheap(LAION_AESTHETIC_KEYS), path)
    name = f"laion-aesthetic-{random.getrandbits(24):06x}"
    args = ["weights", "import", name, str(path), "--architecture", "ViT-L-14", "--kind", "aesthetic_mlp"]
    result = CliRunner().invoke(main, [*args, "--source", "LAION improved-aesthetic-predictor"])
    assert result.exit_code == 0, result.output
    assert f"published weights:{name}" in result.output and "aesthetic_mlp" in result.output
    assert f"s3://{settings.data_bucket}/weights/{name}/" in result.output
    listed = CliRunner().invoke(main, ["weights", "list"])
    assert listed.exit_code == 0
    row = next(line for line in listed.output.splitlines() if line.startswith(name))
    assert row.split()[:4] == [name, "aesthetic_mlp", "ViT-L-14", "1"] and "LAION" in row
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and again.output.startswith(f"error: weights named '{name}' already exist")
