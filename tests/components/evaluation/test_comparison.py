"""The side-by-side evaluation page: its content without a browser, and what headless Chromium shows."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageSequence

from components.evaluation.comparison import (
    MAX_FRAMES,
    NOT_PROMOTED_COLOUR,
    TABLE_HEADER_COLOUR,
    VIDEO_MAX_SIDE,
    WARNING_COLOUR,
    ComparisonPage,
    FigureRow,
    SideBySide,
    animated_webp,
    comparison_html,
)

RED, BLUE, BACKGROUND = (255, 0, 0), (0, 128, 255), 40  # BLUE: not the links' blue


def moving_square(colour: tuple[int, int, int], frames: int = 16, size: int = 32, square: int = 12) -> np.ndarray:
    """A square of one colour moving right over a dark background."""
    video = np.full((frames, size, size, 3), BACKGROUND, np.uint8)
    for t in range(frames):
        x = 2 + t % (size - square - 4)
        video[t, 10 : 10 + square, x : x + square] = colour
    return video


def page(**changes) -> ComparisonPage:
    fields = dict(
        model="tiny-video",
        kind="text-to-video",
        candidate_version="3",
        champion_version="2",
        candidate_training_run="http://127.0.0.1:5000/#/experiments/1/runs/abc",
        champion_training_run="http://127.0.0.1:5000/#/experiments/1/runs/def",
        evaluation_run="http://127.0.0.1:5000/#/experiments/2/runs/ghi",
        rows=[SideBySide("a red square moves right", 7, moving_square(RED), moving_square(BLUE))],
        figures=[
            FigureRow("fvd", 455.0, 412.3, "primary", "improve by > 2", False),
            FigureRow("clip_score", 0.281, 0.279, "guard", "not worse by > 0.005", True),
            FigureRow("clips", 256, 256, "size", ">= 256 clips", True),
            FigureRow("motion_speed_error", 0.125, None, ""),
        ],
        decision="fvd got worse by 42.7; the champion stays.",
        promoted=False,
        policy="version: 3\nprimary: {metric: fvd, margin: 2}\n",
    )
    return ComparisonPage(**{**fields, **changes})


def webps(document: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r'src="data:image/webp;base64,([^"]+)"', document)
    ]


def test_videos_are_enlarged_looping_webp_at_real_speed():
    video = moving_square(RED, frames=40)
    image = Image.open(io.BytesIO(animated_webp(video, fps=8.0)))
    assert image.format == "WEBP" and image.size == (160, 160)
    frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    # 40 frames at most 16: every third, each shown three source frames long.
    assert len(frames) == 14 and image.info["duration"] == 375 and image.info["loop"] == 0
    # Nearest-neighbour: the square's inside keeps its colour; it moves right by 3 source px (15 px) a frame.
    assert np.abs(frames[0][80, 40].astype(int) - RED).max() < 30
    assert np.abs(frames[0][80, 120].astype(int) - BACKGROUND).max() < 30
    centres = [np.nonzero((f[:, :, 0] > 200) & (f[:, :, 1] < 60))[1].mean() for f in frames[:3]]
    assert np.allclose(np.diff(centres), 15, atol=1), centres
    large = Image.open(io.BytesIO(animated_webp(np.zeros((4, 480, 640, 3), np.uint8), fps=8.0)))
    assert large.size == (VIDEO_MAX_SIDE, 240)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        animated_webp(np.zeros((4, 32, 32), np.uint8), fps=8.0)


def test_page_shows_versions_links_figures_and_decision():
    document = comparison_html(page())
    assert "candidate v3 against champion v2" in document
    for run in ("runs/abc", "runs/def", "runs/ghi"):
        assert f'href="http://127.0.0.1:5000/#/experiments/{1 if run != "runs/ghi" else 2}/{run}"' in document
    assert "Not promoted: the champion stays" in document and "fvd got worse by 42.7" in document
    assert 'class="banner decision not-promoted"' in document
    row = re.search(r'<tr class="primary">(.*?)</tr>', document).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row) == ["fvd", "455", "412.3", "+42.7", "primary",
                                                         "improve by &gt; 2", "fail"]  # fmt: skip
    info = re.search(r'<tr class="">(.*?)</tr>', document).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", info) == ["motion_speed_error", "0.125", "-", "-", "", "", ""]
    assert "<pre>version: 3\nprimary: {metric: fvd, margin: 2}\n</pre>" in document
    assert "Random weights" not in document
    assert [image.size for image in webps(document)] == [(160, 160), (160, 160)]
    assert "Promoted: the candidate" in comparison_html(page(promoted=True))
    assert "No gate decision" in comparison_html(page(promoted=None, model=None, candidate_version=None))


def test_text_is_escaped_and_only_http_links_are_links():
    hostile = "<script>alert(1)</script>"
    document = comparison_html(
        page(
            model=f"m{hostile}",
            rows=[SideBySide(hostile, 1, moving_square(RED), None, label=f"key {hostile}")],
            figures=[FigureRow(f"x{hostile}", 1.0, 2.0, "guard", hostile)],
            decision=hostile,
            policy=hostile,
            random_networks=(hostile,),
            evaluation_run="javascript:alert(1)",
        )
    )
    assert "<script" not in document
    # Title, heading, decision, warning, figure, requirement, policy, prompt, label.
    assert document.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 9
    assert 'href="javascript' not in document and "this evaluation: run javascript:alert(1)" in document


def test_no_champion_yet():
    document = comparison_html(
        page(
            champion_version=None,
            champion_training_run=None,
            rows=[SideBySide("", 4, moving_square(RED), None, label="from the clip's first frame")],
            figures=[FigureRow("fvd", 455.0, None, "primary")],
            promoted=True,
        )
    )
    assert "candidate v3 against no champion yet" in document and "champion v2" not in document
    assert "runs/def" not in document
    assert '<div class="none">no champion yet</div>' in document and len(webps(document)) == 1
    assert "from the clip&#x27;s first frame · seed 4" in document
    empty_prompt = comparison_html(page(rows=[SideBySide("", 5, moving_square(RED), moving_square(BLUE))]))
    assert "(the empty prompt) · seed 5" in empty_prompt
    itself = page(champion_version="3", rows=[SideBySide("p", 1, moving_square(RED), None)])
    assert '<div class="none">the candidate is the champion</div>' in comparison_html(itself)
    other_kind = page(rows=[SideBySide("p", 1, moving_square(RED), None)])
    assert '<div class="none">no champion videos</div>' in comparison_html(other_kind)


def test_random_networks_warning():
    document = comparison_html(page(random_networks=("i3d", "clip")))
    assert '<div class="banner warning">Random weights: the evaluation networks i3d, clip ran' in document


def test_page_size_is_capped():
    noise = np.random.default_rng(0).integers(0, 256, (32, 512, 512, 3), np.uint8)
    document = comparison_html(page(rows=[SideBySide(f"prompt {i}", i, noise, noise) for i in range(20)]))
    shown = len(re.findall(r'<div class="row">', document))
    assert 1 <= shown < 8 and f"Showing {shown} of 20 prompt-and-seed pairs" in document
    assert len(document) < 4_500_000
    for image in webps(document):
        assert max(image.size) == VIDEO_MAX_SIDE and image.n_frames == MAX_FRAMES
    small = moving_square(RED)
    document = comparison_html(page(rows=[SideBySide(f"prompt {i}", i, small, small) for i in range(10)]))
    assert len(re.findall(r'<div class="row">', document)) == 8 and "Showing 8 of 10" in document


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """left, top, width, height of the mask's pixels."""
    ys, xs = np.nonzero(mask)
    assert len(xs), "no pixels of that colour"
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make system-deps)")
def test_page_renders_in_headless_chromium(tmp_path):
    target = tmp_path / "report.html"
    target.write_text(comparison_html(page(random_networks=("i3d",))), encoding="utf-8")
    screenshot = tmp_path / "report.png"
    # Root needs --no-sandbox; the virtual-time budget lets the WebP images decode before the shot.
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1000",
               "--virtual-time-budget=3000", f"--screenshot={screenshot}", target.as_uri()]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape == (1000, 1000, 3)

    def near(colour, tolerance=40) -> np.ndarray:
        return np.abs(pixels - np.array(colour)).max(axis=2) < tolerance

    # The 12 px squares of 32 px clips shown five times enlarged: 60 px, the candidate's left of the champion's.
    red, blue = _box(near(RED, 60)), _box(near(BLUE, 60))
    for box in (red, blue):
        assert 55 <= box[2] <= 65 and 55 <= box[3] <= 65, (red, blue)
    assert red[0] + red[2] < blue[0] and abs(red[1] - blue[1]) < 5, (red, blue)
    assert near(RED, 60).sum() > 55 * 55 and near(BLUE, 60).sum() > 55 * 55
    # The decision banner and the random-networks warning span the page's width; the table has a coloured header.
    for colour, width in ((NOT_PROMOTED_COLOUR, 900), (WARNING_COLOUR, 900), (TABLE_HEADER_COLOUR, 600)):
        mask = near(_rgb(colour), 4)
        assert _box(mask)[2] >= width and mask.sum() > width * 20, colour
    # Top to bottom: banner, warning, table, videos.
    tops = [_box(near(_rgb(colour), 4))[1] for colour in (NOT_PROMOTED_COLOUR, WARNING_COLOUR, TABLE_HEADER_COLOUR)]
    assert tops == sorted(tops) and tops[-1] < red[1]
