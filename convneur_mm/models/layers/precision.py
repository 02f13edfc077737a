"""Autocast-aware precision: which autocast is in force, and running a
function in float32 under it (sums that 16-bit types overflow or round away).
"""
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor

# device types with autocast in every torch we meet: no availability query
# for them (torch 2.11's Dynamo cannot trace `torch._C._is_autocast_available`
# and broke the graph there, in GRN's norm: on an H100, then reproduced on a
# CPU, 2026-11-25; torch 2.13 traces it)
ALWAYS_AUTOCAST = ('cpu', 'cuda')


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on this device type, None where it is off
    (or the device type has no autocast, e.g. ``meta``)."""
    if device_type not in ALWAYS_AUTOCAST and not torch.amp.is_autocast_available(device_type):
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> ContextManager:
    """A context with this device type's autocast off: none where it is off
    already or the device type has none (``torch.autocast`` refuses ``meta``)."""
    if autocast_dtype(device_type) is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def in_float32(fn: Callable[[Tensor], Tensor], x: Tensor,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fn(x)`` computed in float32 (float64 stays float64) with autocast
    off, the result cast to ``out_dtype`` (default: ``x``'s dtype)."""
    with autocast_off(x.device.type):
        out = fn(x.to(torch.promote_types(x.dtype, torch.float32)))
    return out.to(out_dtype or x.dtype)
