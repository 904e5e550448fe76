"""The promotion gate step's HTML report: a self-contained page the Kubeflow UI renders.
Plain Python (no kfp): the step's body imports it, and inside a step kfp.dsl is its runtime
part only, so a module that defines components cannot be imported there."""

from __future__ import annotations

import html


def decision_html(
    model: str,
    metric: str,
    direction: str,
    promoted: bool,
    reason: str,
    candidate: str,
    champion: str | None,
    candidate_value: float | None,
    champion_value: float | None,
) -> str:
    """A self-contained page of a gate's decision: the two versions' figures and why."""

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    verdict = "promoted to champion" if promoted else "not promoted"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>promotion gate</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}"
        "</style></head><body>"
        f"<h2>{html.escape(model)}: version {html.escape(candidate)} {verdict}</h2>"
        f"<p>{html.escape(reason)}</p>"
        f"<table><tr><th></th><th>version</th><th>{html.escape(metric)} ({html.escape(direction)})</th></tr>"
        f"<tr><td>candidate</td><td>{html.escape(candidate)}</td><td>{figure(candidate_value)}</td></tr>"
        f"<tr><td>champion before</td><td>{html.escape(champion or '-')}</td><td>{figure(champion_value)}</td></tr>"
        "</table></body></html>"
    )
