"""How one call of the neural memory computes: its ``MemoryPlan``.

``plan_memory`` decides, once per call and before autocast is turned off,
the products' operand dtype, the implementation of the chunk gradients and
reads ('torch' or 'triton', and why), how training differentiates them,
and how the projections and the scan compute. It reads the memory's
settings (``PathSettings``), the device, the kernels' availability and the
measured paths (``kernels.tuned.MEASURED_PATHS``, where ``implementation='auto'``
takes the Triton kernels); the memory executes the plan as given.
"""
import dataclasses
import os
from typing import Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from convneur_mm.models.utils.precision import at_least_float32, autocast_dtype
from .kernels import cuda_fault, unavailable_reason
from .kernels import tuned
from .kernels.launcher import cuda_capability
from .kernels.tiles import KERNEL_NAMES, block_width, check_tiles
from .kernels.tuned import OPERAND_DTYPE_NAMES, MeasuredPath, dtype_name
from .project import MAX_PROJECTION_WIDTH, projection_backward_serves

# memory_cfg['operand_dtype'] -> the products' operand dtype (None: float32)
OPERAND_DTYPE_CHOICES = {'auto': None, 'float32': None, 'bfloat16': torch.bfloat16,
                 'float16': torch.float16}
IMPLEMENTATION_CHOICES = ('auto', 'torch', 'triton')
# Below this max_lr a 16-bit read keeps W_0's part apart (the decomposed read,
# memory_ops.read_torch): at 1e-3 the update is ~0.2% of the state, under
# bfloat16's rounding of it.
DECOMPOSE_BELOW_MAX_LR = 0.5
# The environment's override, for a rerun after a kernel faulted on a GPU:
# 'torch' puts every memory on the PyTorch path whatever its config says.
FORCE_ENV = 'CONVNEUR_MEMORY_IMPLEMENTATION'


def forced_implementation(environ=os.environ) -> Optional[str]:
    """'torch' where ``CONVNEUR_MEMORY_IMPLEMENTATION=torch`` is set, None
    where it is unset or empty; any other value is an error."""
    value = environ.get(FORCE_ENV, '')
    if value not in ('', 'torch'):
        raise ValueError(f"{FORCE_ENV} may only be 'torch' (every memory on the PyTorch "
                         f'path) or unset, got {value!r}')
    return value or None


