"""EDM pieces against hand-computed values; samplers against oracle denoisers whose
answer is known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from model.diffusion import (
    Denoiser,
    EDMScaling,
    denoising_loss,
    edm_loss_weight,
    lognormal_sigmas,
    shifted_p_mean,
)
from model.samplers import frame_guidance, guided, karras_sigmas, sample_euler, sample_heun

SIGMA_DATA = 0.5


def test_scalings_by_hand():
    c_skip, c_out, c_in, c_noise = EDMScaling(SIGMA_DATA)(torch.tensor([1.0, 0.5]))
    # sigma = 1: total = 1.25; sigma = 0.5: total = 0.5
    torch.testing.assert_close(c_skip, torch.tensor([0.25 / 1.25, 0.25 / 0.5]))
    torch.testing.assert_close(c_out, torch.tensor([0.5 / math.sqrt(1.25), 0.25 / math.sqrt(0.5)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(0.5)]))
    torch.testing.assert_close(c_noise, torch.tensor([0.0, 0.25 * math.log(0.5)]))
    torch.testing.assert_close(edm_loss_weight(torch.tensor([1.0, 0.5])), torch.tensor([5.0, 8.0]))


def test_lognormal_sigmas_have_the_requested_log_moments():
    sigmas = lognormal_sigmas(200_000, p_mean=-1.2, p_std=1.2, generator=torch.Generator().manual_seed(0))
    assert sigmas.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigmas.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_higher_resolution_shifts_towards_more_noise():
    assert shifted_p_mean(-1.2, 64 * 64, 64 * 64) == -1.2
    # four times the pixels: sigma doubles, ln(sigma) moves by ln 2
    assert shifted_p_mean(-1.2, 128 * 128, 64 * 64) == pytest.approx(-1.2 + math.log(2))
    assert shifted_p_mean(0.0, 576 * 1024, 320 * 576) > shifted_p_mean(0.0, 320 * 576, 256 * 384) > 0


def test_karras_schedule():
    sigmas = karras_sigmas(10, 0.002, 80.0)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert torch.all(sigmas[:-1] > sigmas[1:])
    spacing = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(spacing.diff(), spacing.diff()[:1].expand(9), rtol=1e-4, atol=1e-6)


# Data: N(mu, s^2) per element. Its ideal denoiser is known in closed form.
MU, S = 0.7, 0.3


def ideal_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


class OracleNetwork(torch.nn.Module):
    """The network that makes `Denoiser` ideal: it undoes the preconditioning (sigma from
    c_noise, x from c_in x) and returns the raw output F the preconditioning expects."""

    def forward(self, scaled_x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = EDMScaling(SIGMA_DATA)(sigma)
        shape = (-1, *([1] * (scaled_x.ndim - 1)))
        x = scaled_x / c_in.reshape(shape)
        return (ideal_denoiser(x, sigma) - c_skip.reshape(shape) * x) / c_out.reshape(shape)


def test_preconditioned_oracle_is_the_ideal_denoiser():
    denoiser = Denoiser(OracleNetwork(), EDMScaling(SIGMA_DATA))
    x = torch.randn(4, 3, 2, 5, 5)
    sigma = torch.tensor([0.01, 0.5, 3.0, 50.0])
    torch.testing.assert_close(denoiser(x, sigma), ideal_denoiser(x, sigma), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,steps", [(sample_heun, 50), (sample_euler, 200)])
def test_sampling_with_the_oracle_recovers_the_data_distribution(sampler, steps):
    denoiser = Denoiser(OracleNetwork(), EDMScaling(SIGMA_DATA))
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    x = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    samples = sampler(denoiser, x, sigmas)
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(S, rel=0.03)


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    sigmas = karras_sigmas(25, 0.002, 80.0)
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    errors = {
        name: abs(f(ideal_denoiser, x, sigmas).std().item() - S)
        for name, f in (("euler", sample_euler), ("heun", sample_heun))
    }
    assert errors["heun"] < errors["euler"] / 2


def test_a_point_mass_is_recovered_exactly():
    target = torch.tensor([[1.5, -2.0, 0.25]])
    sigmas = karras_sigmas(5)
    x = torch.randn(3, 3) * sigmas[0]
    out = sample_heun(lambda x, sigma: target.expand_as(x), x, sigmas)
    torch.testing.assert_close(out, target.expand(3, 3))


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_samplers_call_back_once_per_step_in_order(sampler):
    steps = []
    sampler(lambda x, sigma: torch.zeros_like(x), torch.randn(2, 3), karras_sigmas(7), steps.append)
    assert steps == list(range(7))


def test_oracle_has_the_lowest_training_loss():
    denoiser = Denoiser(OracleNetwork(), EDMScaling(SIGMA_DATA))
    generator = torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(4096, 16, generator=generator)
    sigma = lognormal_sigmas(4096, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    oracle = denoising_loss(denoiser, x0, sigma, noise=noise).mean()
    worse = Denoiser(lambda x, c: OracleNetwork()(x, c) * 1.1, EDMScaling(SIGMA_DATA))
    assert oracle < denoising_loss(worse, x0, sigma, noise=noise).mean()
    # The oracle's expected loss is the weighted posterior variance s^2 sigma^2 / (s^2 + sigma^2).
    expected = edm_loss_weight(sigma) * S**2 * sigma**2 / (S**2 + sigma**2)
    assert oracle.item() == pytest.approx(expected.mean().item(), rel=0.05)


def test_guidance_grows_across_frames():
    scale = frame_guidance(5, 1.0, 3.0)
    torch.testing.assert_close(scale, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    cond = lambda x, s: torch.ones_like(x)  # noqa: E731
    uncond = lambda x, s: torch.zeros_like(x)  # noqa: E731
    out = guided(cond, uncond, scale)(torch.zeros(2, 5, 4, 3, 3), torch.ones(2))
    torch.testing.assert_close(out[:, :, 0, 0, 0], scale.expand(2, 5))
    torch.testing.assert_close(guided(cond, uncond, 2.0)(torch.zeros(1, 3), torch.ones(1)), torch.full((1, 3), 2.0))
