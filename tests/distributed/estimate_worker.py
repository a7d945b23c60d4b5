"""Worker (plain, or under torchrun): the real counterpart of ``tetrad estimate``. Builds the
rank's model as training does (``build_rank``), materialises it, runs two of the
estimator's training steps (``train_step``) on real tensors, and writes OUT/rank<R>.json with the peak
resident set size those steps added, from the kernel's own accounting (VmHWM).

    [torchrun --nproc-per-node 2] tests/distributed/estimate_worker.py OUT ARGS...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.components.optimizer import build_optimizer
from tetrad.config import load_config
from tetrad.distributed.init import init_distributed
from tetrad.plan.dry_run import build_rank, tokenizer_vocab_size
from tetrad.plan.estimate import train_step


def rss_kib(key: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[key].split()[0])


def peak_bytes(args: list[str]) -> int:
    """Peak RSS added by materialising the rank's model and two training steps."""
    config = load_config(args)
    world_size = dist.get_world_size()
    vocab_size = tokenizer_vocab_size(config)
    dims, built = build_rank(config, world_size, vocab_size=vocab_size)
    (model,) = built.parts
    device = torch.device("cpu")
    t = config.training
    shape = (t.local_batch_size, t.seq_len)
    inputs = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(1))
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    before = rss_kib("VmRSS")
    model.to_empty(device=device)
    model.init_buffers(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    optimizer = build_optimizer(built.parts, config.optimizer, device)
    for _ in range(2):
        train_step([model], optimizer, inputs, labels, config, dims)
    return (rss_kib("VmHWM") - before) * 1024


def main(out: Path, args: list[str]) -> None:
    init_distributed(60)
    # The first run faults in the kernels' code pages and the allocator's arenas.
    peak_bytes([*args, "--model.flavor=tiny", "--training.seq_len=64"])
    report = {"peak_bytes": peak_bytes(args)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
