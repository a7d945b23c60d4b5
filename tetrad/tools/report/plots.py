"""The report's panels as PNG images, drawn with matplotlib's Agg renderer (no display, no
pyplot state): one figure per metric against the step, every run overlaid in its own colour and
line style (so runs that agree exactly still show each other), and the loss differences."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tetrad.errors import UserError
from tetrad.tools.report.compare import Difference
from tetrad.tools.report.runs import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

WIDTH_IN, HEIGHT_IN, DPI = 6.4, 3.6, 100
"""Each panel's size: 640 × 360 pixels."""

_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True, kw_only=True)
class Panel:
    name: str
    """The record key drawn, and the PNG's file name."""
    title: str
    ylabel: str


PANELS = (
    Panel(name="loss", title="training loss", ylabel="loss"),
    Panel(name="val_loss", title="validation loss", ylabel="val_loss"),
    Panel(name="lr", title="learning rate", ylabel="lr"),
    Panel(name="grad_norm", title="gradient norm (before clipping)", ylabel="L2 norm"),
    Panel(name="tokens_per_sec", title="throughput", ylabel="tokens/s per rank"),
    Panel(name="mfu", title="model FLOPs utilisation", ylabel="MFU (%)"),
    Panel(name="memory_gib", title="peak memory (rank 0)", ylabel="GiB"),
)
LOSS_DIFFERENCE = "loss_difference"
"""The PNG of each run's loss minus the first run's."""


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "tetrad report draws with matplotlib, which is not installed: "
            "pip install 'tetrad[report]'"
        ) from None


def run_color(index: int) -> str:
    """The colour of the ``index``-th run in every panel (and beside its config)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["tab10"](index % 10))


def _draw(
    title: str,
    ylabel: str,
    draw: list[tuple[Run, int, list[int], list[float]]],
    *,
    zero_for: str | None = None,
) -> bytes:
    """One panel; ``zero_for`` labels a line at 0 (the reference run of a difference panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(figure)
    # Fixed margins: a layout engine ("constrained") costs as much again as the drawing.
    figure.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.14)
    axes: Axes = figure.add_subplot()
    if zero_for is not None:
        axes.axhline(0.0, color=run_color(0), linewidth=1.0, label=zero_for)
    for run, index, steps, values in draw:
        axes.plot(
            steps,
            values,
            label=run.label,
            color=run_color(index),
            linestyle=_STYLES[index % len(_STYLES)],
            linewidth=max(2.4 - 0.5 * index, 1.0),
            marker="o" if len(steps) <= 30 else None,
            markersize=3,
        )
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def metric_panels(runs: Sequence[Run]) -> tuple[dict[str, bytes], list[str]]:
    """PNG bytes per panel name, for the metrics some run logged; and a note per one left out."""
    images, notes = {}, []
    for panel in PANELS:
        draw = [(run, i, *run.series(panel.name)) for i, run in enumerate(runs)]
        draw = [entry for entry in draw if entry[2]]
        if not draw:
            notes.append(f"{panel.title}: no run logged {panel.name}")
            continue
        images[panel.name] = _draw(panel.title, panel.ylabel, draw)
    return images, notes


def difference_panel(first: Run, differences: Sequence[Difference]) -> bytes | None:
    """Each later run's loss minus the first run's, on the steps both logged; None where no
    run shares a step with the first."""
    draw = [(d.run, i, d.steps, d.values) for i, d in enumerate(differences, start=1) if d.steps]
    if not draw:
        return None
    return _draw(f"loss minus {first.label}'s", "loss difference", draw, zero_for=first.label)
