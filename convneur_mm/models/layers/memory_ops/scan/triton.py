"""The scan as one Triton kernel per weight tensor, a custom operator
``torch.ops.convneur_mm.memory_scan`` (inference: it has no backward, and
training scans in PyTorch)."""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..kernels.availability import unavailable_reason
from ..kernels.launch import call_kernel_op, cdiv, launch_config

SCAN_BLOCK = 1024  # entries per program: a row of states is walked in blocks


def scan_states_triton(grads: List[Optional[Tensor]], lr_mod: Tensor, log_keep: Tensor,
                       log_momentum: Tensor, initial: Sequence[Optional[Tensor]],
                       state_dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Tensor]:
    """``scan_states`` step by step in one kernel per tensor: each program
    keeps a block of one row's W and S in registers and walks the U steps,
    reading each gradient once and writing each state once, in its
    ``state_dtypes`` entry: a state that only products read can be written
    straight in their 16-bit operand dtype (the same rounding as a cast of
    the float32 state). No (U, U) decay matrix is built.

    Args:
        grads: K gradients (N, U, P_k), float32. The list is consumed as
            ``scan_states`` consumes it.
        lr_mod: (K, N, U) rho_t of each tensor.
        log_keep, log_momentum: (N, U) log(1 - alpha_t), log(eta_t).
        initial: K W_0 (N, P_k), or None entries (the updates alone).
        state_dtypes: K dtypes of the states (float32, float16, bfloat16);
            None: float32.

    Returns:
        K states (N, U + 1, P_k).
    """
    dtypes = list(state_dtypes or [torch.float32] * len(grads))
    if not len(grads) == len(lr_mod) == len(initial) == len(dtypes):
        raise ValueError(f'{len(grads)} gradients need as many lr_mod rows, initial states and '
                         f'state dtypes, got {len(lr_mod)}, {len(initial)} and {len(dtypes)}')
    n, u = log_keep.shape
    for name, t in (('log_momentum', log_momentum), ('lr_mod', lr_mod[0])):
        if t.shape != (n, u):
            raise ValueError(f'{name} must be {(n, u)} as log_keep, got {tuple(t.shape)}')
    states = []
    for i, (rho, w0, dtype) in enumerate(zip(lr_mod, initial, dtypes)):
        g, grads[i] = grads[i], None
        if g.dim() != 3 or g.shape[:2] != (n, u):
            raise ValueError(f'grads[{i}] must be ({n}, {u}, P), got {tuple(g.shape)}')
        if w0 is not None and w0.shape != (n, g.shape[2]):
            raise ValueError(f'initial[{i}] must be {(n, g.shape[2])}, got {tuple(w0.shape)}')
        for name, t in (('grads', g), ('lr_mod', rho), ('log_keep', log_keep),
                        ('log_momentum', log_momentum)) + ((('initial', w0),) if w0 is not None
                                                           else ()):
            if t.dtype != torch.float32:
                raise TypeError(f'the scan kernel takes float32 {name}, got {t.dtype}')
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f'state dtypes are float32, float16 or bfloat16, got {dtype}')
        states.append(call_kernel_op(_scan_op, _scan, g, rho, log_keep, log_momentum, w0, dtype))
        del g
    return states


def _scan(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
          initial: Optional[Tensor], state_dtype: torch.dtype) -> Tensor:
    """The operator's implementation: allocate and launch (checked arguments)."""
    why = unavailable_reason(grads.device, operand_dtype=state_dtype)
    if why is not None:
        raise RuntimeError(f'the scan kernel cannot run: {why}')
    n, u, p = grads.shape
    out = grads.new_empty(n, u + 1, p, dtype=state_dtype)
    if out.numel() and (u + 1) * max(grads.stride(1), out.stride(1)) >= 2**31:
        raise ValueError(f'{u} steps of {p} entries span more than 2**31 elements, beyond the '
                         "scan kernel's int32 offsets")
    if out.numel():
        kernels, _ = launch_config(state_dtype, grads.device)
        blocks = cdiv(p, SCAN_BLOCK)
        w0 = grads if initial is None else initial
        kernels.scan_kernel[(n * blocks,)](
            grads, lr_mod, log_keep, log_momentum, w0, out, u, p, blocks,
            *grads.stride(), *lr_mod.stride(), *log_keep.stride(), *log_momentum.stride(),
            w0.stride(0), w0.stride(-1), *out.stride(),
            HAS_INITIAL=initial is not None, BP=SCAN_BLOCK, num_warps=4)
    return out


_scan_op = torch.library.custom_op('convneur_mm::memory_scan', _scan, mutates_args=())


@_scan_op.register_fake
def _scan_fake(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
               initial: Optional[Tensor], state_dtype: torch.dtype) -> Tensor:
    n, u, p = grads.shape
    return grads.new_empty(n, u + 1, p, dtype=state_dtype)
