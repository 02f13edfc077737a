"""What every memory operation shares: the fast weights, the product, LN's epsilon.

The memory model with fast weights ``W = (w1, w2, g)`` is

    f_W(x) = x + LN(gelu(x @ w1) @ w2) * (1 + g)          (LN without affine)

and a chunk writes into it by one step on the loss
``sum_i theta_i / d * ||f_W(k_i) - v_i||^2``.
"""
import contextlib
import math
from typing import Callable, ContextManager, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

LN_EPS = 1e-5
RMS_EPS = 1e-6  # the projections' RMSNorms
# F.gelu's ``approximate``: the exact (erf) GELU, or its tanh form
GELU_APPROXIMATIONS = ('none', 'tanh')


class MemoryWeights(NamedTuple):
    """Fast weights: ``w1`` (..., d, 4d), ``w2`` (..., 4d, d), ``g`` (..., d)."""
    w1: Tensor
    w2: Tensor
    g: Tensor

    def map(self, fn) -> 'MemoryWeights':
        return MemoryWeights(*(fn(t) for t in self))


# torch >= 2.8 on CUDA: a 16-bit product with a float32 output, no rounding of
# the accumulator to 16 bits (the overload has no autograd formula: ``_Product16``
# gives it one for bf16 operands, and float16 ones under autograd take the 16-bit
# output, widened); on meta tensors too, so that byte counts there are CUDA's
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, 'dtype')
_OUT_DTYPE_DEVICES = ('cuda', 'meta')


def product(a: Tensor, b: Tensor, operand_dtype: Optional[torch.dtype] = None,
            out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The batched product ``a @ b`` with its operands in ``operand_dtype``,
    accumulated and returned in ``out_dtype`` (float32 or float64).

    Every matrix product of the memory's PyTorch implementations runs through
    here, so one argument decides its precision:

    * ``None`` (or the output dtype itself): the plain product;
    * float32 inputs: 16-bit operands on tensor cores (CUDA) or oneDNN (CPU),
      float32 accumulation; the output is float32 (on CUDA and meta tensors
      ``bmm(..., out_dtype=float32)``, under autograd with bf16 operands its
      gradients too; otherwise the 16-bit output, widened);
    * float64 inputs: the exact products of the operands rounded to
      ``operand_dtype``, accumulated in float64: what a 16-bit GEMM with a
      wide accumulator computes, up to summation order (the CPU tests'
      emulation of the GPU path).

    An operand may already be in ``operand_dtype`` (cast once by a caller
    that reuses it): it is not cast again.

    Args:
        a: (G, M, K).
        b: (G, K, N).
        operand_dtype: the operands' dtype, or None.
        out_dtype: the accumulation's and the output's dtype; None: the wider
            of ``a``'s and ``b``'s.
    """
    out_dtype = out_dtype or torch.promote_types(a.dtype, b.dtype)
    if operand_dtype is None or operand_dtype == out_dtype:
        return torch.bmm(a, b)
    if out_dtype == torch.float64:
        return torch.bmm(a.to(operand_dtype).to(out_dtype), b.to(operand_dtype).to(out_dtype))
    # float16 operands keep autograd through the casts: their float16 tensors
    # are what the fp16-headroom tool hooks (bf16 has float32's range)
    if autograd_records(a, b) and operand_dtype == torch.bfloat16:
        return _Product16.apply(a, b, operand_dtype, out_dtype)
    return _wide_bmm(a.to(operand_dtype), b.to(operand_dtype), out_dtype)


def _wide_bmm(a16: Tensor, b16: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a16 @ b16`` (16-bit operands) in ``out_dtype``: accumulated in
    float32 and written so where the device can (``bmm.dtype``) and autograd
    records nothing (the overload has no derivative), else the 16-bit result
    widened."""
    if out_dtype == a16.dtype:
        return torch.bmm(a16, b16)
    if (_BMM_OUT_DTYPE and a16.device.type in _OUT_DTYPE_DEVICES and out_dtype == torch.float32
            and not autograd_records(a16, b16)):
        return torch.ops.aten.bmm.dtype(a16, b16, torch.float32)
    return torch.bmm(a16, b16).to(out_dtype)


class _Product16(torch.autograd.Function):
    """``product`` with bf16 operands under autograd: the gradients are
    bf16 products written in their inputs' dtypes (``_wide_bmm``), where
    autograd through the casts wrote bf16 results and widened each in a copy
    of its own (the forward's output too). It saves each 16-bit operand the
    other's gradient needs, as autograd's bmm did; its backward is of first
    order only (no ``torch.func`` transforms either)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, operand_dtype: torch.dtype,
                out_dtype: torch.dtype) -> Tensor:
        a16, b16 = a.to(operand_dtype), b.to(operand_dtype)
        ctx.save_for_backward(a16 if ctx.needs_input_grad[1] else None,
                              b16 if ctx.needs_input_grad[0] else None)
        ctx.dtypes = a.dtype, b.dtype
        ctx.operand_dtype = operand_dtype
        return _wide_bmm(a16, b16, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only("the memory's bf16 products")
        a16, b16 = ctx.saved_tensors
        grad16 = grad.to(ctx.operand_dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _wide_bmm(grad16, b16.transpose(1, 2), ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _wide_bmm(a16.transpose(1, 2), grad16, ctx.dtypes[1])
        return grad_a, grad_b, None, None


def operand(t: Optional[Tensor], operand_dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in the products' operand dtype: for a tensor that several
    products read, cast once (``product`` casts no operand already in it)."""
    return t if t is None or operand_dtype is None else t.to(operand_dtype)


def gelu_grad_operand(grad: Tensor, pre: Tensor, operand_dtype: Optional[torch.dtype],
                      approximate: str = 'none') -> Tensor:
    """``gelu'(pre) * grad`` outside autograd, for products to read: with
    16-bit operands written in that dtype by the one kernel (computed in
    ``grad``'s dtype, rounded on store: the cast's values without its pass);
    else in place into ``grad``. ``approximate`` as ``F.gelu``'s."""
    if operand_dtype is None or operand_dtype == grad.dtype:
        out = grad
    else:
        out = torch.empty(grad.shape, dtype=operand_dtype, device=grad.device)
    return torch.ops.aten.gelu_backward.grad_input(grad, pre, approximate=approximate,
                                                   grad_input=out)


def gelu_second(pre: Tensor, approximate: str) -> Tuple[Tensor, float]:
    """(t, k) with gelu''(pre) = k t, t a new tensor: the caller folds k into
    a product it computes anyway. Exact: phi(x) (2 - x^2) = k exp(h) (1 + h),
    h = -x^2 / 2, k = 2 / sqrt(2 pi), in two passes. Tanh form (x s, s =
    sigmoid(2u), u = c (x + a x^3)): 2 s (1 - s) (2 u' + 2 x (1 - 2 s) u'^2 + x u''), k = 1.
    float16 ``pre`` is computed in float32 and ``t`` cast back: x^2 and x^3
    overflow float16 (NaN past |x| of about 20 in the tanh form), gelu'' does not."""
    if pre.dtype == torch.float16:
        t, k = gelu_second(pre.float(), approximate)
        return t.to(pre.dtype), k
    if approximate == 'none':
        h = torch.addcmul(torch.zeros((), dtype=pre.dtype, device=pre.device), pre, pre,
                          value=-0.5)  # -pre^2 / 2 in one pass
        e = h.exp()
        return torch.addcmul(e, e, h), 2.0 / math.sqrt(2.0 * math.pi)
    # in place: three (T, 4d) tensors at once, as the exact form's; x u'' = 2 (u' - c)
    c, a = math.sqrt(2.0 / math.pi), 0.044715
    du = pre * pre
    s = du.mul(a).add_(1.0).mul_(pre).mul_(2.0 * c).sigmoid_()
    du.mul_(3.0 * a * c).add_(c)
    inner = s.mul(-2.0).add_(1.0).mul_(pre).mul_(du).mul_(du).mul_(2.0)
    inner.add_(du, alpha=4.0).sub_(2.0 * c)  # 2 u' + 2 x (1 - 2 s) u'^2 + x u''
    return s.addcmul_(s, s, value=-1.0).mul_(inner).mul_(2.0), 1.0


def check_gelu_approximate(gelu_approximate: str) -> str:
    """``gelu_approximate`` if it is one of ``GELU_APPROXIMATIONS``, else a
    ValueError naming them."""
    if gelu_approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f'gelu_approximate must be one of {GELU_APPROXIMATIONS}, '
                         f'got {gelu_approximate!r}')
    return gelu_approximate


