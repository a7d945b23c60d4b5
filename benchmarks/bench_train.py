"""Throughput of the debug preset as the training log reports it: median tokens/s and MFU.

Runs `tetrad train` for each layout (1 process; FSDP 2; TP 2; and, with --layouts, CP 2,
PP 2 with 1F1B, and EP 2 for a MoE model) with seq_len 256 and 2048 tokens per data-parallel rank per step, skips the first
steps (warm-up), and prints one line per layout.

    python benchmarks/bench_train.py [--steps 40] [--layouts single,fsdp2,tp2,cp2,pp2,ep2] [train args]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "single": (1, []),
    "fsdp2": (2, ["--parallelism.dp_shard=2"]),
    "tp2": (2, ["--parallelism.tp=2", "--parallelism.dp_shard=1"]),
    "cp2": (2, ["--parallelism.cp=2", "--parallelism.dp_shard=1"]),
    "pp2": (2, ["--parallelism.pp=2", "--parallelism.dp_shard=1"]),
    "ep2": (2, ["--parallelism.ep=2"]),  # MoE models: --model.name qwen3_moe
}
WARMUP_STEPS = 5


def run(layout: str, steps: int, extra: list[str]) -> dict[str, float]:
    nproc, layout_args = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "tetrad.cli", "train", f"--nproc={nproc}",
            f"--job.dump_folder={tmp}", f"--training.steps={steps}", "--training.seq_len=256",
            "--training.local_batch_size=8", "--metrics.log_freq=1",
            f"--lr_scheduler.warmup_steps={min(10, steps)}", *layout_args, *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
    timed = [r for r in records if r["step"] > WARMUP_STEPS]
    return {
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "tflops": statistics.median(r["tflops"] for r in timed),
        "final_loss": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layouts", default="single,fsdp2,tp2")
    args, extra = parser.parse_known_args()
    for layout in args.layouts.split(","):
        r = run(layout, args.steps, extra)
        print(
            f"{layout:>7}: {r['tokens_per_sec']:8.0f} tokens/s per rank  "
            f"{r['tflops']:.3f} TFLOP/s  MFU {r['mfu']:5.2f}%  final loss {r['final_loss']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
