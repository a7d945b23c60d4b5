"""Training metrics: throughput, TFLOP/s, MFU and memory, to the console, JSONL, TensorBoard
and W&B."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tetrad.components.wandb_sink import WandbSink

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


# fp32 FLOPs per cycle per core, by the widest fused multiply-add the CPU has: vector lanes ×
# 2 (multiply and add) × 2 FMA units. Two units is the most any core of these ISAs has (Intel's
# optimization manual: Haswell 32, Skylake-SP and later server cores 64; AMD Zen 4 has 32 with
# AVX-512, Zen 5 64; Arm Neoverse V1/V2 and Apple cores 4 × 128-bit pipes = 32), so the figure
# is an upper bound: MFU may be understated on a core with one unit, never overstated.
_FP32_FLOPS_PER_CYCLE = (("avx512f", 64, "avx512"), ("fma", 32, "avx2+fma"), ("asimd", 32, "neon"))


def measure_cpu_peak_tflops(size: int = 2048, trials: int = 8) -> float:
    """Best-of-``trials`` fp32 matmul throughput with all threads. It moves with whatever else
    the machine runs, so it is the peak only for a CPU whose ISA ``cpu_peak`` does not know."""
    a, b = torch.full((size, size), 0.5), torch.full((size, size), 2.0)  # leaves the RNG alone
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def _cpu_ghz(cpuinfo: str) -> float | None:
    """The highest clock of the CPUs: cpufreq's maximum (turbo) where the kernel exposes it,
    else /proc/cpuinfo's "cpu MHz" (in a VM, the nominal clock; bare metal has cpufreq)."""
    cpufreq = list(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"))
    if cpufreq:
        return max(int(path.read_text()) for path in cpufreq) / 1e6  # kHz
    mhz = [float(line.split(":")[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    return max(mhz) / 1e3 if mhz else None


def _physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads share their core's
    FMA units), at most torch's thread count: the cores its matmuls use."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package, core = (
                (topology / "physical_package_id").read_text(),
                (topology / "core_id").read_text(),
            )
        except OSError:  # no topology: count the CPU as a core
            package, core = str(cpu), ""
        cores.add((package, core))
    return min(len(cores), torch.get_num_threads())


@functools.cache
def cpu_peak() -> tuple[float, str]:
    """The CPU's fp32 peak TFLOP/s and how it was reached: cores × clock × FLOPs per cycle of
    its ISA, which no busy moment can lower; a measured matmul where the ISA or the clock is
    unknown."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.startswith(("flags", "Features"))  # x86, Arm
        for flag in line.split(":", 1)[1].split()
    }
    ghz = _cpu_ghz(cpuinfo)
    for flag, per_cycle, isa in _FP32_FLOPS_PER_CYCLE:
        if flag in flags and ghz is not None:
            cores = _physical_cores()
            how = f"{cores} core(s) × {ghz:.2f} GHz × {per_cycle} FLOP/cycle ({isa})"
            return cores * ghz * per_cycle / 1e3, how
    return measure_cpu_peak_tflops(), "measured fp32 matmul, best of 8 (CPU ISA or clock unknown)"


def _gpu_peak(name: str) -> tuple[float, str]:
    for fragment, tflops in _GPU_PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return tflops, f"{fragment} datasheet"
    logger.warning("unknown GPU %r: MFU assumes 312 TFLOP/s; set --metrics.peak_tflops", name)
    return 312.0, f"assumed for the unknown GPU {name!r}"


def peak_tflops(device: torch.device, override: float | None = None) -> float:
    """The device's peak for MFU: the override, a known GPU's datasheet figure (bf16 dense), or
    the CPU's fp32 figure (``cpu_peak``); logged with where it comes from."""
    if override is not None:
        tflops, how = override, "set by --metrics.peak_tflops"
    elif device.type == "cuda":
        tflops, source = _gpu_peak(torch.cuda.get_device_name(device))
        how = f"bf16 dense: {source}"
    else:
        tflops, source = cpu_peak()
        how = f"fp32: {source}"
    logger.info("peak %.4g TFLOP/s %s", tflops, how)
    return tflops


def host_memory_gib() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated on a GPU, resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_memory_gib()


def _routing_text(routing: Mapping[str, float]) -> str:
    """The console's summary of an MoE step: tokens per expert min/mean/max, the aux loss."""
    if not routing:
        return ""
    text = "  experts {expert_load_min:.0f}/{expert_load_mean:.0f}/{expert_load_max:.0f}"
    if "aux_loss" in routing:
        text += "  aux {aux_loss:.2e}"
    return text.format(**routing)


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
        wandb: WandbSink | None = None,
    ) -> None:
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.write = write
        self.jsonl_path = dump_folder / "metrics.jsonl"
        self.tb_folder = dump_folder / "tb" if enable_tensorboard and write else None
        self.tb_writer: Any = None
        self.wandb = wandb
        self._mfu_warned = False
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
        anything leaves both as they were. W&B starts here, so that a W&B error comes before the
        first step (``WandbSink`` for how it treats redone steps)."""
        if self.wandb is not None:
            self.wandb.open(after_step)
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
        routing: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """``data_wait_s``: the seconds spent waiting for batches since the last record.
        ``routing``: a mixture of experts' figures of this step (``ExpertBalance.end_step``),
        written as they are and summarised at the end of the console line."""
        routing = routing or {}
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
            **routing,
        }
        self._tokens, self._last_time = 0, now
        if self.write:
            logger.info(
                "step %5d  loss %7.4f  grad_norm %7.4f  lr %.2e  tok/s %8.0f  "
                "TFLOP/s %6.3f  MFU %5.2f%%  mem %5.2f GiB  data %2.0f%%%s%s",
                step, loss, grad_norm, lr, tokens_per_sec, tflops, record["mfu"],
                record["memory_gib"], 100 * record["data_wait_share"],
                f"  skipped {skipped_steps}" if skipped_steps else "", _routing_text(routing),
            )  # fmt: skip
            if record["mfu"] > 100 and not self._mfu_warned:
                self._mfu_warned = True
                logger.warning(
                    "MFU %.0f%% cannot be: this device's peak is above the %.4g TFLOP/s assumed; "
                    "set its peak with --metrics.peak_tflops",
                    record["mfu"], self.peak_tflops,
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
        if self.wandb is not None:
            self.wandb.log(record, step)

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
        if self.wandb is not None:
            self.wandb.close()
