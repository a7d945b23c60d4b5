"""Progress a person can see while they wait (checkpoint writes and reads, weight conversion,
compile warm-up): tqdm bars on rank 0's terminal, and none in logs (stderr not a terminal) or
on other ranks, whose output would interleave. The Hugging Face libraries' own bars (hub
downloads, dataset preparation) follow the same rule (``quiet_library_bars``)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")


def show_progress() -> bool:
    """Rank 0 (or a process outside torchrun), writing to a terminal."""
    return os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()


def progress_bar(
    description: str,
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    unit: str = "B",
) -> tqdm[T]:
    """A bar (over ``iterable``, if given) that clears itself when done; bytes in binary units.
    Disabled when ``show_progress`` is false: then it costs nothing."""
    from tqdm import tqdm  # not in the launcher, which imports this module for the rest

    return tqdm(
        iterable,
        desc=description,
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        leave=False,
        disable=not show_progress(),
        dynamic_ncols=True,
    )


@contextmanager
def ticking(
    bar: tqdm[Any], progress: Callable[[], tuple[float, float | None]] | None = None
) -> Iterator[tqdm[Any]]:
    """Redraw ``bar`` twice a second while the block runs (its elapsed time moves even with
    nothing to count, as during a compile), with the ``(done, total)`` that ``progress`` reads
    from work another thread or library does (bytes written or read); drawn once more at the
    end, then cleared."""
    stop = threading.Event()

    def draw() -> None:
        if progress is not None:
            done, bar.total = progress()
            bar.n = min(done, bar.total) if bar.total else done  # bytes on disk include framing
        bar.refresh()

    def tick() -> None:
        while not stop.wait(0.5):
            draw()

    thread = threading.Thread(target=tick, name="progress", daemon=True)
    if not bar.disable:
        thread.start()
    try:
        yield bar
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
            draw()
        bar.close()


def heartbeat(description: str, *, enabled: bool = True) -> AbstractContextManager[Any]:
    """Time passing while the block runs, for a wait nothing can count (a compile); nothing at
    all (no bar object) where it would not be shown."""
    if not (enabled and show_progress()):
        return nullcontext()
    from tqdm import tqdm

    return ticking(tqdm(desc=description, bar_format="{desc}: {elapsed}", leave=False))


def quiet_library_bars() -> None:
    """Turn off the bars of ``datasets``, ``huggingface_hub`` and ``transformers`` where ours are
    off, unless the user chose otherwise; before those libraries are imported (they read the
    variables once)."""
    if not show_progress():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
