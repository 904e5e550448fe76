"""Samplers as pure functions with one signature, `sample(denoise, x, sigmas, callback) -> x`
(k-diffusion style; `callback(i)` after step i, e.g. to time steps or show progress),
over a Karras noise schedule; classifier-free guidance wraps
a denoiser and may grow across video frames (SVD: low for the first, high for the
last frame).

`denoise(x, sigma)` returns the denoised estimate D(x, sigma); `sigma` is a (B,)
tensor; `sigmas` is the decreasing schedule ending in 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int], None]
PairFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """`steps` noise levels from sigma_max to sigma_min, spaced evenly in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _derivative(denoise: DenoiseFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    return (x - denoise(x, s)) / sigma


@torch.no_grad()
def sample_euler(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """First-order steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    for i, (sigma, next_sigma) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True)):
        x = x + (next_sigma - sigma) * _derivative(denoise, x, sigma)
        if callback:
            callback(i)
    return x


@torch.no_grad()
def sample_heun(
    denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Heun's second-order method (EDM's Algorithm 1, deterministic); Euler on the last step to 0."""
    for i, (sigma, next_sigma) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True)):
        d = _derivative(denoise, x, sigma)
        x_next = x + (next_sigma - sigma) * d
        if next_sigma > 0:
            d_next = _derivative(denoise, x_next, next_sigma)
            x_next = x + (next_sigma - sigma) * (d + d_next) / 2
        x = x_next
        if callback:
            callback(i)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def frame_guidance(num_frames: int, scale_min: float, scale_max: float) -> torch.Tensor:
    """Guidance per frame rising linearly from the first to the last (constant if equal)."""
    return torch.linspace(scale_min, scale_max, num_frames)


def _guidance(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    w = scale
    if isinstance(scale, torch.Tensor):
        w = scale.to(d_cond).reshape(1, -1, *([1] * (d_cond.ndim - 2)))
    return d_uncond + w * (d_cond - d_uncond)


def guided(conditional: DenoiseFn, unconditional: DenoiseFn, scale: float | torch.Tensor) -> DenoiseFn:
    """Classifier-free guidance: D_u + w (D_c - D_u). A tensor `scale` of shape (T,)
    applies per frame to video batches (B, T, ...)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _guidance(conditional(x, sigma), unconditional(x, sigma), scale)

    return denoise


def batched_pair(denoiser: Callable[..., torch.Tensor], cond: dict, uncond: dict) -> PairFn:
    """(D_c, D_u) from one `denoiser(x, sigma, **inputs)` call on a batch of the conditional
    then the unconditional inputs (one network evaluation per step, as SVD's pipeline)."""
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def pair(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_cond, d_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return d_cond, d_uncond

    return pair


def guided_pair(both: PairFn, scale: float | torch.Tensor) -> DenoiseFn:
    """Classifier-free guidance as `guided`, from one call `both(x, sigma) -> (D_c, D_u)`:
    the conditional and unconditional inputs in one batch, one network evaluation per
    step instead of two (as diffusers' pipelines do)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_cond, d_uncond = both(x, sigma)
        return _guidance(d_cond, d_uncond, scale)

    return denoise
