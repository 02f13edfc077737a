"""The scan as one Triton kernel per weight tensor, a custom operator
``torch.ops.convneur_mm.memory_scan`` whose backward is another
(``torch.ops.convneur_mm.memory_scan_backward``)."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernels.launcher import launch_config
from ..kernels.ops import (call_kernel_op, check_runnable, kernel_op,
                           register_first_order_autograd)
from ..kernels.tiles import cdiv, next_pow2

SCAN_BLOCK = 1024  # entries per program: a row of states is walked in blocks


def _block(entries: int) -> Tuple[int, int]:
    """(entries per program, warps): ``SCAN_BLOCK``, or a narrower row's
    power of two (g's C_m entries would leave most of 1024 lanes masked),
    at 256 entries per warp."""
    bp = min(SCAN_BLOCK, max(32, next_pow2(entries)))
    return bp, max(1, bp // 256)


def scan_states_triton(grads: List[Optional[Tensor]], lr_mod: Tensor, log_keep: Tensor,
                       log_momentum: Tensor, initial: Sequence[Optional[Tensor]], *,
                       state_dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Tensor]:
    """``scan_states`` step by step in one kernel per tensor: each program
    keeps a block of one row's W and S in registers and walks the U steps,
    reading each gradient once and writing each state once, in its
    ``state_dtypes`` entry: a state that only products read can be written
    straight in their 16-bit operand dtype (the same rounding as a cast of
    the float32 state). No (U, U) decay matrix is built. Differentiable: its
    backward kernel reruns the momenta and walks the steps backwards from
    the saved states (nothing else is saved), in float32 whatever the
    states' and gradients' dtypes; the gradients' gradient comes in theirs.
    The arguments as ``scan_states``' (no ``block_size``: no blocks).

    Args:
        grads: K gradients (N, U, P_k), float32, or in the dtype of their
            16-bit state. The list is consumed as ``scan_states`` consumes it.
        lr_mod: (K, N, U) rho_t of each tensor.
        log_keep, log_momentum: (N, U) log(1 - alpha_t), log(eta_t).
        initial: K W_0 (N, P_k), or None entries (the updates alone).
        state_dtypes: K dtypes of the states (float32, float16, bfloat16);
            None: float32. The memory trains on 16-bit states with bfloat16
            only (``neural_memory.TRAINING_STATE_DTYPES``).

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
    tensors = [t for t in (*grads, lr_mod, log_keep, log_momentum, *initial) if t is not None]
    if any(t.device != log_keep.device for t in tensors):
        raise ValueError('the scan kernel takes tensors on one device, got '
                         f'{sorted({str(t.device) for t in tensors})}')
    del tensors  # it holds every gradient: each must go once scanned
    states = []
    for i, (rho, w0, dtype) in enumerate(zip(lr_mod, initial, dtypes)):
        g, grads[i] = grads[i], None
        if g.dim() != 3 or g.shape[:2] != (n, u):
            raise ValueError(f'grads[{i}] must be ({n}, {u}, P), got {tuple(g.shape)}')
        if w0 is not None and w0.shape != (n, g.shape[2]):
            raise ValueError(f'initial[{i}] must be {(n, g.shape[2])}, got {tuple(w0.shape)}')
        if g.dtype not in (torch.float32, dtype):
            raise TypeError(f'the scan kernel takes float32 grads, or grads in their states\' '
                            f'dtype {dtype}; got {g.dtype}')
        for name, t in (('lr_mod', rho), ('log_keep', log_keep),
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
    check_runnable(grads, state_dtype, whole_rows=False)  # rows walked in blocks: any width
    n, u, p = grads.shape
    out = grads.new_empty(n, u + 1, p, dtype=state_dtype)
    _check_steps_span(u, grads, out)
    if out.numel():
        launch_scan(grads, lr_mod, log_keep, log_momentum, initial, out)
    return out


def launch_scan(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
                initial: Optional[Tensor], out: Tensor) -> None:
    """Launch the scan kernel: a program per (row, block of ``_block``
    entries) walks the U steps of ``grads`` (N, U, P), writing the states
    ``out`` (N, U + 1, P) in its dtype; without ``initial`` W_0 is zero."""
    n, u, p = grads.shape
    kernels, _ = launch_config('scan', out.dtype, grads.device)
    bp, warps = _block(p)
    blocks = cdiv(p, bp)
    w0 = grads if initial is None else initial
    kernels.scan_kernel[(n * blocks,)](
        grads, lr_mod, log_keep, log_momentum, w0, out, u, p, blocks,
        *grads.stride(), *lr_mod.stride(), *log_keep.stride(), *log_momentum.stride(),
        w0.stride(0), w0.stride(-1), *out.stride(),
        HAS_INITIAL=initial is not None, BP=bp, num_warps=warps)


def _check_steps_span(steps: int, *tensors: Tensor) -> None:
    """Offsets inside a row are int32: U + 1 steps of each (N, U, P)
    tensor's row, with its P entries, must span < 2**31 elements (rows are
    addressed by int64 offsets)."""
    for t in tensors:
        if t.numel() and (steps + 1) * abs(t.stride(1)) + t.shape[2] * abs(t.stride(2)) >= 2**31:
            raise ValueError(f'{steps} steps of {t.shape[-1]} entries span more than 2**31 '
                             "elements, beyond the scan kernel's int32 offsets")


ScanGrads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _scan_backward(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
                   initial: Optional[Tensor], states: Tensor, grad_states: Tensor) -> ScanGrads:
    """The gradients of (grads, lr_mod, log_keep, log_momentum, initial); the
    last empty without ``initial``. The gates' gradients are per-block shares
    summed in a fixed order (deterministic)."""
    check_runnable(grads, torch.float32, whole_rows=False)
    n, u, p = grads.shape
    blocks = cdiv(p, _block(p)[0])
    d_grads = grads.new_empty(n, u, p)  # in the gradients' dtype, as autograd returns it
    opts = dict(device=grads.device, dtype=torch.float32)
    shares = torch.empty(3, n, blocks, u, **opts)
    d_initial = torch.empty(n, p, **opts) if initial is not None else torch.empty(0, **opts)
    _check_steps_span(u, grads, states, grad_states, d_grads)
    if d_grads.numel():
        launch_scan_backward(grads, lr_mod, log_keep, log_momentum, states, grad_states,
                             d_grads, None if initial is None else d_initial, shares)
    elif initial is not None:  # no steps: W_0 is the only state
        d_initial.copy_(grad_states[:, 0])
    return (d_grads, shares[0].sum(dim=1), shares[1].sum(dim=1), shares[2].sum(dim=1),
            d_initial)


def launch_scan_backward(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
                         states: Tensor, grad_states: Tensor, d_grads: Tensor,
                         d_initial: Optional[Tensor], shares: Tensor) -> None:
    """Launch the scan's backward kernel, layouts as ``launch_scan``'s: it
    walks the steps backwards from the saved ``states``, writing ``d_grads``
    (in its dtype), ``d_initial`` (N, P) where W_0 was given, and each
    block's float32 shares (3, N, blocks, U) of the three gates' gradients."""
    n, u, p = grads.shape
    kernels, _ = launch_config('scan', torch.float32, grads.device)
    bp, warps = _block(p)
    blocks = cdiv(p, bp)
    w0 = d_grads if d_initial is None else d_initial
    kernels.scan_backward_kernel[(n * blocks,)](
        grads, lr_mod, log_keep, log_momentum, states, grad_states, d_grads, w0,
        shares[0], shares[1], shares[2], u, p, blocks,
        *grads.stride(), *lr_mod.stride(), *log_keep.stride(), *log_momentum.stride(),
        *states.stride(), *grad_states.stride(), *d_grads.stride(),
        w0.stride(0), w0.stride(-1), HAS_INITIAL=d_initial is not None, BP=bp,
        num_warps=warps)


_scan_op = kernel_op('memory_scan', _scan)
_scan_backward_op = kernel_op('memory_scan_backward', _scan_backward)


@_scan_op.register_fake
def _scan_fake(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
               initial: Optional[Tensor], state_dtype: torch.dtype) -> Tensor:
    n, u, p = grads.shape
    return grads.new_empty(n, u + 1, p, dtype=state_dtype)


@_scan_backward_op.register_fake
def _scan_backward_fake(grads: Tensor, lr_mod: Tensor, log_keep: Tensor, log_momentum: Tensor,
                        initial: Optional[Tensor], states: Tensor, grad_states: Tensor
                        ) -> ScanGrads:
    n, u, p = grads.shape
    new = lambda *shape: grads.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (grads.new_empty(n, u, p), new(n, u), new(n, u), new(n, u),
            new(0) if initial is None else new(n, p))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:5], output)


def _backward(ctx, grad_states: Tensor) -> tuple:
    grads, lr_mod, log_keep, log_momentum, initial, states = ctx.saved_tensors
    d = call_kernel_op(_scan_backward_op, _scan_backward, grads, lr_mod, log_keep, log_momentum,
                       initial, states, grad_states)
    return (*d[:4], None if initial is None else d[4], None)


register_first_order_autograd(_scan_op, _backward, _setup_context)
