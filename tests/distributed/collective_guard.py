"""Checks tetrad's collective rule on a CPU machine: every tensor handed to a collective lives
on the trainer's device, and none is a host tensor made without choosing a device.

On CPU every tensor is on the trainer's device, so comparing devices alone could never fail
here. What breaks on NCCL is a tensor that lands on the host because nobody chose a device
(``torch.tensor(n)``, ``torch.from_numpy``): ``HostDefaultTracker`` marks those and everything
computed from them, until an explicit move (``.to(device)``, ``device=``) clears the mark, and
``CollectiveGuard`` wraps the c10d and functional-collective entry points and records each
marked or misplaced tensor they receive. The same check runs unchanged on GPUs, where the device
comparison bites too.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

C10D_TENSOR = [
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_coalesced",
    "all_gather_into_tensor", "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather",
    "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
]  # fmt: skip
C10D_OBJECT = [
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list", "barrier", "monitored_barrier",
]  # fmt: skip
FUNCOL = [
    "all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "all_gather_single",
    "reduce_scatter_tensor", "reduce_scatter_tensor_autograd", "all_to_all_single",
    "all_to_all_single_autograd",
]  # fmt: skip


class HostDefaultTracker(TorchFunctionMode):
    """Marks CPU tensors made by a factory without a ``device`` and what is computed from them."""

    def __init__(self) -> None:
        super().__init__()
        self.marked: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moved = kwargs.get("device") is not None or func is torch.Tensor.cuda
        if func is torch.Tensor.to:
            moved = moved or any(isinstance(a, torch.device | str | torch.Tensor) for a in args[1:])
        if moved:  # on a CPU machine .to(device) returns the tensor itself: clear its mark
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.marked.pop(t, None)
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not inputs or any(t in self.marked for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.marked[t] = True
        return out


class CollectiveGuard:
    """Wraps the collective entry points while active; ``calls`` counts them by name and
    ``violations`` lists each bad tensor (entry point, device, why, where it was issued)."""

    def __init__(self, tracker: HostDefaultTracker, expected: Callable[[], torch.device]) -> None:
        self.tracker, self.expected = tracker, expected
        self.calls: Counter[str] = Counter()
        self.violations: list[dict[str, str]] = []
        self._depth = 0

    def _check(self, name: str, tensors: list[torch.Tensor]) -> None:
        self.calls[name] += 1
        expected = self.expected()
        for t in tensors:
            why = []
            if t.device != expected:
                why.append(f"on {t.device}, not {expected}")
            if t in self.tracker.marked:
                why.append("a host tensor made without choosing a device")
            if why:
                caller = "".join(traceback.format_stack(limit=8)[:-3])
                self.violations.append({"call": name, "why": "; ".join(why), "stack": caller})

    def _check_current_device(self, name: str) -> None:
        self.calls[name] += 1
        expected = self.expected()
        if expected.type == "cuda" and torch.cuda.current_device() != expected.index:
            why = f"current CUDA device {torch.cuda.current_device()}, not {expected}"
            self.violations.append({"call": name, "why": why, "stack": ""})

    def _wrap(self, name: str, fn: Callable, tensors_of: Callable | None) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # c10d functions re-enter themselves through torch-function handling: check once.
            if self._depth == 0:
                if tensors_of is None:
                    self._check_current_device(name)
                else:
                    self._check(name, tensors_of(args, kwargs))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        def tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
            leaves = tree_flatten((args, kwargs))[0]
            ops = [leaf for leaf in leaves if isinstance(leaf, dist.P2POp)]
            return [x for x in leaves if isinstance(x, torch.Tensor)] + [op.tensor for op in ops]

        patches = [(m, n, "c10d." + n, tensors) for n in C10D_TENSOR for m in (dist, c10d)]
        patches += [(m, n, "c10d." + n, None) for n in C10D_OBJECT for m in (dist, c10d)]
        patches += [(funcol, n, "funcol." + n, tensors) for n in FUNCOL]
        originals = [(m, n, getattr(m, n)) for m, n, _, _ in patches]
        wrappers: dict[int, Callable] = {}  # one wrapper per function: P2POp compares them
        for (module, name, label, tensors_of), (_, _, fn) in zip(patches, originals, strict=True):
            wrapper = wrappers.setdefault(id(fn), self._wrap(label, fn, tensors_of))
            setattr(module, name, wrapper)
        try:
            yield
        finally:
            for module, name, fn in originals:
                setattr(module, name, fn)
