"""torchrun worker: build a ~0.5 GB Llama on meta, FSDP-shard it as the trainer does, then
materialise and initialise it, measuring the peak resident set size of that step alone; writes
OUT/rank<R>.json with the figures the test bounds.

    torchrun --nproc-per-node 2 tests/distributed/init_memory_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.config import load_config
from tetrad.distributed.init import init_distributed
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.models.llama3 import Llama3Config, Transformer
from tetrad.models.materialize import materialize_and_init
from tetrad.models.registry import get_model_spec

CONFIG = Llama3Config(dim=512, n_layers=32, n_heads=8, vocab_size=8192, max_seq_len=64)
WARM_UP = Llama3Config(dim=64, n_layers=1, n_heads=4, vocab_size=256, max_seq_len=64)


def rss_kib() -> dict[str, int]:
    """Current and peak resident set size, from the kernel's own accounting."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def main(out: Path) -> None:
    device = init_distributed(60)
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, world_size=2)
    for config in (WARM_UP, CONFIG):  # the first run faults in the kernels' code pages
        with torch.device("meta"):
            model, reference = Transformer(config), Transformer(config)
        get_model_spec("llama3").parallelize_fn(model, dims, load_config([]))
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        before = rss_kib()["VmRSS"]
        materialize_and_init([model], reference, device=device, seed=0)
        peak = rss_kib()["VmHWM"]
    sizes = [p.numel() * p.element_size() for p in reference.parameters()]
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    report = {
        "init_peak_bytes": (peak - before) * 1024,
        "shard_bytes": shard,
        "largest_parameter_bytes": max(sizes),
        "model_bytes": sum(sizes),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
