"""The report as one self-contained HTML page: the panels as PNG data URIs, no script, no
external file; each run's config beside the curves."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from tetrad.tools.report.compare import Difference
from tetrad.tools.report.plots import LOSS_DIFFERENCE, PANELS, run_color
from tetrad.tools.report.runs import Run

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; margin: 0.8rem 0 0.2rem; }
h2 { font-size: 1.1rem; margin: 0.6rem 0 0.3rem; }
h3 { font-size: 0.95rem; margin: 0.6rem 0 0.2rem; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 26rem; gap: 1rem; }
@media (max-width: 60rem) { main { grid-template-columns: 1fr; } }
.panels { display: grid; gap: 0.5rem;
          grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #ddd; }
aside { position: sticky; top: 0; max-height: 100vh; overflow: auto; }
.run { border-left: 6px solid; padding: 0 0.6rem; margin-bottom: 1rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
td, th { border: 1px solid #ccc; padding: 0.15rem 0.4rem; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.config-diff { width: 100%; table-layout: fixed; } .config-diff td { overflow-wrap: anywhere; }
pre { background: #f6f6f6; padding: 0.4rem; max-height: 30rem; overflow: auto; font-size: 0.8rem; }
.notes { color: #666; }
#loss-difference { margin-bottom: 0.8rem; }
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: float) -> str:
    return f"{value:.6g}"


_ABSENT = object()


def _value(value: Any) -> str:
    """A config value as TOML spells the common ones (strings quoted, true/false)."""
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


def _figures(images: Mapping[str, bytes]) -> str:
    titles = {panel.name: panel.title for panel in PANELS}
    titles[LOSS_DIFFERENCE] = "loss difference from the first run"
    return "\n".join(
        f'<figure id="panel-{name}"><img src="{png_data_uri(png)}" alt="{escape(titles[name])}">'
        f"<figcaption>{escape(titles[name])} ({name}.png)</figcaption></figure>"
        for name, png in images.items()
    )


def _largest_cells(difference: Difference) -> str:
    largest = difference.largest()
    if largest is None:
        return '<td class="number">0</td><td colspan="2">no step shared with the first run</td>'
    size, step = largest
    return (
        f'<td class="number">{len(difference.steps)}</td>'
        f'<td class="number max">{_number(size)}</td><td class="number">{step}</td>'
    )


def _difference_table(compared: Mapping[str, Sequence[Difference]]) -> str:
    """The largest |difference| of each compared figure, per run after the first."""
    keys = [key for key, found in compared.items() if any(d.steps for d in found)]
    if not keys:
        return '<p class="notes">No later run shares a step with the first run.</p>'
    head = "".join(
        f"<th>steps shared ({key})</th><th>max |Δ {key}|</th><th>at step</th>" for key in keys
    )
    rows = []
    for i, row in enumerate(zip(*(compared[key] for key in keys), strict=True)):
        cells = "".join(_largest_cells(difference) for difference in row)
        rows.append(f'<tr data-run="{i + 1}"><td>{escape(row[0].run.label)}</td>{cells}</tr>')
    return f'<table id="loss-difference-table"><tr><th>run</th>{head}</tr>{"".join(rows)}</table>'


def _config_differences(first: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    keys = [*first, *(key for key in config if key not in first)]
    changed = [key for key in keys if first.get(key, _ABSENT) != config.get(key, _ABSENT)]
    if not changed:
        return "<p>The same config as the first run.</p>"
    rows = "".join(
        f"<tr><td>{escape(key)}</td><td>{escape(_value(first.get(key, _ABSENT)))}</td>"
        f"<td>{escape(_value(config.get(key, _ABSENT)))}</td></tr>"
        for key in changed
    )
    head = "<tr><th>key</th><th>first run</th><th>this run</th></tr>"
    return f'<table class="config-diff">{head}{rows}</table>'


def _run_card(index: int, run: Run, first: Run) -> str:
    steps, losses = run.series("loss")
    validations = len(run.series("val_loss")[0])
    summary = f"{len(run.records)} records"
    if steps:
        summary += f", steps {steps[0]}–{steps[-1]}, last loss {_number(losses[-1])}"
    if validations:
        summary += f", {validations} validations"
    notes = "".join(f'<p class="notes">{escape(note)}</p>' for note in run.notes)
    config = ""
    if run.config_text is not None:
        toml = f"<summary>config.toml</summary><pre>{escape(run.config_text)}</pre></details>"
        if index == 0:
            config = f"<details open>{toml}"
        else:
            config = (
                f"<h3>config: differences from {escape(first.label)}</h3>"
                f"{_config_differences(first.config, run.config)}<details>{toml}"
            )
    return (
        f'<section class="run" id="run-{index}" style="border-color: {run_color(index)}">'
        f"<h2>{escape(run.label)}</h2><p>{escape(str(run.folder))}<br>{summary}</p>"
        f"{notes}{config}</section>"
    )


def render_page(
    runs: Sequence[Run],
    images: Mapping[str, bytes],
    notes: Sequence[str],
    compared: Mapping[str, Sequence[Difference]],
) -> str:
    """The page: panels (``images``, in order) and notes on those left out; with several runs
    the table of differences from the first; each run's summary and config."""
    names = ", ".join(run.label for run in runs)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    omitted = "".join(f"<li>{escape(note)}</li>" for note in notes)
    parity = ""
    if len(runs) > 1:
        parity = (
            f'<section id="loss-difference"><h2>Differences from {escape(runs[0].label)}</h2>'
            "<p>Each run minus the first at the steps both logged. After a change of layout "
            "alone (same seed, data and global batch), expect float-reordering noise that does "
            "not grow with the step (about 1e-6 for tetrad's tiny runs on CPU), not a "
            f"drift.</p>{_difference_table(compared)}</section>"
        )
    cards = "".join(_run_card(i, run, runs[0]) for i, run in enumerate(runs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tetrad report: {escape(names)}</title><style>{_STYLE}</style></head>
<body><h1>tetrad report: {escape(names)}</h1>
<p class="notes">Written {when} by <code>tetrad report</code>; figures are rank 0's, as logged
in each run's metrics.jsonl.</p>
<main><div>{parity}
<div class="panels">{_figures(images)}</div>
{f'<ul class="notes" id="omitted">{omitted}</ul>' if omitted else ""}</div>
<aside>{cards}</aside></main></body></html>
"""
