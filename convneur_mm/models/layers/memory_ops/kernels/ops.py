"""What every op's Triton wrapper shares: its custom operator
(``kernel_op``, ``call_kernel_op``) and the checks of its arguments.

The product kernels have backward kernels, which recompute what the forward
computed instead of saving it. Inputs are float32 (features, and states
where they train; the scan kernel writes inference states that only
products read in 16 bits); ``operand_dtype`` is the dtype of the products'
operands, with float32 accumulation (float32 operands multiply in IEEE
float32, not TF32).
"""
import contextlib
import functools
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..common import MemoryWeights, check_gelu_approximate, first_order_only
from .availability import OPERAND_DTYPES, launches_skipped, unavailable_reason
from .launcher import recording
from .tiles import check_tiles


def kernel_op(name: str, implementation: Callable) -> Callable:
    """``implementation`` as the custom operator ``convneur_mm::<name>``
    (``torch.compile`` keeps it whole, CUDA graphs capture it), which runs
    with its tensors' GPU current (``on_tensors_device``), wherever it is
    called from: eagerly, by autograd or by a compiled graph."""
    @functools.wraps(implementation)  # the schema is read from its signature
    def on_device(*args, **kwargs):
        with on_tensors_device(*args, *kwargs.values()):
            return implementation(*args, **kwargs)
    qualname = f'convneur_mm::{name}'
    op = torch.library.custom_op(qualname, on_device, mutates_args=())
    _QUALNAMES[op] = qualname  # ``CustomOpDef`` names itself only in private attributes
    return op


_QUALNAMES: Dict[Callable, str] = {}


def register_first_order_autograd(op: Callable, backward: Callable,
                                  setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)`` for a
    ``kernel_op`` whose backward launches kernels of first order: differentiated
    with ``create_graph=True`` it is an error naming the operator
    (``first_order_only``) before anything launches."""
    if op not in _QUALNAMES:
        raise ValueError(f'{op!r} is no kernel_op: its name is not known')
    qualname = _QUALNAMES[op]

    @functools.wraps(backward)
    def first_order(ctx, *cotangents):
        first_order_only(qualname)
        return backward(ctx, *cotangents)

    op.register_autograd(first_order, setup_context=setup_context)


def on_tensors_device(*args) -> ContextManager:
    """The first tensor's CUDA device made current: Triton launches on the
    current device, which need not hold the tensors (a model on ``cuda:1``
    in a process whose current device is ``cuda:0``). Else a no-op."""
    for arg in args:
        if isinstance(arg, Tensor):
            if arg.device.type == 'cuda':
                return torch.cuda.device(arg.device)
            break
    return contextlib.nullcontext()


def call_kernel_op(op: Callable, implementation: Callable, *args):
    """``op(*args)``: a kernel's custom operator (``kernel_op``). Inside
    ``without_launches`` its ``implementation`` itself, so that a count on
    meta tensors sees what the implementation allocates (an operator on
    meta tensors runs its fake, which allocates the results only). Recording
    a training step on meta tensors, both: the implementation records the
    launches, the operator (its fake) carries autograd to the backward's."""
    if not launches_skipped():
        return op(*args)
    if recording() and torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad and a.is_meta for a in args):
        implementation(*args)
        return op(*args)
    return implementation(*args)


def as_operands(t: Tensor, operand_dtype: torch.dtype) -> Tensor:
    """``t`` (weights) in a 16-bit ``operand_dtype``, cast once here so that
    no program converts its tiles; float32 operands stay ``t``. A broadcast
    (stride-0) dim is cast once, not per broadcast copy.

    Args:
        t: weights or states that products read.
        operand_dtype: the products' operand dtype.
    """
    if operand_dtype == torch.float32 or t.dtype == operand_dtype:
        return t
    distinct = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())
    return t[distinct].to(operand_dtype).expand(t.shape)


