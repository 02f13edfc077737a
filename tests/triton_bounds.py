"""Triton's interpreter with every memory access checked against its launch's
tensors.

The interpreter runs a kernel on the CPU through raw host addresses: a load or
store past its tensor reads or overwrites a neighbour silently, where a GPU
faults. Inside ``checked_accesses()`` each load and store that its mask lets
through must fall inside the storage of a tensor passed to the launch, else
the launch raises ``OutOfBoundsAccess`` naming the kernel and the first
address::

    os.environ['TRITON_INTERPRET'] = '1'   # before triton is first imported
    with checked_accesses():
        memory(x).sum().backward()

Only the interpreter's launches are checked; it patches the interpreter's
classes for the duration of the block (not thread-safe).

A tile that no program writes is the other silent fault: its output keeps
whatever the allocator handed back, often the right values of an earlier
run. Inside ``nan_filled_allocations()`` new floating tensors start as NaN,
so an unwritten tile shows in any NaN-aware comparison.
"""
import contextlib
import math
from typing import Iterator, List, Tuple
from unittest import mock

import numpy as np
import torch

__all__ = ['OutOfBoundsAccess', 'checked_accesses', 'nan_filled_allocations']


class OutOfBoundsAccess(RuntimeError):
    """A kernel loaded or stored outside every tensor of its launch."""


def _storage_ranges(args) -> List[Tuple[int, int]]:
    """[start, end) of the storage of every tensor among ``args`` (and in tuples)."""
    ranges = []
    for arg in args:
        if isinstance(arg, tuple):
            ranges += _storage_ranges(arg)
        elif hasattr(arg, 'untyped_storage'):
            storage = arg.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return ranges


def _check(launch: dict, ptrs, mask, itemsize: int, what: str) -> None:
    addresses = ptrs.data.astype(np.uint64)
    live = addresses[np.broadcast_to(mask.data.astype(bool), addresses.shape)]
    inside = np.zeros(live.shape, dtype=bool)
    for start, end in launch['ranges']:
        inside |= (live >= start) & (live + itemsize <= end)
    if not inside.all():
        outside = live[~inside]
        raise OutOfBoundsAccess(
            f"{launch['kernel']}: a {what} of {outside.size} element(s) outside every tensor "
            f'of the launch, the first at address {int(outside[0])} (tensors at '
            f"{[(start, end - start) for start, end in launch['ranges']]}, as (address, bytes))")


@contextlib.contextmanager
def checked_accesses() -> Iterator[None]:
    """Check every masked-in load and store of the interpreter's launches
    inside the block (see the module's docstring)."""
    from triton.runtime import interpreter

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    saved = (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store)
    launch = dict(kernel='?', ranges=[])

    def init_args(self, args_dev, kwargs):
        launch.update(kernel=getattr(self.fn, '__name__', repr(self.fn)),
                      ranges=_storage_ranges(tuple(args_dev) + tuple(kwargs.values())))
        return saved[0](self, args_dev, kwargs)

    def masked_load(self, ptrs, mask, *args):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        _check(launch, ptrs, mask, itemsize, 'load')
        return saved[1](self, ptrs, mask, *args)

    def masked_store(self, ptrs, value, mask, *args):
        _check(launch, ptrs, mask, value.data.dtype.itemsize, 'store')
        return saved[2](self, ptrs, value, mask, *args)

    executor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield
    finally:
        (executor._init_args_hst, builder.create_masked_load,
         builder.create_masked_store) = saved


@contextlib.contextmanager
def nan_filled_allocations() -> Iterator[None]:
    """Inside the block, ``torch.empty``, ``torch.empty_like`` and
    ``Tensor.new_empty`` return floating tensors filled with NaN (see the
    module's docstring); other dtypes as usual. Not thread-safe."""
    def filled(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    with mock.patch.object(torch, 'empty', lambda *a, **k: filled(empty(*a, **k))), \
            mock.patch.object(torch, 'empty_like', lambda *a, **k: filled(empty_like(*a, **k))), \
            mock.patch.object(torch.Tensor, 'new_empty',
                              lambda self, *a, **k: filled(new_empty(self, *a, **k))):
        yield
