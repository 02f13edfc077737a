"""Whether the memory's Triton kernels can run, and why not (imports no triton)."""
import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from convneur_mm.utils.compiler_marks import assume_constant_result

OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# a program holds whole rows: 256 is the widest row whose tiles compile
# without register spills (16 rows x 256 float32 accumulators, 8 warps)
MAX_HEAD_DIM = 256
# the ops with Triton kernels: each op's kernels are the module ``memory_ops.<op>.kernels``
KERNEL_OPS = ('read', 'chunk_grads', 'project', 'scan', 'gates')
OPS_PACKAGE = __name__.rsplit('.', 2)[0]  # memory_ops
_INTERPRETER_HINT = ('on a CPU they run only in Triton\'s interpreter: set TRITON_INTERPRET=1 '
                     f'before the kernels ({OPS_PACKAGE}.<op>.kernels) are imported')
_skipping = [0]  # depth of ``without_launches`` contexts
# kernels that fault on CUDA GPUs, and where it was seen: the memory refuses to
# train through them there, and the tuning tool leaves their calls out. None
# now: the read's backward rows pass faulted at tiles that ``tiles.row_limit`` now caps
CUDA_FAULTS: Dict[str, str] = {}


def cuda_fault(kernels: Iterable[str]) -> Optional[str]:
    """Why one of ``kernels`` (``tiles.KERNEL_NAMES``) cannot run on a
    CUDA GPU (``CUDA_FAULTS``), or None."""
    for kernel in kernels:
        if kernel in CUDA_FAULTS:
            return f'the {kernel} kernel faults on CUDA GPUs ({CUDA_FAULTS[kernel]})'
    return None


@contextlib.contextmanager
def without_launches() -> Iterator[None]:
    """Inside, the Triton implementations check their arguments and allocate
    their results as on a GPU, on any device (``meta`` included), and launch
    nothing; ``unavailable_reason`` gives no reason of the device or of
    triton. For counting what they allocate and move without a GPU
    (``testing.dispatch_probes``); their results hold no values."""
    _skipping[0] += 1
    try:
        yield
    finally:
        _skipping[0] -= 1


def launches_skipped() -> bool:
    """Whether a ``without_launches`` context is open."""
    return _skipping[0] > 0


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (triton
    reads it once, when it is first imported)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


@functools.lru_cache(maxsize=None)
def load_kernels(op: str) -> Tuple[Optional[ModuleType], Optional[str], bool]:
    """(``op``'s kernels module or None, why not, whether it runs in the
    interpreter); imported once, on first use.

    Args:
        op: one of ``KERNEL_OPS``.
    """
    if op not in KERNEL_OPS:
        raise ValueError(f'op must be one of {KERNEL_OPS}, got {op!r}')
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f'triton is not installed ({err})', False
    try:
        kernels = importlib.import_module(f'{OPS_PACKAGE}.{op}.kernels')
    except Exception as err:  # a triton too old or broken: say so, never crash 'auto'
        return None, f'the Triton memory kernels failed to import: {err!r}', False
    interpreted = type(getattr(kernels, kernels.__all__[0])).__name__ == 'InterpretedFunction'
    return kernels, None, interpreted


def _load_every_op() -> Tuple[Optional[str], bool]:
    """(why an op's kernels cannot load or None, whether they run in the
    interpreter), having loaded the kernels of every op."""
    loaded = [load_kernels(op) for op in KERNEL_OPS]
    why = next((why for _, why, _ in loaded if why is not None), None)
    return why, loaded[0][2]


def _shape_reason(head_dim: Optional[int], operand_dtype: Optional[torch.dtype]
                  ) -> Optional[str]:
    if head_dim is not None and not 1 <= head_dim <= MAX_HEAD_DIM:
        return (f'memory head dim {head_dim} is outside the kernels\' range 1..{MAX_HEAD_DIM} '
                '(their register tiles hold whole rows)')
    if operand_dtype is not None and operand_dtype not in OPERAND_DTYPES:
        return f'operand dtype {operand_dtype} is not one of {OPERAND_DTYPES}'
    return None


# a fact of the process, not of the tensors: torch.compile takes its value
# while tracing instead of tracing the import of triton
@functools.lru_cache(maxsize=None)
@assume_constant_result
def _device_reason(device: torch.device, operand_dtype: Optional[torch.dtype]) -> Optional[str]:
    why, interpreted = _load_every_op()
    if why is not None:
        return why
    if interpreted:
        if operand_dtype == torch.bfloat16:
            return 'Triton\'s interpreter cannot compute in bfloat16 (it multiplies bit patterns)'
        return None
    if device.type == 'meta':  # no data: the custom operators run their fakes (byte counts)
        return None
    if device.type != 'cuda':
        return f'the memory kernels run on CUDA devices, not on {device.type} ({_INTERPRETER_HINT})'
    if not torch.cuda.is_available():
        return 'CUDA is not available'
    if torch.version.hip is None:
        capability = torch.cuda.get_device_capability(device)
        if capability < (7, 0):
            return f'Triton needs compute capability 7.0 or newer; this GPU has {capability}'
        if operand_dtype == torch.bfloat16 and capability < (8, 0):
            return ('bfloat16 products need compute capability 8.0 or newer; '
                    f'this GPU has {capability}')
    return None


def unavailable_reason(device, head_dim: Optional[int] = None,
                       operand_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the memory's Triton kernels cannot run here, or None when they can.

    Args:
        device: where the memory's tensors live (``torch.device`` or str).
        head_dim: the memory's head width d, if the shape is to be checked.
        operand_dtype: the products' operand dtype, if it is to be checked.
    """
    why = _shape_reason(head_dim, operand_dtype)
    if why is not None or launches_skipped():
        return why
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    return _device_reason(device, operand_dtype)


def kernels_available(device, head_dim: Optional[int] = None,
                      operand_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the memory's Triton kernels can run here (``unavailable_reason``).

    Args:
        device: where the memory's tensors live (``torch.device`` or str).
        head_dim: the memory's head width d, if the shape is to be checked.
        operand_dtype: the products' operand dtype, if it is to be checked.
    """
    return unavailable_reason(device, head_dim, operand_dtype) is None
