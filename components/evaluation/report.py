"""The evaluation step's HTML report: a self-contained page the Kubeflow UI renders. Plain
Python (no kfp): the step's body imports it, and inside a step kfp.dsl is its runtime part
only, so a module that defines components cannot be imported there."""

from __future__ import annotations

import html


def report_html(kind: str, metric: str, direction: str, figures: dict[str, float], model_version: str | None,
                mlflow_run: str | None) -> str:  # fmt: skip
    """A self-contained page of an evaluation: what was evaluated, the gate's metric, every figure."""
    rows = "".join(
        f"<tr{' class=gate' if name == metric else ''}><td>{html.escape(name)}</td><td>{value:.6g}</td></tr>"
        for name, value in sorted(figures.items())
    )
    run = f"<a href='{html.escape(mlflow_run)}'>{html.escape(mlflow_run)}</a>" if mlflow_run else "-"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>evaluation</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}tr.gate{font-weight:bold;background:#eef}"
        "</style></head><body>"
        f"<h2>Evaluation of {html.escape(model_version or 'the model')} ({html.escape(kind)})</h2>"
        f"<p>The promotion gate compares <b>{html.escape(metric)}</b> ({html.escape(direction)}), in bold below.</p>"
        f"<table><tr><th>figure</th><th>value</th></tr>{rows}</table>"
        f"<p>MLflow run: {run}</p></body></html>"
    )
