"""Motion scores: flow on frames scaled with their aspect ratio."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from components.curation import motion
from components.curation.config import Motion


@pytest.mark.parametrize("height", [72, 96, 180])
def test_the_same_motion_scores_the_same_across_and_down_at_any_height(height):
    """Flow runs on frames scaled with their aspect ratio (never stretched), so a pan and a tilt
    of the same speed score the same, also on frames under the flow height."""
    rng = np.random.default_rng(3)
    texture = cv2.resize(rng.random((60, 60)).astype(np.float32), (height + 40, height + 40))
    texture = (texture * 255).astype(np.uint8)
    across = [texture[:height, 2 * t : 2 * t + height] for t in range(8)]
    down = [texture[2 * t : 2 * t + height, :height] for t in range(8)]
    config = Motion()
    pan, tilt = (motion.estimate(frames, [0, 2, 4, 6], config) for frames in (across, down))
    scale = min(1.0, config.flow_height / height)  # px per frame at the flow size
    assert pan.score == pytest.approx(2 * scale, rel=0.1) and tilt.score == pytest.approx(2 * scale, rel=0.1)
    assert pan.score == pytest.approx(tilt.score, rel=0.05)
    assert (pan.camera_motion, tilt.camera_motion) == ("pan_right", "tilt_down")  # the window moves right, down