def check_arguments(tensors: Sequence[Tuple[str, Tensor, Tuple[str, ...]]],
                    operand_dtype: torch.dtype,
                    tiles: Tuple[Optional[int], Optional[int]],
                    operands: Tuple[str, ...] = (),
                    tile_names: Tuple[str, str] = ('block_rows', 'block_hidden')) -> None:
    """Tile sizes, shapes (named sizes must agree wherever they appear),
    float32 and one device: each failure an error naming the argument.

    Args:
        tensors: (name, tensor, the names of its sizes) of each argument.
        operand_dtype: the products' operand dtype.
        tiles: the caller's (block_rows, block_hidden), or the sizes ``tile_names`` names.
        operands: the arguments that only products read, which may also
            come in ``operand_dtype`` (the scan kernel writes them so).
    """
    check_tiles(*tiles, tile_names)
    sizes = {}
    for name, t, shape in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.dim() != len(shape):
            raise ValueError(f'{name} must have {len(shape)} dims, got shape {tuple(t.shape)}')
        for axis, (size_name, got) in enumerate(zip(shape, t.shape)):
            want, where, want_axis = sizes.setdefault(size_name, (got, name, axis))
            if want != got:
                raise ValueError(f'{name} has size {got} in dim {axis}, but {where} has '
                                 f'{want} in dim {want_axis} for the same quantity')
        if t.dtype != torch.float32 and not (name in operands and t.dtype == operand_dtype):
            allowed = f' or {operand_dtype}' if name in operands else ''
            raise TypeError(f'the memory kernels take float32{allowed} tensors; {name} is '
                            f'{t.dtype}')
    first = tensors[0][1]
    for name, t, _ in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f'{name} is on {t.device}, {tensors[0][0]} on {first.device}')
    if operand_dtype not in OPERAND_DTYPES:
        raise ValueError(f'operand_dtype must be one of {OPERAND_DTYPES}, got {operand_dtype}')


def weight_arguments(weights: Tuple[Tensor, ...]) -> List[Tuple[str, Tensor, Tuple[str, ...]]]:
    """``check_arguments``' entries of a named tuple of parameters: each
    ``weights.<name>`` with sizes of its own (its op checks their shapes)."""
    return [(f'weights.{name}', t, tuple(f'{name}{i}' for i in range(t.dim())))
            for name, t in weights._asdict().items()]


def check_decomposed(base: Optional[MemoryWeights], carry: Optional[Tensor], heads_dim: str,
                     carry_shape: Tuple[str, ...]) -> list:
    """``check_arguments``' entries of a decomposed read's ``base`` and ``carry``."""
    if (base is None) != (carry is None):
        raise ValueError('a decomposed read needs both base and carry')
    if base is None:
        return []
    return [('base.w1', base.w1, (heads_dim, 'd', 'h')),
            ('base.w2', base.w2, (heads_dim, 'h', 'd')), ('carry', carry, carry_shape)]


def check_runnable(t: Tensor, operand_dtype: torch.dtype, whole_rows: bool = True) -> None:
    """An error naming why the kernels cannot run for ``t``'s device and, with
    ``whole_rows`` (its last dim a row the kernel holds whole), its width."""
    why = unavailable_reason(t.device, t.shape[-1] if whole_rows else None, operand_dtype)
    if why is not None:
        raise RuntimeError(f'the fused memory kernels cannot run: {why}')


def check_span(name: str, rows: int, t: Tensor, row_dim: int = -2) -> None:
    """Offsets inside a tile are int32: a chunk's ``rows`` along ``row_dim``,
    with the features of the last dim (unless that is the row dim), must span
    < 2**31 elements. The outer dims are addressed by int64 base offsets.

    Args:
        name: the argument, for the error.
        rows: the rows of one chunk.
        t: the tensor (its strides).
        row_dim: the dim of its rows.
    """
    span = rows * abs(t.stride(row_dim))
    if row_dim % t.dim() != t.dim() - 1:
        span += t.shape[-1] * abs(t.stride(-1))
    if span >= 2**31:
        raise ValueError(f'{name}: a chunk of {rows} rows with strides {t.stride()} spans '
                         'more than 2**31 elements, beyond the kernels\' int32 tile offsets')


def gelu_tanh(gelu_approximate: str) -> bool:
    """The kernels' GELU_TANH constexpr for ``F.gelu``'s ``approximate``."""
    return check_gelu_approximate(gelu_approximate) == 'tanh'
