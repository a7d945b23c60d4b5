"""``tetrad report RUN [RUN ...]``: one HTML page with the curves of one or several runs
overlaid, how far each run's loss is from the first's, and each run's config.

Everything is read and drawn before anything is written: bad input (a folder without
metrics.jsonl, a corrupt record, an output folder that cannot be written) is a one-line error
and leaves the disk as it was."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tetrad.tools.paths import check_writable_folder
from tetrad.tools.report.compare import COMPARED, differences
from tetrad.tools.report.page import render_page
from tetrad.tools.report.plots import (
    LOSS_DIFFERENCE,
    PANELS,
    check_matplotlib,
    difference_panel,
    metric_panels,
)
from tetrad.tools.report.runs import ReportError, Run, read_runs

PAGE = "report.html"

__all__ = ["PAGE", "ReportError", "Run", "write_report"]


def write_report(folders: Sequence[Path], out: Path | None = None) -> Path:
    """Write ``PAGE`` and one PNG per panel into ``out`` (default: ``<first run>/report``);
    return the page's path."""
    runs = read_runs(folders)
    out = folders[0] / "report" if out is None else out
    check_writable_folder(out, "--out")
    check_matplotlib()
    images, notes = metric_panels(runs)
    compared = {key: differences(runs, key) for key in COMPARED}
    if len(runs) > 1:
        panel = difference_panel(runs[0], compared["loss"])
        if panel is None:
            notes.append("loss difference: no later run shares a step with the first run")
        else:
            images[LOSS_DIFFERENCE] = panel
    page = render_page(runs, images, notes, compared)
    out.mkdir(parents=True, exist_ok=True)
    for name in [panel.name for panel in PANELS] + [LOSS_DIFFERENCE]:
        (out / f"{name}.png").unlink(missing_ok=True)  # a previous report's
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
    (out / PAGE).write_text(page)
    return out / PAGE
