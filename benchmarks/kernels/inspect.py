"""Compile the memory's kernels ahead of time for an NVIDIA GPU and read what
the compiler made of them (registers, spills, shared memory, the kind of
matrix instruction), without a GPU: triton ships ptxas.

A kernel compiled with a hand-written signature misses what a launch
specializes (integers equal to 1 become constants, pointers and integers
divisible by 16 get divisibility hints), which changes registers and spills.
``launch_reports`` therefore records the launches the wrappers make for given
arguments (``launcher.recording_launches``) and compiles each with its own
specialization::

    with torch.no_grad(), recording_launches(90) as launches:
        chunk_grads_triton(weights, keys, values, token_lr, torch.bfloat16)
    for report in launch_reports(launches, 90):
        print(report)

Arguments may be meta tensors: only their dtypes, strides and offsets count.
Needs triton with its NVIDIA backend, outside the interpreter.
"""
import contextlib
import dataclasses
import io
import re
from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from convneur_mm.models.layers.memory_ops.kernels.launcher import Launch, recording_launches

__all__ = ['CompileReport', 'Launch', 'Product', 'compile_for', 'launch_reports',
           'launch_specialization', 'products', 'products_of', 'recording_launches']


@dataclasses.dataclass(frozen=True)
class Product:
    """One matrix product of a compiled kernel, as its TTGIR lays it out.

    Args:
        rows, cols: the result's shape.
        version: 3 for Hopper's ``wgmma``, 2 for ``mma.sync``.
        warps: warps along the rows and the columns (``warpsPerCTA``).
        instr: the instruction's shape per warp (``instrShape``).
    """
    rows: int
    cols: int
    version: int
    warps: Tuple[int, int]
    instr: Tuple[int, ...]

    @property
    def copies(self) -> int:
        """How many times each element of the result is computed: warps laid
        past the tile's rows or columns repeat it (a warp covers 16 rows)."""
        cols_per_warp = self.instr[1] if self.version == 3 else 8
        return (max(1, self.warps[0] * 16 // self.rows)
                * max(1, self.warps[1] * cols_per_warp // self.cols))

    def __str__(self) -> str:
        kind = f'wgmma n{self.instr[1]}' if self.version == 3 else 'mma.sync'
        copies = f', {self.copies} copies' if self.copies > 1 else ''
        return f'{self.rows}x{self.cols} on {kind}, warps {list(self.warps)}{copies}'


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What ptxas made of one kernel for one GPU.

    Args:
        kernel: the kernel's name.
        arch: the compute capability (major * 10 + minor).
        registers: registers per thread.
        spill_stores, spill_loads: bytes spilled to local memory per thread.
        shared: bytes of shared memory per program.
        num_warps, num_stages: the launch options.
        wgmma, mma_sync: how many ``wgmma.mma_async`` (Hopper's warpgroup
            products) and ``mma.sync`` (warp products) the PTX holds.
        products: the TTGIR's matrix products (``Product``).
    """
    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int
    num_stages: int
    wgmma: int
    mma_sync: int
    products: Tuple[Product, ...] = ()

    @property
    def mma(self) -> str:
        """The matrix instructions used: 'wgmma', 'mma.sync', both or 'none'."""
        kinds = [name for name, n in (('wgmma', self.wgmma), ('mma.sync', self.mma_sync)) if n]
        return ' + '.join(kinds) or 'none'

    def __str__(self) -> str:
        return (f'{self.kernel} sm_{self.arch}: {self.registers} regs, '
                f'{self.spill_stores} B spill stores, {self.spill_loads} B spill loads, '
                f'{self.shared // 1024} KiB shared, {self.num_warps} warps, '
                f'{self.num_stages} stages, {self.mma} ({self.wgmma} wgmma, '
                f'{self.mma_sync} mma.sync in the PTX)' + self._repeated())

    def _repeated(self) -> str:
        repeated = sum(p.copies > 1 for p in self.products)
        return f'; {repeated} of {len(self.products)} products computed more than once' \
            if repeated else ''


class _Pointer:
    """A tensor argument as a launch specializes it: its dtype and its address
    (a fresh allocation is aligned; a view adds its offset)."""

    def __init__(self, t: Tensor):
        self.dtype = t.dtype
        self._address = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _triton():
    """triton's compiler pieces, or an error saying why they are missing."""
    try:
        import triton
        from triton import knobs
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as err:
        raise RuntimeError(f'this triton has no ahead-of-time compiler API: {err}') from err
    if 'nvidia' not in backends:
        raise RuntimeError('this triton has no NVIDIA backend')
    return dict(triton=triton, knobs=knobs, GPUTarget=GPUTarget, ASTSource=ASTSource,
                make_backend=make_backend, JITFunction=JITFunction,
                create_function_from_signature=create_function_from_signature)


def launch_specialization(launch: Launch, arch: int) -> Tuple[dict, dict, dict, dict]:
    """(signature, constants, attrs, options) that triton's launcher would
    compile ``launch`` with on a GPU of compute capability ``arch``.

    Args:
        launch: a recorded launch (``recording_launches``).
        arch: the compute capability (major * 10 + minor).
    """
    api = _triton()
    kernel = launch.kernel
    if not isinstance(kernel, api['JITFunction']):
        raise TypeError(f'{kernel!r} is not a compiled Triton kernel (is TRITON_INTERPRET set?)')
    backend = api['make_backend'](api['GPUTarget']('cuda', arch, 32))
    binder = api['create_function_from_signature'](kernel.signature, kernel.params, backend)
    args = [_Pointer(a) if isinstance(a, Tensor) else a for a in launch.args]
    bound, specialization, _ = binder(*args, **launch.kwargs)
    _, signature, constants, attrs = kernel._pack_args(backend, launch.kwargs, bound,
                                                       specialization, None)
    options = {k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names}
    return signature, constants, attrs, options


_SPILLS = re.compile(r'(\d+) bytes spill stores, (\d+) bytes spill loads')
_REGISTERS = re.compile(r'Used (\d+) registers')
_MMA_LAYOUT = re.compile(r'^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+), '
                         r'versionMinor = \d+, warpsPerCTA = \[(\d+), (\d+)\], '
                         r'instrShape = \[([\d, ]+)\]\}>', re.M)
# two-dimensional results only (a batched product's third size is not a dtype)
_PRODUCT = re.compile(r'= (?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x[a-z]\w*, '
                      r'(#mma\d*)>')


def compile_for(arch: int, kernel, signature: dict, constants: dict,
                attrs: Optional[dict] = None, options: Optional[dict] = None) -> CompileReport:
    """Compile ``kernel`` to a cubin for sm_``arch`` (no GPU needed) and report.

    Args:
        arch: the compute capability (major * 10 + minor), e.g. 90.
        kernel: a ``triton.jit`` function.
        signature: {argument name: triton type ('*bf16', 'i32', 'constexpr')}.
        constants: {argument name or path: value} of the constexprs.
        attrs: {path: [['tt.divisibility', 16]], ...}, the launch's hints.
        options: compile options (``num_warps``, ``num_stages``).
    """
    knobs = _triton()['knobs']
    log = io.StringIO()
    # ptxas prints its -v report only when asked, and only when it runs
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = _compile(arch, kernel, signature, constants, attrs, options)
    text = log.getvalue()
    registers = _REGISTERS.search(text)
    if registers is None:
        raise RuntimeError(f'no register count in ptxas\' report: {text[-2000:]!r}')
    spilled = _SPILLS.search(text)
    spills = [int(n) for n in spilled.groups()] if spilled else [0, 0]
    ptx = compiled.asm['ptx']
    return CompileReport(kernel=kernel.__name__, arch=arch, registers=int(registers.group(1)),
                         spill_stores=spills[0], spill_loads=spills[1],
                         shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                         num_stages=compiled.metadata.num_stages,
                         wgmma=len(re.findall(r'\bwgmma\.mma_async', ptx)),
                         mma_sync=len(re.findall(r'\bmma\.sync', ptx)),
                         products=tuple(products_of(compiled.asm['ttgir'])))


def _compile(arch: int, kernel, signature: dict, constants: dict, attrs: Optional[dict],
             options: Optional[dict]):
    api = _triton()
    return api['triton'].compile(
        api['ASTSource'](kernel, signature, constexprs=constants, attrs=attrs),
        target=api['GPUTarget']('cuda', arch, 32), options=options or {})


def products_of(ttgir: str) -> List[Product]:
    """The matrix products (``tt.dot``, ``ttng.warp_group_dot``) of a
    kernel's TTGIR, in order, with their layouts."""
    layouts = {name: (int(version), (int(wm), int(wn)), tuple(map(int, instr.split(','))))
               for name, version, wm, wn, instr in _MMA_LAYOUT.findall(ttgir)}
    found = _PRODUCT.findall(ttgir)
    unknown = sorted({name for _, _, name in found} - set(layouts))
    if unknown:
        raise ValueError(f'products laid out as {unknown}, which this TTGIR defines in a form '
                         'inspect does not read (a newer triton?)')
    return [Product(int(rows), int(cols), *layouts[name]) for rows, cols, name in found]


def products(arch: int, kernel, signature: dict, constants: dict,
             attrs: Optional[dict] = None, options: Optional[dict] = None) -> List[Product]:
    """``products_of`` ``kernel`` compiled for sm_``arch`` (arguments as
    ``compile_for``'s; ptxas runs, its report unread)."""
    return products_of(_compile(arch, kernel, signature, constants, attrs, options).asm['ttgir'])


def launch_reports(launches: Sequence[Launch], arch: int) -> List[CompileReport]:
    """``compile_for`` each distinct specialization among ``launches``.

    Args:
        launches: recorded launches (``recording_launches``).
        arch: the compute capability (major * 10 + minor).
    """
    reports, seen = [], set()
    for launch in launches:
        signature, constants, attrs, options = launch_specialization(launch, arch)
        key = (launch.kernel.__name__, repr(signature), repr(constants), repr(attrs),
               repr(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            reports.append(compile_for(arch, launch.kernel, signature, constants, attrs,
                                       options))
    return reports
