"""EDM diffusion (Karras et al. 2022), as SVD trains it: preconditioning, loss
weighting and noise-level sampling are separate small pieces, composed by
`Denoiser` and `denoising_loss`.

Shapes: data `x` is (B, ...) — images (B, C, H, W) or videos (B, T, C, H, W); a
noise level `sigma` is (B,) and broadcasts over the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A network: (scaled input, c_noise, conditioning) -> raw output F.
Network = Callable[..., torch.Tensor]


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class EDMScaling:
    """c_skip, c_out, c_in, c_noise of EDM's preconditioning."""

    sigma_data: float = 0.5

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        total = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1 / total.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out^2: every noise level contributes a unit-variance target."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def lognormal_sigmas(
    batch: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2)."""
    return (p_mean + p_std * torch.randn(batch, generator=generator, device=device)).exp()


def shifted_p_mean(p_mean: float, pixels: int, base_pixels: int) -> float:
    """More noise as resolution grows: the same signal-to-noise per image needs sigma
    scaled by sqrt(pixels / base_pixels) (neighbouring pixels average noise away), a
    shift of ln(sigma)'s mean by half the log of the pixel ratio. SVD shifts towards
    more noise from its 256x384 stage to 320x576 and 576x1024."""
    return p_mean + 0.5 * math.log(pixels / base_pixels)


class Denoiser(torch.nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond): the network only ever
    sees unit-variance inputs and predicts unit-variance targets."""

    def __init__(self, network: torch.nn.Module | Network, scaling: EDMScaling = EDMScaling()):
        super().__init__()
        self.network = network
        self.scaling = scaling

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **conditioning) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        raw = self.network(x * _expand(c_in, x), c_noise, **conditioning)
        return _expand(c_skip, x) * x + _expand(c_out, x) * raw


def denoising_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **conditioning,
) -> torch.Tensor:
    """Weighted denoising MSE per sample, shape (B,)."""
    noise = torch.randn_like(x0) if noise is None else noise
    denoised = denoiser(x0 + _expand(sigma, x0) * noise, sigma, **conditioning)
    weights = (weight or (lambda s: edm_loss_weight(s, denoiser.scaling.sigma_data)))(sigma)
    return weights * (denoised - x0).pow(2).flatten(1).mean(dim=1)
