"""The evaluation's side-by-side page: the candidate's and the champion's videos on the same
prompts and seeds, the metric table and the gate's decision. Plain Python (no kfp, no MLflow):
it renders what it is given, as one self-contained page (videos inline as animated WebP data
URIs, no scripts, no fetches), because it opens inside MLflow's sandboxed artifact viewer and
the Kubeflow UI."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from components.common.media import animated_webp_bytes

# The page's size bound: at most MAX_ROWS prompt-and-seed rows, each video at most MAX_FRAMES
# frames and VIDEO_MAX_SIDE px, and rows stop before the videos pass MAX_VIDEO_BYTES (noise-like
# videos compress badly), so a page stays within a few MB.
MAX_ROWS = 8
MAX_VIDEO_BYTES = 4_000_000
MAX_FRAMES = 16
VIDEO_MIN_SIDE = 160
VIDEO_MAX_SIDE = 320
WEBP_QUALITY = 70

# Colours the page is recognised by (the screenshot test looks for them).
PROMOTED_COLOUR = "#1b7f3b"
NOT_PROMOTED_COLOUR = "#b34700"
NO_DECISION_COLOUR = "#5f6b7a"
WARNING_COLOUR = "#ffe08a"
TABLE_HEADER_COLOUR = "#c9daf0"


@dataclass(frozen=True)
class SideBySide:
    """One prompt and seed: both models' videos."""

    prompt: str  # what the videos were generated from ("" for the empty prompt and for image kinds: see label)
    seed: int
    candidate: np.ndarray  # (T, H, W, 3) uint8
    champion: np.ndarray | None  # None: no champion yet (or no champion of this kind to generate with)
    label: str = ""  # extra words shown with the row, e.g. "from the clip's first frame" or a held-out clip key


@dataclass(frozen=True)
class FigureRow:
    """One figure of the metric table."""

    metric: str
    candidate: float | None
    champion: float | None
    role: str  # "primary", "guard", "size", or "" (shown for information)
    requirement: str = ""  # e.g. "improve by > 2", "not worse by > 0.005", ">= 256 clips"
    passed: bool | None = None


@dataclass(frozen=True)
class ComparisonPage:
    """Everything the page shows."""

    model: str | None  # registered model name; None: an unregistered model
    kind: str
    candidate_version: str | None
    champion_version: str | None
    candidate_training_run: str | None  # URL of the MLflow training run
    champion_training_run: str | None
    evaluation_run: str | None  # URL of this evaluation's MLflow run
    rows: list[SideBySide]
    figures: list[FigureRow]
    decision: str  # the gate's reason, one paragraph
    promoted: bool | None  # None: no gate decision (an unregistered model)
    policy: str = ""  # the policy YAML and its version, shown under the table
    random_networks: tuple[str, ...] = ()  # evaluation networks that ran with random weights
    fps: float = 8.0


