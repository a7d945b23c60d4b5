"""What scripts/gpu_check.py and scripts/multi_gpu_check.py share: run `tetrad train` as a user
does (fresh processes, one folder per run under OUT_DIR), read its metrics.jsonl, judge, print
one PASS/FAIL/SKIP line per check and write every figure to OUT_DIR/<suite>.json.

Each check is data (a name, `tetrad train` options for the GPU, a procedure that runs and
judges); --dry-run appends the tiny, fp32, 3-step options below to every run, runs on the CPU
(gloo) and skips what is CUDA-only, so the scripts cannot rot: tests run them that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
Records = list[dict[str, float]]
RUN_TIMEOUT_S = 600  # a hung run fails its check instead of the whole session
WARMUP_STEPS = 5  # compile and allocator warm-up: left out of tokens/s and MFU


class RunFailed(Exception):
    """A command exited non-zero, timed out or wrote no metrics."""


@dataclass(frozen=True)
class Mode:
    """How the runs are sized, and the thresholds that depend on it."""

    dry_run: bool
    common: tuple[str, ...]  # appended to every run's options (later options win)
    min_loss_drop: float  # nats the loss must fall from the first step to the last
    min_memory_saved_gib: float | None  # None: report only (peak RSS on a CPU says nothing)
    loss_rtol: float  # a parallel layout against one device, every step
    grad_norm_rtol: float


# bf16 tolerances: see multi_gpu_check.py.
GPU = Mode(
    dry_run=False,
    common=("--metrics.log_freq=1",),
    min_loss_drop=1.0,
    min_memory_saved_gib=2.0,
    loss_rtol=2e-2,
    grad_norm_rtol=1e-1,
)
_DRY_RUN_COMMON = (
    "--metrics.log_freq=1",
    "--metrics.peak_tflops=1",  # a CPU's MFU means nothing here: skip measuring its peak
    "--model.flavor=tiny",
    "--training.steps=3",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--training.mixed_precision_param=float32",
    "--lr_scheduler.warmup_steps=1",
)
DRY_RUN = Mode(
    dry_run=True,
    common=(*_DRY_RUN_COMMON, "--optimizer.lr=1e-2"),  # so that 3 steps show the loss fall
    min_loss_drop=0.1,
    min_memory_saved_gib=None,
    loss_rtol=1e-5,  # fp32: only the summation order differs (tests/distributed/test_parity.py)
    grad_norm_rtol=1e-5,
)
# The parity tests' learning rate: at 1e-2 the weights move so far per step that fp32 summation
# order alone shifts the third step's gradient norm by 1.4e-5.
DRY_RUN_LAYOUTS = dataclasses.replace(DRY_RUN, common=(*_DRY_RUN_COMMON, "--optimizer.lr=1e-3"))


@dataclass
class Verdict:
    passed: bool
    reason: str  # the criterion and the figures it was judged on
    records: Records  # the metrics of the run under test
    figures: dict[str, Any] = field(default_factory=dict)


class Context:
    """Runs the commands of one suite's checks, each `tetrad train` in a fresh OUT_DIR/<name>."""

    def __init__(self, out: Path, mode: Mode) -> None:
        self.out, self.mode = out, mode
        self.commands: list[str] = []  # the current check's, for the report
        self._references: dict[tuple[str, ...], Records] = {}
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # reference.py's tetrad
        if mode.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine

    def execute(self, cmd: list[str], log: Path) -> None:
        """Run ``cmd`` in its own process group (torchrun's ranks die with it), output to ``log``."""
        self.commands.append(" ".join(cmd))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                returncode = proc.wait(timeout=RUN_TIMEOUT_S)
            except BaseException as e:  # a timeout, or Ctrl-C: leave no rank behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(e, subprocess.TimeoutExpired):
                    raise RunFailed(f"timed out after {RUN_TIMEOUT_S} s; see {log}") from e
                raise
        if returncode != 0:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            raise RunFailed(f"exit {returncode}: {lines[-1] if lines else ''} (see {log})")

    def train(
        self, name: str, args: Sequence[str], *, nproc: int = 1, resume: bool = False
    ) -> Records:
        """`tetrad train` into OUT_DIR/name (emptied first unless ``resume``); its metrics."""
        folder = self.out / name
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--nproc={nproc}"]
        self.execute([*cmd, f"--job.dump_folder={folder}", *args], folder / "output.log")
        return read_metrics(folder)

    def reference(self, args: Sequence[str], dp: int) -> Records:
        """One process trained on the global batch of ``dp`` data-parallel ranks, their batches
        merged (the parity tests' reference); run once per dp and options outside the layout."""
        shared = tuple(a for a in args if not a.startswith("--parallelism."))
        key = (str(dp), *shared)
        if key in self._references:
            self.commands.append(f"(the one-device reference of dp {dp}, run before)")
            return self._references[key]
        folder = self.out / f"reference_dp{dp}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "tests/distributed/reference.py"), f"--dp={dp}"]
        self.execute([*cmd, f"--job.dump_folder={folder}", *shared], folder / "output.log")
        self._references[key] = read_metrics(folder)
        return self._references[key]


