"""FVD's networks loaded the way an evaluation loads them: imported into the real local
object store and resolved back, from local files, or seeded random where that is allowed."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import VideoMAEConfig, VideoMAEForPreTraining

from components.common.weights import import_weights
from components.curation.neural import RandomWeightsNotAllowed
from components.evaluation.networks import load_i3d, load_videomae
from model.fvd import TINY_VIDEOMAE_CONFIG, VideoMAEFeatures, video_features
from model.i3d import InceptionI3d
from model.openclip import fixed_seed


@pytest.fixture(scope="module")
def bucket(store) -> str:
    name = f"fvd-networks-{random.getrandbits(32):08x}"
    store.ensure_bucket(name)
    return name


def test_missing_weights_are_refused_unless_random_networks_are_allowed(tmp_path):
    with pytest.raises(RandomWeightsNotAllowed, match=r"import the public checkpoint i3d_pretrained_400.pt once") as e:
        load_i3d(None, None, tmp_path, allow_random=False)
    assert "`vdm weights import i3d-kinetics-400 PATH`" in str(e.value) and "allow random networks" in str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.raises(RandomWeightsNotAllowed, match=r"`vdm weights import videomae-base PATH`"):
        load_videomae(None, None, tmp_path, allow_random=False)

    first, random_weights = load_i3d(None, None, tmp_path, allow_random=True)
    second, _ = load_i3d(None, None, tmp_path, allow_random=True)
    assert random_weights and isinstance(first, InceptionI3d) and not first.training
    again = second.state_dict()
    assert all(torch.equal(value, again[key]) for key, value in first.state_dict().items())
    tiny, random_weights = load_videomae(None, None, tmp_path, allow_random=True, random_config=TINY_VIDEOMAE_CONFIG)
    assert random_weights and isinstance(tiny, VideoMAEFeatures) and (tiny.frames, tiny.size) == (4, 32)


def test_an_imported_i3d_checkpoint_loads_with_its_weights(store, bucket, tmp_path):
    with fixed_seed(7):
        source = InceptionI3d()
    # The layout of i3d_pretrained_400.pt: converted from TF, no num_batches_tracked.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    name = f"i3d-{random.getrandbits(24):06x}"
    manifest = import_weights(name, path, store, bucket=bucket)
    assert (manifest.kind, manifest.architecture) == ("i3d", "InceptionI3d-400")

    for ref in (f"s3://{bucket}/weights/{name}", str(path)):
        network, random_weights = load_i3d(ref, store, tmp_path / "cache", allow_random=False)
        assert not random_weights and not network.training
        loaded = network.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())

    torch.save({k: v for k, v in state.items() if k != "Mixed_5b.b0.conv3d.weight"}, path)
    with pytest.raises(ValueError, match=r"as the Kinetics I3D: keys do not match: 1 missing \(Mixed_5b.b0.conv3d"):
        load_i3d(str(path), None, tmp_path / "cache", allow_random=False)


def test_an_imported_videomae_folder_gives_the_same_features(store, bucket, tmp_path):
    # The layout of the public self-supervised checkpoints (MCG-NJU/videomae-base): the
    # pretraining model, its encoder under `videomae.` beside the decoder.
    with fixed_seed(3):
        pretraining = VideoMAEForPreTraining(VideoMAEConfig(**TINY_VIDEOMAE_CONFIG)).eval()
    pretraining.save_pretrained(tmp_path / "videomae")
    name = f"videomae-{random.getrandbits(24):06x}"
    manifest = import_weights(name, tmp_path / "videomae", store, bucket=bucket)
    assert (manifest.kind, manifest.architecture) == ("diffusers", "VideoMAEForPreTraining")

    videos = torch.rand(2, 6, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = video_features(VideoMAEFeatures(pretraining.videomae), videos)
    ref = f"s3://{bucket}/weights/{name}"
    network, random_weights = load_videomae(ref, store, tmp_path / "cache", allow_random=False)
    assert not random_weights and not network.training
    torch.testing.assert_close(torch.from_numpy(video_features(network, videos)), torch.from_numpy(expected))

    with pytest.raises(ValueError, match="is not a transformers VideoMAE folder"):
        load_videomae(str(tmp_path), None, tmp_path / "cache", allow_random=False)
    weights_file = tmp_path / "videomae" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights_file).items() if "layer.0.output" not in k}, weights_file)
    with pytest.raises(ValueError, match=r"lacks 2 of the VideoMAE encoder's weights \(encoder.layer.0.output.dense"):
        load_videomae(str(tmp_path / "videomae"), None, tmp_path / "cache", allow_random=False)