def animated_webp(frames: np.ndarray, fps: float, max_frames: int = MAX_FRAMES) -> bytes:
    """RGB frames (T, H, W, 3) uint8 as a looping animated WebP at real speed: at most
    `max_frames` frames spread over the whole clip; small clips enlarged by a whole factor with
    nearest-neighbour (pixels stay sharp) to at least VIDEO_MIN_SIDE, large ones shrunk to
    VIDEO_MAX_SIDE."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"a video is (T, H, W, 3) uint8 with T > 0, not {frames.shape} {frames.dtype}")
    step = math.ceil(len(frames) / max_frames)
    height, width = frames.shape[1:3]
    side = max(height, width)
    if side < VIDEO_MIN_SIDE:
        factor = math.ceil(VIDEO_MIN_SIDE / side)
        size, resample = (width * factor, height * factor), Image.Resampling.NEAREST
    elif side > VIDEO_MAX_SIDE:
        scale = VIDEO_MAX_SIDE / side
        size, resample = (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS
    else:
        size, resample = (width, height), Image.Resampling.NEAREST
    images = [Image.fromarray(frame).resize(size, resample) for frame in frames[::step]]
    return animated_webp_bytes(images, round(1000 * step / fps), WEBP_QUALITY)


def comparison_html(page: ComparisonPage, max_rows: int = MAX_ROWS) -> str:
    """The page: header with links, decision banner, random-networks warning, metric table,
    policy, then one row per prompt and seed with the two videos side by side."""
    candidate_name = f"candidate {_version(page.candidate_version)}".strip()
    champion_name = f"champion {_version(page.champion_version)}".strip()
    title = f"{page.model or 'unregistered model'} ({page.kind})"
    rows: list[str] = []
    for row in page.rows[:max_rows]:
        rendered = _row(row, candidate_name, champion_name, _missing_champion(page), page.fps)
        if rows and sum(map(len, rows)) + len(rendered) > MAX_VIDEO_BYTES:
            break
        rows.append(rendered)
    count = (
        f"<p>Showing {len(rows)} of {len(page.rows)} prompt-and-seed pairs; the figures are over the whole "
        "evaluation.</p>"
        if len(rows) < len(page.rows)
        else ""
    )
    has_champion = page.champion_version is not None or page.champion_training_run is not None
    against = champion_name if has_champion else "no champion yet"
    champion_run = (
        f"\n<li>{_text(champion_name)}: training run {_link(page.champion_training_run)}</li>" if has_champion else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation: {_text(title)}</title><style>
body{{font-family:sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.4em;margin:0 0 .4em}}
ul.runs{{margin:.2em 0 1em;padding-left:1.2em}} ul.runs li{{margin:.15em 0}}
.banner{{padding:.7em 1em;margin:.6em 0;font-weight:bold}}
.decision{{color:#fff}} .decision p{{margin:.3em 0 0;font-weight:normal}}
.promoted{{background:{PROMOTED_COLOUR}}} .not-promoted{{background:{NOT_PROMOTED_COLOUR}}}
.no-decision{{background:{NO_DECISION_COLOUR}}} .warning{{background:{WARNING_COLOUR};color:#222}}
table.figures{{border-collapse:collapse;margin:.6em 0}} .scroll{{overflow-x:auto}}
table.figures td,table.figures th{{border:1px solid #bbb;padding:.3em .8em;text-align:right}}
table.figures th{{background:{TABLE_HEADER_COLOUR}}} table.figures .name{{text-align:left}}
tr.primary td.name{{font-weight:bold}} td.pass{{color:{PROMOTED_COLOUR}}} td.fail{{color:{NOT_PROMOTED_COLOUR}}}
pre{{background:#f4f4f4;padding:.6em;overflow-x:auto}}
.row{{margin:1.2em 0;padding-top:.6em;border-top:1px solid #ddd}} .prompt{{margin:0 0 .4em}}
.videos{{display:flex;gap:24px;align-items:flex-start;overflow-x:auto}} figure{{margin:0}}
figcaption{{font-weight:bold;margin-bottom:.3em}}
.none{{width:{VIDEO_MIN_SIDE}px;height:{VIDEO_MIN_SIDE}px;background:#eee;color:#666;display:flex;
align-items:center;justify-content:center;font-style:italic}}
</style></head><body>
<h1>Evaluation of {_text(title)}: {_text(candidate_name)} against {_text(against)}</h1>
<ul class="runs">
<li>{_text(candidate_name)}: training run {_link(page.candidate_training_run)}</li>{champion_run}
<li>this evaluation: run {_link(page.evaluation_run)}</li>
</ul>
{_decision(page)}{_warning(page.random_networks)}
{_figures(page.figures, candidate_name, champion_name)}{_policy(page.policy)}
<h2>Videos: same prompts and seeds</h2>{count}{"".join(rows)}
</body></html>"""


