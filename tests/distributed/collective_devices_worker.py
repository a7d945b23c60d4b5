"""torchrun worker: train under ``collective_guard`` and write what it saw to OUT/rank<R>.json:
a self-check (a host tensor made without a device must be caught, one on the device must not),
the collective calls by entry point, and every violation.

    torchrun --nproc-per-node 4 tests/distributed/collective_devices_worker.py OUT <train args>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.collective_guard import CollectiveGuard, HostDefaultTracker


def main(out: Path, argv: list[str]) -> None:
    tracker = HostDefaultTracker()
    trainer = None
    # The device the trainer will be given; compared once the trainer exists.
    guard = CollectiveGuard(tracker, lambda: trainer.device if trainer else torch.device("cpu"))
    with guard.active(), tracker:
        # Imported under the guard: modules that bind a collective by name get the wrapper.
        from tetrad.train import parse_config
        from tetrad.trainer import Trainer

        trainer = Trainer(parse_config(argv))
        try:
            # The bug this test exists for (a host scalar all-reduced), and its fix.
            dist.all_reduce(torch.tensor(1.0))
            dist.all_reduce(torch.ones((), device=trainer.device))
            self_check = [v["call"] for v in guard.violations]
            guard.violations.clear()
            guard.calls.clear()
            trainer.train()
        finally:
            trainer.close()
    report = {"self_check": self_check, "calls": guard.calls, "violations": guard.violations}
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
