"""A gate's decision shown to people: a compact Markdown table (the version's description in
the MLflow UI), text lines (`vdm registry promote`), a self-contained HTML page (the gate step's
report in the Kubeflow UI) and the step's output metadata. Plain Python (no kfp): the step's
body imports it, and inside a step kfp.dsl is its runtime part only, so a module that defines
components cannot be imported there."""

from __future__ import annotations

import html
import math
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.registry.promotion import Check, Decision, Evaluated


def _value(value: float | str | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _heading(decision: Decision) -> tuple[str, str]:
    champion = f"champion v{decision.champion}" if decision.champion else "champion (none)"
    return f"candidate v{decision.candidate}", champion


def _policy(decision: Decision) -> str:
    return f"policy v{decision.policy_version}" if decision.policy_version else "policy given to the gate"


def _gate_said(decision: Decision) -> str:
    return f"the gate {'would have promoted it' if decision.gate_promoted else 'refused'}: {decision.gate_reason}"


def decision_markdown(decision: Decision) -> str:
    """The decision's checks as a Markdown table, then its policy version, evaluation runs and any override."""
    candidate, champion = _heading(decision)
    rows = [
        f"| check | figure | {candidate} | {champion} | requirement | |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c.role} | {c.metric} | {_value(c.candidate)} | {_value(c.champion)} | {c.requirement} | "
            f"{'pass' if c.passed else '**fail**'} |"
            for c in decision.checks
        ),
    ]
    runs = []
    for who, evaluation in (("candidate", decision.candidate_evaluation), ("champion", decision.champion_evaluation)):
        if evaluation and (evaluation.run_url or evaluation.run):
            run = evaluation.run_url or evaluation.run
            link = f"[{who}'s evaluation run]({run})" if evaluation.run_url else f"{who}'s evaluation run {run}"
            runs.append(link + (f" ([report]({evaluation.report_url}))" if evaluation.report_url else ""))
    notes = [f"Gate {_policy(decision)}" + (f", decided by {decision.decided_by} at {decision.decided_at}"
                                            if decision.decided_by else "")]  # fmt: skip
    notes += runs
    if decision.forced:
        notes.append(f"**forced** by {decision.decided_by}: {decision.forced_reason}; {_gate_said(decision)}")
    return ("\n".join(rows) if decision.checks else "") + ("\n\n" if decision.checks else "") + "; ".join(notes) + "."


def decision_lines(decision: Decision) -> list[str]:
    """The decision's checks as aligned text lines (a terminal)."""
    candidate, champion = _heading(decision)
    lines = [f"{_policy(decision)}; {candidate} against {champion}"]
    table = [("", "check", "figure", candidate, champion, "requirement")]
    table += [
        ("ok" if c.passed else "FAIL", c.role, c.metric, _value(c.candidate), _value(c.champion), c.requirement)
        for c in decision.checks
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines += [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in table
    ]
    if decision.forced:
        lines.append(f"forced by {decision.decided_by}: {decision.forced_reason}")
        lines.append(_gate_said(decision))
    return [line.rstrip() for line in lines]


def decision_metadata(model: str, decision: Decision) -> dict:
    """The decision as a KFP artifact's metadata (JSON values; None left out)."""

    def kept(value):
        if isinstance(value, dict):
            return {k: kept(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [kept(v) for v in value]
        if isinstance(value, float) and math.isnan(value):
            return "NaN"
        return value

    return kept({"model": model} | asdict(decision))


def _link(label: str, url: str | None) -> str:
    return f"<a href='{html.escape(url)}'>{html.escape(label)}</a>" if url else ""


def _evaluation_cell(who: str, evaluation: Evaluated | None) -> str:
    if evaluation is None:
        return f"<li>{who}: none</li>"
    links = [x for x in (_link("evaluation run", evaluation.run_url), _link("report", evaluation.report_url)) if x]
    if not links and evaluation.run:
        links = [f"evaluation run {html.escape(evaluation.run)}"]
    return f"<li>{who} v{html.escape(evaluation.version)}: {', '.join(links) or 'no evaluation run recorded'}</li>"


def _check_row(check: Check) -> str:
    cls = "pass" if check.passed else "fail"
    return (
        f"<tr class={cls}><td>{'pass' if check.passed else 'FAIL'}</td><td>{html.escape(check.role)}</td>"
        f"<td>{html.escape(check.metric)}</td><td>{html.escape(_value(check.candidate))}</td>"
        f"<td>{html.escape(_value(check.champion))}</td><td>{html.escape(check.requirement)}</td></tr>"
    )


def decision_html(model: str, decision: Decision) -> str:
    """A self-contained page of a gate's decision: every check, both versions' figures, the
    policy (text and version) and links to both evaluations."""
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    candidate, champion = _heading(decision)
    figures_of = [decision.candidate_figures, decision.champion_figures]
    names = sorted(set(figures_of[0]) | set(figures_of[1]))
    figures = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_value(figures_of[0].get(n))}</td><td>{_value(figures_of[1].get(n))}</td></tr>"
        for n in names
    )
    forced = ""
    if decision.forced:
        forced = (
            f"<p class=forced><b>Forced</b> by {html.escape(decision.decided_by or '?')}: "
            f"{html.escape(decision.forced_reason or '')}; {html.escape(_gate_said(decision))}</p>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>promotion gate</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}tr.fail td{background:#fde2e2}"
        "pre{background:#f4f4f4;padding:.6em}"
        "</style></head><body>"
        f"<h2>{html.escape(model)}: version {html.escape(decision.candidate)} {verdict}</h2>"
        f"<p>{html.escape(decision.reason)}</p>{forced}"
        f"<h3>Checks ({html.escape(_policy(decision))})</h3>"
        f"<table><tr><th></th><th>check</th><th>figure</th><th>{candidate}</th><th>{champion}</th>"
        f"<th>requirement</th></tr>{''.join(_check_row(c) for c in decision.checks)}</table>"
        f"<h3>Figures</h3><table><tr><th>figure</th><th>{candidate}</th><th>{champion}</th></tr>{figures}</table>"
        f"<h3>Evaluations</h3><ul>{_evaluation_cell('candidate', decision.candidate_evaluation)}"
        f"{_evaluation_cell('champion', decision.champion_evaluation)}</ul>"
        f"<h3>Gate policy ({html.escape(_policy(decision))})</h3><pre>{html.escape(decision.policy_text)}</pre>"
        "</body></html>"
    )