# read once, at import: the plan is decided inside compiled graphs too
FORCED_IMPLEMENTATION = forced_implementation()


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How one call of ``NeuralMemory`` computes (``plan_memory``).

    Attributes:
        operand_dtype: the matrix products' operand dtype; None: the compute
            dtype (float32, or float64 for a float64 module).
        decomposed_read: the states are read as ``a_t * (q @ W_0)`` at full
            precision plus ``q @ dW_t`` in ``operand_dtype`` (16-bit operands
            at a small ``max_lr``); the projections then compute the queries
            at full precision (``exact_queries``).
        implementation: 'torch' or 'triton', of the chunk gradients and the
            reads, in inference and training alike (the Triton kernels have
            backward kernels); the sequential mode's gradients at each
            image's state are PyTorch's in both.
        reason: why that implementation.
        backward: how training differentiates the PyTorch chunk gradients
            and reads: 'closed_form' (their hand-derived backward: no double
            backward, no (T, 4d) tensor saved) or 'autograd' (through their
            ops: inference, 'triton', export, ``backward='autograd'``).
        images_per_slice: images computed together (``working_set_mib``); the
            batch when unsliced.
        shape_generic: one graph for every token count (``torch.export``):
            the input is padded to whole chunks, every chunk writes and the
            scan is one block; the same maths.
        recompute: training saves only the input and recomputes the forward
            in the backward pass (``torch.utils.checkpoint``).
        projections: how the projections compute: 'torch', one product
            with the norms' weights folded in (``memory_ops.project``; their
            layers are plain: ``plain_layers``); 'triton', that as one Triton
            kernel with one backward kernel (with ``implementation='triton'``);
            'layers', each layer called (a hook or FSDP must see it).
        scan: 'triton' (the scan kernel, step by step; in inference
            ``w1``'s and ``w2``'s states written in ``operand_dtype``), where
            ``implementation='triton'`` took the kernels in the parallel mode, or
            'torch' (matrix products). ``implementation``, ``projections``
            and ``scan`` are separate choices: a variant of a plan that
            changes one keeps the others.
    """
    operand_dtype: Optional[torch.dtype]
    decomposed_read: bool
    implementation: str
    reason: str
    backward: str
    images_per_slice: int
    shape_generic: bool
    recompute: bool
    projections: str
    scan: str


class PathSettings(NamedTuple):
    """What of a memory's configuration decides its path (``NeuralMemory``'s
    arguments of the same names).

    Args:
        implementation: 'auto', 'torch' or 'triton' (``IMPLEMENTATION_CHOICES``).
        operand_dtype: a key of ``OPERAND_DTYPE_CHOICES``.
        update: 'parallel' or 'sequential'.
        max_lr: the inner-loop step size.
        backward: 'autograd' or 'closed_form'.
        recompute: recompute the forward in the backward pass.
        dim: the memory's width C_m.
        head_dim: one head's width.
    """
    implementation: str
    operand_dtype: str
    update: str
    max_lr: float
    backward: str
    recompute: bool
    dim: int
    head_dim: int


def operand_dtype_for(setting: str, x: Tensor) -> Optional[torch.dtype]:
    """The products' operand dtype for input ``x`` (None: the compute
    dtype, float32 or float64), read before autocast is turned off.

    'auto' takes bfloat16 under CUDA bfloat16 autocast only. Under
    float16 autocast it stays float32: the inner gradients' operands
    (theta * 2 / d times a residual, 1.6e-5 per unit residual at max_lr
    1e-3 and d 128) fall below float16's normal range, and the outer
    backward through 16-bit products would put loss-scaled gradients in
    float16, which the loss-scale headroom was never measured for. On the
    CPU float32 products are faster than bfloat16 ones without AMX.

    Args:
        setting: the memory's ``operand_dtype``, a key of ``OPERAND_DTYPE_CHOICES``.
        x: the memory's input.
    """
    if setting == 'auto':
        amp = autocast_dtype('cuda') if x.device.type == 'cuda' else None
        return torch.bfloat16 if amp == torch.bfloat16 else None
    return OPERAND_DTYPE_CHOICES[setting]


def plan_memory(x: Tensor, settings: PathSettings, training: bool, images_per_slice: int,
                plain_projections: bool) -> MemoryPlan:
    """How a memory with ``settings`` computes ``x`` here and now.

    Args:
        x: the (B, N, d) input, as the memory's ``forward`` gets it.
        settings: the memory's path settings.
        training: the module is in training mode.
        images_per_slice: images computed together (the batch when unsliced).
        plain_projections: the projection layers are plain (``plain_layers``),
            so their weights may be folded together.

    Raises:
        RuntimeError: ``implementation='triton'`` where the Triton kernels cannot
            serve this call (the error names why).
    """
    dtype = operand_dtype_for(settings.operand_dtype, x)
    implementation, reason = _implementation(x, settings, dtype)
    every_kernel = implementation == 'triton' and (
        settings.implementation == 'triton' or _auto_takes_every_kernel(x, settings, dtype))
    return MemoryPlan(
        operand_dtype=dtype,
        decomposed_read=dtype is not None and settings.max_lr < DECOMPOSE_BELOW_MAX_LR,
        implementation=implementation, reason=reason,
        backward=_backward(settings, implementation),
        images_per_slice=images_per_slice,
        shape_generic=torch.compiler.is_exporting(),
        recompute=settings.recompute and training and torch.is_grad_enabled(),
        projections=_projections(settings, every_kernel, plain_projections),
        scan='triton' if every_kernel and settings.update == 'parallel' else 'torch')


def _implementation(x: Tensor, settings: PathSettings, dtype: Optional[torch.dtype]
                    ) -> Tuple[str, str]:
    """('torch' or 'triton', why) by ``implementation``: 'torch' always PyTorch;
    'auto' the Triton kernels where ``_triton_unavailable`` finds no reason
    not to; 'triton' likewise, and an error naming the reason otherwise."""
    asked = settings.implementation
    if FORCED_IMPLEMENTATION == 'torch':
        return 'torch', f'{FORCE_ENV}=torch in the environment'
    if asked == 'torch':
        return 'torch', "implementation='torch'"
    why = _triton_unavailable(x, settings, dtype)
    if why is None and asked == 'auto':  # the measurement it took them by
        return 'triton', auto_path(*_measured_as(x, settings, dtype))[1]
    if why is None:
        return 'triton', f'implementation={asked!r} and the Triton kernels can run here'
    if asked == 'triton':
        raise RuntimeError(f"memory_cfg implementation='triton', but the fused Triton kernels "
                           f'cannot run here: {why}')
    return 'torch', why


def _backward(settings: PathSettings, implementation: str) -> str:
    """The plan's ``backward``: 'closed_form' where it is asked for and
    the PyTorch path trains (not under ``torch.export``: its graph keeps
    plain ATen ops, which ONNX has); else 'autograd'. The Triton kernels
    train through their own backward kernels."""
    if (settings.backward == 'autograd' or implementation != 'torch' or
            not torch.is_grad_enabled() or torch.compiler.is_exporting()):
        return 'autograd'
    return 'closed_form'


def _triton_unavailable(x: Tensor, settings: PathSettings, dtype: Optional[torch.dtype]
                        ) -> Optional[str]:
    """Why the Triton kernels cannot serve this call, or None.

    ``torch.compile`` keeps them whole in its graph (custom operators);
    ``torch.export`` keeps the shape-generic PyTorch graph, which ONNX
    needs. 'auto' takes them only where a GPU measured them faster than
    the PyTorch path for its compute capability, operand dtype, mode,
    tiled head width and compilation (``auto_path``): on sm_90 for eager bf16
    inference at C_m 65 to 128, the projection and scan kernels too
    (``MeasuredPath.every_kernel``); float32 products stay on cuBLAS,
    training and compiled calls on the PyTorch path ('triton' takes the kernels wherever they
    run, Triton's CPU interpreter included, and trains with their backward
    kernels)."""
    if torch.compiler.is_exporting():
        return 'torch.export keeps the shape-generic PyTorch graph'
    compute_dtype = at_least_float32(x.dtype)
    if compute_dtype != torch.float32:
        return f'they compute float32 memories, not {compute_dtype}'
    if settings.implementation == 'auto':
        path, why = auto_path(*_measured_as(x, settings, dtype))
        if path == 'torch':
            return why
    launched = [k for k in KERNEL_NAMES if torch.is_grad_enabled() or 'backward' not in k]
    fault = cuda_fault(launched)
    if fault is not None and cuda_capability(x.device) is not None:
        # refused, not run: a fault kills the process (a training run with it)
        return f"{fault}: use implementation='auto' or 'torch'"
    return unavailable_reason(x.device, settings.head_dim, dtype or torch.float32)


def _measured_as(x: Tensor, settings: PathSettings, dtype: Optional[torch.dtype]
                 ) -> Tuple[Optional[int], str, bool, int, bool]:
    """(compute capability, operand dtype name, training, head width,
    compiled): the key of this call's ``MEASURED_PATHS`` entry; Inductor
    fuses the PyTorch path's elementwise work, so a compiled call reads the
    entries timed compiled."""
    return (cuda_capability(x.device), dtype_name(dtype or torch.float32),
            torch.is_grad_enabled(), settings.head_dim, torch.compiler.is_compiling())


def _auto_takes_every_kernel(x: Tensor, settings: PathSettings,
                             dtype: Optional[torch.dtype]) -> bool:
    """Whether the measurement 'auto' took the kernels by timed the
    projection and scan kernels too (``MeasuredPath.every_kernel``)."""
    entry = measured_path(*_measured_as(x, settings, dtype))
    return entry is not None and entry.every_kernel


def _projections(settings: PathSettings, every_kernel: bool, plain_projections: bool) -> str:
    """The plan's ``projections``: 'layers' unless the layers are plain;
    'triton' where the plan takes every kernel (``implementation='triton'``, or
    'auto' where a GPU timed them all), up to their widest row
    (``MAX_PROJECTION_WIDTH``; in training the widths
    ``projection_backward_serves``); else 'torch'."""
    if not plain_projections:
        return 'layers'
    served = (projection_backward_serves(settings.dim) if torch.is_grad_enabled()
              else settings.dim <= MAX_PROJECTION_WIDTH)
    return 'triton' if every_kernel and served else 'torch'


def check_measured_paths(entries: Iterable[MeasuredPath]) -> None:
    """A clear error for an entry with an unknown dtype, a time that is not
    positive or a width that is no tile's, and for two entries of the same
    GPU, dtype, mode, width and compilation."""
    seen = set()
    for entry in entries:
        if entry.operand_dtype not in OPERAND_DTYPE_NAMES:
            raise ValueError(f'{entry}: operand_dtype must be one of {OPERAND_DTYPE_NAMES}')
        if not (entry.triton_ms > 0 and entry.torch_ms > 0):
            raise ValueError(f'{entry}: the times must be positive')
        check_tiles(entry.block_d, None, ('block_d', 'BH'))
        key = entry.key()
        if key in seen:
            raise ValueError(f'two measured paths for {key}')
        seen.add(key)


def measured_path(arch: Optional[int], operand_dtype: str, training: bool, head_dim: int,
                  compiled: bool = False) -> Optional[MeasuredPath]:
    """The ``MEASURED_PATHS`` entry of this GPU, operand dtype, mode, tiled
    head width (``block_width``) and compilation, or None."""
    key = (arch, operand_dtype, training, block_width(head_dim), compiled)
    # read at each call: a patched table counts
    return next((e for e in tuned.MEASURED_PATHS if e.key() == key), None)


def auto_path(arch: Optional[int], operand_dtype: str, training: bool, head_dim: int,
              compiled: bool = False) -> Tuple[str, str]:
    """('triton' or 'torch', why) for ``implementation='auto'``: the kernels where
    an entry of ``MEASURED_PATHS`` for this GPU, operand dtype, mode, tiled
    head width and compilation timed them faster, else the PyTorch path.

    Args:
        arch: the CUDA GPU's compute capability, or None (no CUDA GPU).
        operand_dtype: the products' operand dtype, by name.
        training: a training call.
        head_dim: the memory's head width C_m (its padded width decides).
        compiled: a call traced by ``torch.compile``.
    """
    mode = ('trains' if training else 'runs') + (' under torch.compile' if compiled else '')
    if arch is None:
        return 'torch', (f"'auto' {mode} on the PyTorch path off NVIDIA's CUDA GPUs "
                         "(implementation='triton' takes the Triton kernels)")
    entry = measured_path(arch, operand_dtype, training, head_dim, compiled)
    what = (f'sm_{arch} with {operand_dtype} operands at heads {head_dim} wide (tiled as '
            f'{block_width(head_dim)})')
    if entry is None:
        inside = ' inside a compiled graph' if compiled else ''
        return 'torch', (f"'auto' {mode} on the PyTorch path: no GPU has timed the Triton "
                         f"kernels against it{inside} on {what} (implementation='triton' "
                         'takes them)')
    timing = (f'{entry.triton_ms:g} ms through the kernels against {entry.torch_ms:g} ms '
              f'through PyTorch, on {entry.measured}')
    if entry.triton_ms < entry.torch_ms:
        which = 'every Triton kernel' if entry.every_kernel else 'the Triton write and read'
        return 'triton', f"'auto' takes {which} on {what}: {timing}"
    return 'torch', f"'auto' {mode} on the PyTorch path on {what}: {timing}"
