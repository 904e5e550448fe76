"""Training pieces: strategies, a loss that falls, EMA, and a resume that continues the same curve."""

from __future__ import annotations

import pytest
import torch

from components.sample_data.render import moving_shapes
from model.diffusion import Denoiser, denoising_loss, lognormal_sigmas
from model.networks import CONFIGS, image_unet, inflate, is_temporal
from model.training import (
    EMA,
    OptimConfig,
    apply_strategy,
    load_checkpoint,
    optimization_step,
    optimizer_and_schedule,
    save_checkpoint,
    seed_everything,
)


@pytest.fixture(scope="module")
def video():
    torch.manual_seed(0)
    return inflate(image_unet(CONFIGS["tiny"]))


@pytest.mark.parametrize("strategy", ["full", "partial", "spatial"])
def test_strategies_freeze_exactly_the_right_parameters(video, strategy):
    params = apply_strategy(video, strategy)
    trained = {n for n, p in video.named_parameters() if p.requires_grad}
    temporal = {n for n, _ in video.named_parameters() if is_temporal(n)}
    everything = {n for n, _ in video.named_parameters()}
    expected = {"full": everything, "partial": temporal, "spatial": everything - temporal}[strategy]
    assert trained == expected and len(params) == len(expected)
    assert 0 < len(temporal) < len(everything)


class Wrapped(torch.nn.Module):
    """An image UNet as a Denoiser network: (scaled x, c_noise, text) -> F."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, text):
        return self.unet(x, c_noise, text).sample


def _setup(seed: int = 0):
    seed_everything(seed)
    denoiser = Denoiser(Wrapped(image_unet(CONFIGS["tiny"])))
    params = apply_strategy(denoiser, "full")
    optimizer, schedule = optimizer_and_schedule(params, OptimConfig(lr=2e-3, warmup_steps=5))
    return denoiser, params, optimizer, schedule, EMA(params, decay=0.9)


def _shapes() -> torch.Tensor:
    """Eight 16x16 frames of a moving disc, as 4-channel 'latents' in about [-0.5, 0.5]."""
    frames = torch.from_numpy(moving_shapes(8, 16, 16, num_shapes=1, radius_range=(3, 4), seed=7).frames).float()
    rgb = frames.permute(0, 3, 1, 2) / 255 - 0.5
    return torch.cat([rgb, rgb.mean(1, keepdim=True)], dim=1)


DATA = _shapes()
TEXT = torch.zeros(8, 3, CONFIGS["tiny"].cross_attention_dim)


def _step(denoiser, params, optimizer, schedule, ema) -> float:
    sigma = lognormal_sigmas(len(DATA))  # from the global RNG: restored by a resume
    loss = denoising_loss(denoiser, DATA, sigma, text=TEXT).mean()
    optimization_step(loss, params, optimizer, schedule, ema, grad_clip=1.0)
    return loss.item()


def _eval_loss(denoiser) -> float:
    generator = torch.Generator().manual_seed(3)
    sigma = lognormal_sigmas(len(DATA), generator=generator)
    noise = torch.randn(DATA.shape, generator=generator)
    with torch.no_grad():
        return denoising_loss(denoiser, DATA, sigma, noise=noise, text=TEXT).mean().item()


def test_loss_falls_within_a_few_dozen_steps():
    denoiser, params, optimizer, schedule, ema = _setup()
    before = _eval_loss(denoiser)
    for _ in range(40):
        _step(denoiser, params, optimizer, schedule, ema)
    assert _eval_loss(denoiser) < 0.6 * before


def test_ema_tracks_the_weights():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.5)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.75))


def test_ema_weights_applied_for_a_while_then_the_training_weights_return():
    param = torch.nn.Parameter(torch.ones(3))
    ema = EMA([param], decay=0.5)
    with torch.no_grad():
        param.fill_(3.0)
    ema.update()  # shadow 2.0
    with ema.applied():
        torch.testing.assert_close(param.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(param.detach(), torch.full((3,), 3.0))


def test_resume_from_a_checkpoint_continues_the_same_loss_curve(tmp_path):
    run = _setup()
    uninterrupted = [_step(*run) for _ in range(10)]

    first = _setup()
    losses = [_step(*first) for _ in range(5)]
    denoiser, _, optimizer, schedule, ema = first
    save_checkpoint(tmp_path / "step-5", denoiser, optimizer, schedule, ema, {"step": 5, "data_position": 40})
    del first

    resumed = _setup(seed=123)  # a fresh process: other weights, other RNG state until the load
    denoiser, _, optimizer, schedule, ema = resumed
    state = load_checkpoint(tmp_path / "step-5", denoiser, optimizer, schedule, ema)
    assert state == {"step": 5, "data_position": 40}
    losses += [_step(*resumed) for _ in range(5)]
    assert losses == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)
    assert schedule.get_last_lr() == run[3].get_last_lr()


class _RunsCode:
    """Unpickled, it would call `path.write_text` (any callable: os.system just the same)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).write_text, (self.path, "ran"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    denoiser, _, optimizer, schedule, ema = _setup()
    folder = save_checkpoint(tmp_path / "step-1", denoiser, optimizer, schedule, ema, {"step": 1})
    marker = tmp_path / "marker.txt"
    extra = torch.load(folder / "optimizer.pt", weights_only=True)  # what a checkpoint holds loads safely
    torch.save({**extra, "schedule": _RunsCode(marker)}, folder / "optimizer.pt")  # planted in the bucket
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(folder, denoiser, optimizer, schedule, ema)
    assert not marker.exists()
