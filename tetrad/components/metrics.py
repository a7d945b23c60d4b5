"""Training metrics: throughput, TFLOP/s, MFU and memory, to the console, JSONL and TensorBoard."""

from __future__ import annotations

import functools
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s by device-name fragment (no sparsity), from the vendors' datasheets.
_GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


@functools.cache
def measure_cpu_peak_tflops(size: int = 2048, trials: int = 8) -> float:
    """Best-of-``trials`` fp32 matmul throughput with all threads: the honest MFU denominator on
    a CPU (best-of, so a busy moment or thread start-up does not lower the peak)."""
    a, b = torch.full((size, size), 0.5), torch.full((size, size), 2.0)  # leaves the RNG alone
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(device: torch.device, override: float | None = None) -> float:
    """The device's peak for MFU: the override, a known GPU's datasheet figure, or a CPU measure."""
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAK_BF16_TFLOPS.items():
            if fragment in name:
                return tflops
        logger.warning("unknown GPU %r: MFU assumes 312 TFLOP/s; set --metrics.peak_tflops", name)
        return 312.0
    return measure_cpu_peak_tflops()


def host_memory_gib() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated on a GPU, resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_memory_gib()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl record; infinite for a line a killed run left unfinished."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLogger:
    """Accumulates tokens between log lines and writes one record per logged step.

    ``metrics.jsonl`` and TensorBoard hold the history of the run whose state the folder holds:
    ``start`` drops what a previous start logged after the step this one starts from (steps
    it will redo, or a whole run it replaces), so no step appears twice."""

    def __init__(
        self,
        *,
        dump_folder: Path,
        device: torch.device,
        flops_per_token: int,
        peak_tflops: float,
        enable_tensorboard: bool,
        write: bool,
    ) -> None:
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.write = write
        self.jsonl_path = dump_folder / "metrics.jsonl"
        self.tb_folder = dump_folder / "tb" if enable_tensorboard and write else None
        self.tb_writer: Any = None
        self._after_step: int | None = 0  # see start()
        self._tokens = 0
        self._last_time = time.perf_counter()

    def add_tokens(self, num_tokens: int) -> None:
        """Tokens this device processed since the last log line (a batch shared by tensor or
        pipeline parallel ranks counts once among them)."""
        self._tokens += num_tokens

    def start(self, *, after_step: int) -> None:
        """Before the first step after ``after_step``: start the throughput clock (set-up is not
        counted); the first record written then trims the records of later steps and opens
        TensorBoard, purging its later events (``_open``). A run that stops before it logs
        anything leaves both as they were."""
        self._after_step = after_step
        self._tokens = 0
        self._last_time = time.perf_counter()

    def _open(self, after_step: int) -> None:
        if self.jsonl_path.exists():
            lines = self.jsonl_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step_of(line) <= after_step]
            if len(kept) < len(lines):
                self.jsonl_path.write_text("".join(kept))
                logger.info(
                    "%s: dropped %d record(s) after step %d, which this run redoes",
                    self.jsonl_path, len(lines) - len(kept), after_step,
                )  # fmt: skip
        if self.tb_folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(log_dir=str(self.tb_folder), purge_step=after_step + 1)

    def log(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        skipped_steps: int,
        data_wait_s: float,
    ) -> dict[str, Any]:
        """``data_wait_s``: the seconds spent waiting for batches since the last record."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        tokens_per_sec = self._tokens / elapsed
        tflops = self.flops_per_token * tokens_per_sec / 1e12
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped_steps": skipped_steps,
            "tokens_per_sec": tokens_per_sec,
            "tflops": tflops,
            "mfu": 100.0 * tflops / self.peak_tflops,
            "memory_gib": memory_gib(self.device),
            "data_wait_share": data_wait_s / elapsed,
        }
        self._tokens, self._last_time = 0, now
        if self.write:
            logger.info(
                "step %5d  loss %7.4f  grad_norm %7.4f  lr %.2e  tok/s %8.0f  "
                "TFLOP/s %6.3f  MFU %5.2f%%  mem %5.2f GiB  data %2.0f%%%s",
                step, loss, grad_norm, lr, tokens_per_sec, tflops, record["mfu"],
                record["memory_gib"], 100 * record["data_wait_share"],
                f"  skipped {skipped_steps}" if skipped_steps else "",
            )  # fmt: skip
            self._write(record, step)
        return record

    def log_validation(self, step: int, record: dict[str, float], *, seconds: float) -> None:
        """A validation result, as its own line of the console, metrics.jsonl and TensorBoard.
        The ``seconds`` it took are left out of the training throughput."""
        self._last_time += seconds
        if not self.write:
            return
        logger.info(
            "step %5d  val_loss %7.4f  val_perplexity %9.2f  (%.1f s)",
            step, record["val_loss"], record["val_perplexity"], seconds,
        )  # fmt: skip
        self._write({"step": step, **record}, step)

    def _write(self, record: dict[str, Any], step: int) -> None:
        if self._after_step is not None:
            self._open(self._after_step)
            self._after_step = None
        # Strict JSON: a non-finite figure is written as null, not as a bare NaN or Infinity.
        finite = {
            key: value if not isinstance(value, float) or math.isfinite(value) else None
            for key, value in record.items()
        }
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")
        if self.tb_writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb_writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
