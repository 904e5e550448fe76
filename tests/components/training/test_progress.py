"""What a training run shows while it trains (a bar on a terminal, lines elsewhere) and the
frame grid it logs per sampling step."""

from __future__ import annotations

import re

import numpy as np
import torch

from components.training.run import TrainingProgress, frame_grid


def test_without_a_terminal_each_log_step_is_a_line_with_rate_and_time_left(capsys, monkeypatch):
    clock = iter([100.0, 102.0, 104.0, 106.0])
    monkeypatch.setattr("components.training.run.time.perf_counter", lambda: next(clock))
    progress = TrainingProgress(max_steps=20, terminal=False)
    progress(0, {"val_loss": 0.81234})
    progress(5, {"loss": 0.5, "samples_per_s": 10.0})
    progress(10, {"loss": 0.4, "samples_per_s": 10.0})
    progress(10, {"val_loss": 0.75, "val_loss/sigma_1": 0.7})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "step 0/20  val_loss 0.8123"
    assert lines[1] == "step 5/20  loss 0.5  samples_per_s 10  2.5 steps/s  eta 0:00:06"  # 5 steps in 2 s
    assert lines[2] == "step 10/20  loss 0.4  samples_per_s 10  2.5 steps/s  eta 0:00:04"
    assert lines[3] == "step 10/20  val_loss 0.75"


def test_on_a_terminal_a_bar_shows_loss_rate_and_time_left(capsys):
    progress = TrainingProgress(max_steps=20, terminal=True)
    progress(0, {"val_loss": 0.8})
    progress(10, {"loss": 0.4321, "samples_per_s": 10.0, "lr": 0.001})
    err = capsys.readouterr().err
    assert "step 0/20  val_loss 0.8" in err
    assert re.search(r"10/20 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step), loss=0.4321, samples_per_s=10\]", err), err
    progress(20, {"loss": 0.3})
    assert progress.bar.n == 20 and progress.bar.disable  # closed at the last step


def test_frame_grid_is_a_row_of_frames_per_video_scaled_up():
    ramp = torch.linspace(-1, 1, 12).reshape(12, 1, 1, 1).expand(12, 3, 16, 24)  # frame i is one grey level
    grid = frame_grid([ramp, -ramp], columns=4, min_side=64)
    assert grid.shape == (2 * 64, 4 * 96, 3) and grid.dtype == np.uint8  # 16 px scaled by 4
    top = grid[0, ::96, 0]  # the first pixel of each column: frames 0, 4, 7, 11 (spread over the clip)
    assert top.tolist() == [0, 93, 162, 255]
    assert grid[64, ::96, 0].tolist() == [255, 162, 93, 0]