def ln_backward(grad: Tensor, hidden: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """LayerNorm's (no affine) input gradient at ``hidden`` with its
    statistics (``torch.native_layer_norm``'s): one fused ATen kernel, itself
    differentiable. A linear map of ``grad`` that is its own adjoint."""
    return torch.ops.aten.native_layer_norm_backward(
        grad, hidden, (hidden.shape[-1], ), mean, rstd, None, None, [True, False, False])[0]


def no_autocast(like: Tensor) -> ContextManager:
    """Autocast off on ``like``'s device: the products' precision is their
    ``operand_dtype``'s alone."""
    kind = like.device.type
    if not torch.amp.is_autocast_available(kind):  # meta tensors: nothing to turn off
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def autograd_records(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` (None entries skipped):
    gradients enabled and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def first_order_only(name: str, why: str = '') -> None:
    """An error for a backward of first order differentiated again: autograd
    runs a backward with gradients enabled only for ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(f'{name} has a backward of first order only{why}: differentiate '
                           'it without create_graph=True')


class _FirstOrderOnly(torch.autograd.Function):
    """The identity, whose backward refuses ``create_graph=True``."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, why: str) -> Tensor:
        ctx.name, ctx.why = name, why
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only(ctx.name, ctx.why)
        return grad, None, None


def first_order_guard(x: Tensor, name: str, why: str = '') -> Tensor:
    """``x``, whose gradient autograd computes as before but refuses to
    differentiate again (``first_order_only``); ``x`` itself where autograd
    records nothing, or under ``torch.export``, whose graph keeps ATen ops."""
    if not autograd_records(x) or torch.compiler.is_exporting():
        return x
    return _FirstOrderOnly.apply(x, name, why)


def check_float(**tensors: Tensor) -> None:
    """A TypeError unless the tensors are floating point of one dtype."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise TypeError('expected floating tensors of one dtype, got ' +
                        ', '.join(f'{k} {t.dtype}' for k, t in tensors.items()))


# backward -> whether an implementation trains through its closed-form
# Function: only PyTorch's has one (the Triton kernels have their own backward)
BACKWARDS = {'autograd': lambda implementation: False,
             'closed_form': lambda implementation: implementation == 'torch'}


def implementation_of(operation: str, implementations: Dict[str, Callable],
                      name: str) -> Callable:
    """``implementations[name]``, or an error naming the operation's choices.

    Args:
        operation: the operation's name, for the error.
        implementations: its implementations by name ('torch', 'triton').
        name: the one asked for.
    """
    if name not in implementations:
        raise ValueError(f'{operation} has the implementations {tuple(implementations)}, '
                         f'got {name!r}')
    return implementations[name]