def _version(version: str | None) -> str:
    if version is None:
        return ""
    return version if version.startswith("v") else f"v{version}"


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _link(url: str | None) -> str:
    """A link for http(s) URLs; any other value is shown as text, never as an href."""
    if not url:
        return "-"
    if urlsplit(url).scheme in ("http", "https"):
        return f'<a href="{_text(url)}">{_text(url)}</a>'
    return _text(url)


def _decision(page: ComparisonPage) -> str:
    if page.promoted is None:
        css, headline = "no-decision", "No gate decision"
    elif page.promoted:
        css, headline = "promoted", "Promoted: the candidate is the new champion"
    else:
        css, headline = "not-promoted", "Not promoted: the champion stays"
    reason = f"<p>{_text(page.decision)}</p>" if page.decision else ""
    return f'<div class="banner decision {css}">{headline}{reason}</div>'


def _warning(random_networks: tuple[str, ...]) -> str:
    if not random_networks:
        return ""
    names = ", ".join(random_networks)
    return (
        f'<div class="banner warning">Random weights: the evaluation networks {_text(names)} ran with random '
        "weights, so the figures that come from them say nothing about video quality.</div>"
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def _figures(figures: list[FigureRow], candidate_name: str, champion_name: str) -> str:
    if not figures:
        return "<p>No figures.</p>"
    rows = []
    for figure in figures:
        difference = (
            "-" if figure.candidate is None or figure.champion is None else f"{figure.candidate - figure.champion:+.5g}"
        )
        verdict, css = {True: ("pass", "pass"), False: ("fail", "fail"), None: ("", "")}[figure.passed]
        rows.append(
            f'<tr class="{_text(figure.role)}"><td class="name">{_text(figure.metric)}</td>'
            f"<td>{_number(figure.candidate)}</td><td>{_number(figure.champion)}</td><td>{difference}</td>"
            f'<td class="name">{_text(figure.role)}</td><td class="name">{_text(figure.requirement)}</td>'
            f'<td class="{css}">{verdict}</td></tr>'
        )
    header = "".join(
        f'<th class="name">{_text(name)}</th>'
        if name in ("figure", "role", "requirement")
        else f"<th>{_text(name)}</th>"
        for name in ("figure", candidate_name, champion_name, "difference", "role", "requirement", "result")
    )
    # Scrolls sideways rather than squeezing: MLflow's artifact viewer is narrow.
    return f'<div class="scroll"><table class="figures"><tr>{header}</tr>{"".join(rows)}</table></div>'


def _policy(policy: str) -> str:
    if not policy:
        return ""
    return f"<details><summary>Gate policy</summary><pre>{_text(policy)}</pre></details>"


def _video(frames: np.ndarray, fps: float, alt: str) -> str:
    data = base64.b64encode(animated_webp(frames, fps)).decode()
    return f'<img src="data:image/webp;base64,{data}" alt="{_text(alt)}">'


def _missing_champion(page: ComparisonPage) -> str:
    """What stands in for the champion's video when a row has none."""
    if page.champion_version is None:
        return "no champion yet"
    if page.champion_version == page.candidate_version:
        return "the candidate is the champion"
    return "no champion videos"


def _row(row: SideBySide, candidate_name: str, champion_name: str, missing: str, fps: float) -> str:
    prompt = f"“{_text(row.prompt)}”" if row.prompt else ("" if row.label else "(the empty prompt)")
    label = f" {_text(row.label)}" if row.label else ""
    described = f"{prompt}{label} · seed {row.seed}".strip()
    champion = (
        f'<div class="none">{_text(missing)}</div>'
        if row.champion is None
        else _video(row.champion, fps, f"{champion_name}, seed {row.seed}")
    )
    return (
        f'<div class="row"><p class="prompt">{described}</p><div class="videos">'
        f"<figure><figcaption>{_text(candidate_name)}</figcaption>"
        f"{_video(row.candidate, fps, f'{candidate_name}, seed {row.seed}')}</figure>"
        f"<figure><figcaption>{_text(champion_name)}</figcaption>{champion}</figure></div></div>"
    )
