"""Dispatch probes: what the ATen ops inside a context launch, move and keep.

``AtenOpCounter`` counts kernels and the bytes they move; ``LiveTensorBytes``
follows the storages the ops create and records the most alive at once. Both
run on any device, ``meta`` included (shapes without data: a training-sized
batch in seconds). They need torch only, so that the lab's op counts
(``python -m benchmarks.run ops --before PATH``) can load this file by path
into a child that imports another checkout.
"""
import weakref
from collections import Counter
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def tensors_in(tree) -> List[torch.Tensor]:
    """The tensors among the leaves of a pytree (an op's arguments or outputs)."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


# allocations: they launch no kernel and move no bytes
_ALLOCATIONS = frozenset(('empty', 'empty_like', 'empty_strided', 'new_empty',
                          'new_empty_strided'))


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the context (eager mode), by
    name: ``kernels`` those that return a tensor and compute (what a GPU launches), ``views``
    the aliasing ones (views, reshapes, detach), which launch nothing;
    allocations (``empty``) and ops whose results are all empty count as
    neither (ATen launches no kernel for a result without elements).
    ``bytes``: per kernel op, the bytes of its tensor arguments and results,
    each read or written once: the least memory traffic of an unfused op (an
    ``out=`` tensor is written, not read).

    Used by the tests and the lab's op and byte counts (``python -m
    benchmarks.run ops``) to compare one path of the memory against another by
    the kernels it launches."""

    def __init__(self):
        super().__init__()
        self.kernels: Counter = Counter()
        self.views: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = tensors_in(out)
        name = str(func.overloadpacket.__name__)
        # ops that return no tensor (``promote_types``) or only empty ones compute nothing
        if outs and name not in _ALLOCATIONS and (func.is_view or any(t.numel() for t in outs)):
            (self.views if func.is_view else self.kernels)[name] += 1
            if not func.is_view:
                written = {id(t) for t in outs}
                ins = tensors_in(args) + [t for t in tensors_in(kwargs) if id(t) not in written]
                self.bytes[name] += sum(t.numel() * t.element_size() for t in ins + outs)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def num_views(self) -> int:
        return sum(self.views.values())


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the storages that ops inside the context create, alive
    at once: ``peak`` the most, ``live`` now; ``most_storages`` the most
    storages alive at once. A storage counts from the op that creates it
    until the last tensor that views it is freed; storages made before the
    context (weights, inputs), results that alias an argument's storage
    (views, in-place ops) and storages under ``min_bytes`` add nothing.
    Tensors that ATen keeps without returning them (autograd's saved tensors)
    are not seen: measure inference.

    Used to check ``NeuralMemory.working_set_bytes`` and the write path's
    early frees against the tensors inference really holds, and by
    ``benchmarks.memory.bytes``."""

    def __init__(self, min_bytes: int = 0):
        super().__init__()
        self.min_bytes = min_bytes
        self._storages: Dict[int, List[int]] = {}  # storage -> [tensors, bytes]
        self.live = self.peak = self.most_storages = 0

    @staticmethod
    def key(t: torch.Tensor) -> int:
        """The key of the storage ``t`` views, for ``holds`` (a key keeps
        nothing alive)."""
        return t.untyped_storage()._cdata

    def holds(self, key: int) -> bool:
        """Whether the storage of ``key`` (``key(t)``) is counted and alive."""
        return key in self._storages

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made_before = None
        for t in tensors_in(out):
            key = self.key(t)
            entry = self._storages.get(key)
            if entry is None:
                if made_before is None:
                    made_before = {self.key(a) for a in tensors_in((args, kwargs))}
                nbytes = t.untyped_storage().nbytes()
                if key in made_before or nbytes < self.min_bytes:  # made outside, or small
                    continue
                entry = self._storages[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.most_storages = max(self.most_storages, len(self._storages))
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out
