"""Exact memory of a training step on any device, the ground truth ``pocketrlhf plan`` is checked
against (tests/test_plan.py, bench/plan_check.py, bench/ppo_memory.py).

Every tensor storage created inside a ``LiveTensors`` block is counted while it lives (a
``TorchDispatchMode`` with weakref finalizers), so the peak is what an allocator would have to
hold without its rounding; the static bytes (weights with bitsandbytes' quantization constants,
buffers, optimizer state) are counted from the live objects.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages created inside the block that are still alive (``current``) and their
    highest sum (``peak``, and ``window``: since the last ``take_window``); storages whose data
    pointers are in ``ignore`` are not counted."""

    def __init__(self, ignore: set[int] | None = None, follow_resizes: bool = False):
        """``follow_resizes``: count every storage at its size of the moment (each op sums them),
        for code that frees memory by resizing a storage rather than dropping it: FSDP2 frees a
        gathered layer with ``storage.resize_(0)`` and gathers it again into the same storage
        object at a new address, which the default count (each storage at its size when first
        seen, until it dies) would take for a second storage while the first is still counted whole."""
        super().__init__()
        self.ignore, self.sizes, self.current, self.peak, self.window = ignore or set(), {}, 0, 0, 0
        self.follow_resizes = follow_resizes
        self.storages: dict[int, weakref.ref] = {}  # StorageImpl address -> storage (follow_resizes)

    def take_window(self) -> int:
        """The highest sum since the last call (the peak of one phase of a step), then start anew."""
        peak, self.window = self.window, self.current
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.follow_resizes:
            self._follow(out)
            return out
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = local_storage(t)
                ptr = storage.data_ptr()
                if ptr and ptr not in self.ignore and ptr not in self.sizes:
                    self.sizes[ptr] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    self.window = max(self.window, self.current)
                    weakref.finalize(storage, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.current -= self.sizes.pop(ptr, 0)

    def _follow(self, out) -> None:
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = local_storage(t)
                key = storage._cdata  # the same across resizes, unlike the data pointer
                if key not in self.storages and storage.data_ptr() not in self.ignore:
                    self.storages[key] = weakref.ref(storage)
                    weakref.finalize(storage, self.storages.pop, key, None)
        self.current = sum(s.nbytes() for s in (ref() for ref in list(self.storages.values())) if s is not None)
        self.peak = max(self.peak, self.current)
        self.window = max(self.window, self.current)


def local_storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage ``t`` holds on this process: a DTensor (FSDP's sharded weights, gradients and
    optimizer state) holds its part in a plain local tensor."""
    return getattr(t, "_local_tensor", t).untyped_storage()


def storage_bytes(tensors: Iterable[Any]) -> dict[int, int]:
    """Bytes of each distinct storage among ``tensors`` (non-tensors skipped; a DTensor's local
    part), by data pointer."""
    storages = [local_storage(t) for t in tensors if torch.is_tensor(t)]
    return {s.data_ptr(): s.nbytes() for s in storages}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """The optimizer's state tensors (what a paged optimizer can evict to CPU memory)."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values())


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Weights (with bitsandbytes' quantization constants), buffers and optimizer state."""
    tensors: list[Any] = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors += [v for v in vars(qs).values() if torch.is_tensor(v)]
            tensors += [v for v in vars(getattr(qs, "state2", None) or object()).values() if torch.is_tensor(v)]
        tensors.append(getattr(p, "SCB", None))
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return storage_bytes(tensors)


def measure_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                  steps: int = 2) -> dict[str, int]:
    """Memory of the last of ``steps`` optimizer steps (the second one runs with optimizer state):
    ``static`` bytes, of which ``optimizer`` state (and ``largest_state``: the most state one
    parameter holds), bytes ``held`` for backward at the end of the forward pass, the ``peak`` of
    forward + backward above the static bytes, and ``step``: the peak of what the optimizer step
    itself allocates (gradients excluded)."""
    for _ in range(steps):
        gc.collect()
        static = static_bytes(model, optimizer)
        state = optimizer_state_bytes(optimizer)
        largest = max((sum(storage_bytes(s.values()).values()) for s in optimizer.state.values()), default=0)
        tracker = LiveTensors(set(static))
        with tracker:
            loss = loss_fn()
            held = tracker.current
            loss.backward()
        with LiveTensors(set(static)) as stepping:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"static": sum(static.values()), "optimizer": sum(state.values()), "largest_state": largest, "held": held,
            "peak": tracker.peak, "step": stepping.peak}
