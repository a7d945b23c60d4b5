"""`tetrad report` in a real browser: the page opens in headless Chromium without console errors
and a screenshot of it shows the plots. Kept out of `make test` (it trains two runs and starts a
browser); run it with `make report-check`.

    python scripts/report_check.py [--runs RUN ...] [--screenshot PNG] [--window W,H]

Without --runs it first trains two tiny runs that should agree (30 steps with validation, one
process and FSDP over two; ~1 minute on 2 CPU cores) into a temporary folder, so that the page
shows a real parity check. Then it renders their report, checks that the page loads nothing
from outside itself, opens it with chromium / chromium-browser / google-chrome (--headless
--screenshot, console messages on stderr), and judges the screenshot: not blank (≥ 3% of the
pixels not white; a blank page has none) and showing the plots' coloured lines (≥ 0.3% of the
panels' column saturated colour, which text, tables and grid lines never are: 0.01% with the
images removed, 1.2% with them). --screenshot keeps a copy, reduced to a 64-colour palette (the
README's docs/report_screenshot.png is one).

Exit 0 on PASS, 1 on FAIL; 0 with SKIP where no browser is installed (`apt-get install
chromium` on Debian and Ubuntu).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TRAIN = [
    "--model.flavor=tiny",
    "--training.steps=30",
    "--training.seq_len=64",
    "--lr_scheduler.warmup_steps=3",
    "--optimizer.lr=3e-3",
    "--metrics.log_freq=1",
    "--debug.deterministic",
    "--validation.enable",
    "--validation.freq=10",
    "--validation.steps=2",
]
LAYOUTS = {  # the same global batch of 4 sequences
    "1proc": ["--nproc=1", "--training.local_batch_size=4"],
    "fsdp2": ["--nproc=2", "--training.local_batch_size=2"],
}
MIN_DRAWN, MIN_COLOURED = 0.03, 0.003


def _tetrad(*args: str, threads: str = "2") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    command = [sys.executable, "-m", "tetrad.cli", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL  {' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")


def _train(folder: Path) -> list[Path]:
    runs = []
    for name, layout in LAYOUTS.items():
        print(f"training {name} into {folder / name} ...", flush=True)
        threads = "1" if "--nproc=2" in layout else "2"
        _tetrad("train", *layout, f"--job.dump_folder={folder / name}", *TRAIN, threads=threads)
        runs.append(folder / name)
    return runs


def _outside_links(page: str) -> list[str]:
    """src/href values that are not data URIs: what a self-contained page must not have."""
    return [v for v in re.findall(r'(?:src|href)="([^"]*)"', page) if not v.startswith("data:")]


def _screenshot(browser: str, page: Path, png: Path, window: str) -> list[str]:
    """Chromium's console messages while it loads ``page``, after writing ``png``."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # as root, in containers
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={window}",
        f"--screenshot={png}",
        "--enable-logging=stderr",
        "--v=0",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not png.is_file():
        sys.exit(f"FAIL  {browser} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def _judge(png: Path) -> tuple[float, float]:
    """Shares of the pixels that are not white, and of the panels' column (the left 60%, left
    of the configs) that are saturated colour: the plots' lines."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    drawn = float((rgb < 240).any(axis=-1).mean())
    panels = rgb[:, 40 : int(rgb.shape[1] * 0.6)]  # clear of the runs' coloured borders
    coloured = float((panels.max(axis=-1) - panels.min(axis=-1) > 80).mean())
    return drawn, coloured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="run folders (default: train two)")
    parser.add_argument("--screenshot", type=Path, help="keep the screenshot here (palette PNG)")
    parser.add_argument("--window", default="1400,1600", help="browser window W,H")
    args = parser.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"SKIP  no browser ({', '.join(BROWSERS)}): apt-get install chromium")
        return
    with tempfile.TemporaryDirectory(prefix="report_check_") as tmp:
        runs = args.runs or _train(Path(tmp))
        out = Path(tmp) / "report"
        _tetrad("report", *map(str, runs), f"--out={out}")
        page = out / "report.html"
        if outside := _outside_links(page.read_text()):
            sys.exit(f"FAIL  the page loads files from outside itself: {outside[:3]}")
        png = Path(tmp) / "screenshot.png"
        console = _screenshot(browser, page, png, args.window)
        drawn, coloured = _judge(png)
        if args.screenshot is not None:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            Image.open(png).convert("RGB").quantize(colors=64).save(args.screenshot, optimize=True)
        size_kb = page.stat().st_size / 1e3
    figures = f"{size_kb:.0f} kB page, {drawn:.0%} drawn, {coloured:.1%} coloured"
    if console:
        sys.exit(
            f"FAIL  console messages while loading the page ({figures}):\n" + "\n".join(console)
        )
    if drawn < MIN_DRAWN or coloured < MIN_COLOURED:
        sys.exit(f"FAIL  the screenshot shows no plots ({figures})")
    print(
        f"PASS  {browser} opened the report of {len(runs)} run(s), no console messages; {figures}"
    )


if __name__ == "__main__":
    main()