def read_metrics(folder: Path) -> Records:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise RunFailed(f"no {path}")
    return [json.loads(line) for line in path.read_text().splitlines()]


def option(args: Sequence[str], key: str) -> str:
    """The value that the last ``--key=value`` in ``args`` gives (later options win in tetrad)."""
    return [a.partition("=")[2] for a in args if a.startswith(f"--{key}=")][-1]


def summary(records: Records) -> dict[str, Any]:
    """A run's reported figures: losses, median tokens/s and MFU after warm-up, peak memory."""
    timed = records[WARMUP_STEPS:] if len(records) > WARMUP_STEPS else records[1:] or records
    return {
        "loss": [r["loss"] for r in records],
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "memory_gib": max(r["memory_gib"] for r in records),
    }


def finite_losses(records: Records) -> bool:
    return bool(records) and all(math.isfinite(r["loss"]) for r in records)


Procedure = Callable[["Check", Context, list[str]], Verdict]


@dataclass(frozen=True)
class Check:
    name: str
    procedure: Procedure  # runs tetrad with the options below (mode's appended), judges
    args: tuple[str, ...]  # `tetrad train` options on the GPU; {out} stands for OUT_DIR
    cuda_only: str = ""  # why --dry-run skips it; "" = it runs on a CPU too, shrunk
    nproc: int = 1  # processes, one per GPU


def run_check(check: Check, ctx: Context, devices: int) -> dict[str, Any]:
    """One check's report entry: status, reason, commands, wall time and figures."""
    entry: dict[str, Any] = {"name": check.name, "status": "SKIP", "commands": []}
    if ctx.mode.dry_run and check.cuda_only:
        return {**entry, "reason": f"CUDA only: {check.cuda_only}"}
    if check.nproc > devices:
        here = "the dry run uses 2 CPU processes" if ctx.mode.dry_run else f"{devices} here"
        return {**entry, "reason": f"needs {check.nproc} GPUs; {here}"}
    args = [a.replace("{out}", str(ctx.out)) for a in (*check.args, *ctx.mode.common)]
    ctx.commands = []
    start = time.perf_counter()
    try:
        verdict = check.procedure(check, ctx, args)
        status, reason = ("PASS" if verdict.passed else "FAIL"), verdict.reason
        figures = {**(summary(verdict.records) if verdict.records else {}), **verdict.figures}
    except RunFailed as e:
        status, reason, figures = "FAIL", str(e), {}
    wall_s = time.perf_counter() - start
    return {**entry, "status": status, "reason": reason, "commands": ctx.commands,
            "wall_s": wall_s, **figures}  # fmt: skip


def line(entry: dict[str, Any]) -> str:
    text = f"{entry['status']:4}  {entry['name']:<25} {entry['reason']}"
    if "mfu" in entry:
        text += f"  | tok/s {entry['tokens_per_sec']:.0f}  MFU {entry['mfu']:.1f}%"
        text += f"  mem {entry['memory_gib']:.2f} GiB"
    if "wall_s" in entry:
        text += f"  {entry['wall_s']:.0f} s"
    return text


def main(doc: str, checks: Sequence[Check], suite: str, *, dry_mode: Mode, gpus_needed: int) -> int:
    """Parse ``OUT_DIR [--dry-run]``, run ``checks`` in order, report; 1 if any failed."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the runs and the JSON report")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny model, fp32")
    args = parser.parse_args()
    mode = dry_mode if args.dry_run else GPU
    devices = 2 if args.dry_run else torch.cuda.device_count()
    if devices < gpus_needed:
        print(
            f"{suite}: needs {gpus_needed} CUDA GPU(s), found {devices}; "
            "--dry-run checks the script on the CPU",
            file=sys.stderr,
        )
        return 2
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, mode)
    device = torch.cuda.get_device_name(0) if not args.dry_run else "CPU"
    report: dict[str, Any] = {
        "device": f"{device} ({platform.machine()}, {os.cpu_count()} CPU cores)",
        "devices": devices,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "checks": [],
    }
    for check in checks:
        entry = run_check(check, ctx, devices)
        print(line(entry), flush=True)
        report["checks"].append(entry)
        (out / f"{suite}.json").write_text(json.dumps(report, indent=1))  # after each check
    failed = [e["name"] for e in report["checks"] if e["status"] == "FAIL"]
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "no check failed")
    print(f"figures: {out / suite}.json")
    return 1 if failed else 0
