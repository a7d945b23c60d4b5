"""``tetrad report``: the page for one run and for three, read back with the standard library's
HTML parser and the PNGs decoded by matplotlib; the loss-difference table against differences
computed here from the runs' metrics.jsonl; bad input is one line, exit 2, nothing written.

The run folders are written by tetrad's own writers (MetricsLogger, save_config) with made-up
losses: no training needed."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from tests.integration.test_bad_input import _read_only, assert_one_line, run_cli, tree_digest
from tetrad.components.metrics import MetricsLogger
from tetrad.config import Config, save_config
from tetrad.tools.report.runs import labels

STEPS = 20
PANELS = {"loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "memory_gib"}


def _write_run(
    folder: Path, *, wobble: float, tp: int = 1, steps: int = STEPS, validate: bool = True
) -> None:
    """A run folder as ``tetrad train`` leaves it: config.toml, and metrics.jsonl with a loss
    that falls from 9.5 and differs between runs by ``wobble`` × a pattern of the step."""
    folder.mkdir(parents=True)
    config = Config()
    config.job.dump_folder = str(folder)
    config.parallelism.tp = tp
    save_config(config, folder / "config.toml")
    logger = MetricsLogger(
        dump_folder=folder,
        device=torch.device("cpu"),
        flops_per_token=10**6,
        peak_tflops=1.0,
        enable_tensorboard=False,
        write=True,
    )
    logger.start(after_step=0)
    for step in range(1, steps + 1):
        logger.add_tokens(512)
        loss = 9.5 - 0.1 * step + wobble * ((step * 7) % 5 - 2)
        lr = 1e-3 * min(step, 3) / 3
        logger.log(step, loss=loss, grad_norm=3.0 / step, lr=lr, skipped_steps=0, data_wait_s=0.0)
        if validate and step % 5 == 0:
            val_loss = loss + 0.2 + wobble * step
            logger.log_validation(
                step, {"val_loss": val_loss, "val_perplexity": float(np.exp(val_loss))}, seconds=0
            )


class _Page(HTMLParser):
    """What the tests read from the page: figures' images by id, table cells, run headings,
    <pre> texts, and every src/href."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.links: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.headings: list[str] = []
        self.pres: list[str] = []
        self.texts: list[str] = []
        self._figure: str | None = None
        self._table: str | None = None
        self._in: str | None = None  # h2, pre, td or th being read
        self._buffer = ""
        self.feed(text)
        self.text = "".join(self.texts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "figure":
            self._figure = (attributes["id"] or "").removeprefix("panel-")
        elif tag == "img" and self._figure is not None:
            self.images[self._figure] = attributes["src"] or ""
        elif tag == "table":
            self._table = attributes.get("id") or attributes.get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("h2", "pre", "td", "th"):
            self._in, self._buffer = tag, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        elif tag == "table":
            self._table = None
        if tag != self._in:
            return
        if tag == "h2":
            self.headings.append(self._buffer)
        elif tag == "pre":
            self.pres.append(self._buffer)
        elif self._table is not None:
            self.tables[self._table][-1].append(self._buffer)
        self._in = None

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._in is not None:
            self._buffer += data


def _png(uri: str) -> bytes:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64"
    return base64.b64decode(data, validate=True)


def _check_images(page: _Page, folder: Path) -> None:
    """Every panel: a 640×360 PNG that matplotlib decodes, with lines drawn on it (not mostly
    white), the same bytes as the PNG file beside the page; and nothing outside the page."""
    assert all(link.startswith("data:image/png;base64,") for link in page.links)
    for name, uri in page.images.items():
        png = _png(uri)
        assert png == (folder / f"{name}.png").read_bytes()
        pixels = imread(io.BytesIO(png))
        assert pixels.shape[:2] == (360, 640)
        drawn = (pixels[..., :3] < 0.9).any(axis=-1).mean()
        assert drawn > 0.02, (name, drawn)


def _losses(folder: Path, key: str) -> dict[int, float]:
    with (folder / "metrics.jsonl").open() as f:
        lines = f.read().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the unfinished last line
    return {r["step"]: r[key] for r in records if key in r}


def test_report_of_one_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "base"
    _write_run(run, wobble=0.0, validate=False)
    code, errors = run_cli(["report", str(run)], capfd)
    assert code == 0 and errors == []
    out = run / "report"  # the default
    page = _Page((out / "report.html").read_text())
    assert set(page.images) == PANELS - {"val_loss"}
    assert "validation loss: no run logged val_loss" in page.text
    _check_images(page, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.html", *(f"{name}.png" for name in page.images)]
    )
    assert page.headings == ["base"]
    assert page.pres == [(run / "config.toml").read_text()]
    assert "loss-difference-table" not in page.tables


def test_report_of_three_runs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    runs = [tmp_path / "base", tmp_path / "fsdp2" / "outputs", tmp_path / "tp2" / "outputs"]
    _write_run(runs[0], wobble=0.0)
    _write_run(runs[1], wobble=1e-6)
    _write_run(runs[2], wobble=3e-3, tp=2, steps=12)  # killed at step 13, mid-line:
    with (runs[2] / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 8.')
    out = tmp_path / "compare"
    code, errors = run_cli(["report", *map(str, runs), f"--out={out}"], capfd)
    assert code == 0 and errors == []
    page = _Page((out / "report.html").read_text())
    assert set(page.images) == PANELS | {"loss_difference"}
    _check_images(page, out)
    assert page.headings[-3:] == ["base", "fsdp2/outputs", "tp2/outputs"]
    assert "skipped the unfinished last line (15) a killed run left" in page.text
    # The differences from the first run, computed here from the files.
    table = page.tables["loss-difference-table"]
    assert [row[0] for row in table[1:]] == ["fsdp2/outputs", "tp2/outputs"]
    for row, run in zip(table[1:], runs[1:], strict=True):
        for column, key in ((1, "loss"), (4, "val_loss")):
            first, this = _losses(runs[0], key), _losses(run, key)
            shared = sorted(set(first) & set(this))
            size, step = max((abs(this[s] - first[s]), -s) for s in shared)
            assert int(row[column]) == len(shared)
            assert float(row[column + 1]) == pytest.approx(size, rel=1e-5)
            assert int(row[column + 2]) == -step
    assert int(table[2][1]) == 12 and int(table[2][4]) == 2
    # Each later run's config: its differences from the first, then the whole file.
    differences = page.tables["config-diff"]
    assert ["parallelism.tp", "1", "2"] in differences
    assert ["job.dump_folder", json.dumps(str(runs[0])), json.dumps(str(runs[2]))] in differences
    assert page.pres == [(run / "config.toml").read_text() for run in runs]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Name → (argv, a part of the one line)."""
    good, file = tmp / "good", tmp / "a_file"
    corrupt, empty, not_a_record = tmp / "corrupt", tmp / "empty", tmp / "not_a_record"
    return {
        "no metrics": (["report", str(tmp / "run")], "holds no metrics.jsonl"),
        "no folder": (["report", str(good), str(tmp / "nowhere")], "is not a folder"),
        "corrupt line": (["report", str(corrupt)], "line 3 is not a metrics record (not JSON"),
        "no step": (["report", str(not_a_record)], "line 1 is not a metrics record (its step"),
        "no records": (["report", str(empty)], "holds no records"),
        "out is a file": (["report", str(good), f"--out={file}"], "is a file, not a folder"),
        "out inside a file": (["report", str(good), f"--out={file}/r"], "which is a file"),
    }


@pytest.fixture
def bad_scratch(tmp_path: Path) -> Path:
    _write_run(tmp_path / "good", wobble=0.0, steps=3)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("[training]\nsteps = 2\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    _write_run(tmp_path / "corrupt", wobble=0.0, steps=4)
    metrics = tmp_path / "corrupt" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([*lines[:2], '{"step": 3, "loss": 8.\n', *lines[3:]]))
    (tmp_path / "not_a_record").mkdir()
    (tmp_path / "not_a_record" / "metrics.jsonl").write_text('{"loss": 9.0}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    return tmp_path


@pytest.mark.parametrize("name", list(_bad_inputs(Path())))
def test_bad_input(name: str, bad_scratch: Path, capfd: pytest.CaptureFixture[str]) -> None:
    argv, expect = _bad_inputs(bad_scratch)[name]
    before = tree_digest(bad_scratch)
    code, lines = run_cli(argv, capfd)
    assert_one_line(code, lines, expect)
    assert tree_digest(bad_scratch) == before


def test_unwritable_out(bad_scratch: Path, capfd: pytest.CaptureFixture[str]) -> None:
    read_only = bad_scratch / "read_only"
    read_only.mkdir()
    before = tree_digest(bad_scratch)
    with _read_only(read_only):
        argv = ["report", str(bad_scratch / "good"), f"--out={read_only}/report"]
        code, lines = run_cli(argv, capfd)
    assert_one_line(code, lines, f"--out {read_only}/report cannot be written")
    assert tree_digest(bad_scratch) == before


def test_without_matplotlib(
    bad_scratch: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if absent
    before = tree_digest(bad_scratch)
    code, lines = run_cli(["report", str(bad_scratch / "good")], capfd)
    assert_one_line(code, lines, "pip install 'tetrad[report]'")
    assert tree_digest(bad_scratch) == before


def test_labels_tell_runs_apart() -> None:
    folders = [Path("/x/a/outputs"), Path("/x/b/outputs"), Path("/x/c"), Path("/x/c")]
    assert labels(folders) == ["a/outputs", "b/outputs", "c", "c #2"]
