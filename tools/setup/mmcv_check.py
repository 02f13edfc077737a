"""What the installed mmcv was built as, asked without trusting it not to crash.

mmcv's ``get_compiling_cuda_version()`` can segfault while its CUDA kernels
work: it runs in a child process, and when it fails the CUDA major version is
read from the ELF file of mmcv's ``_ext`` instead (``elf_reader``). Used to
decide whether the installed mmcv serves the wanted flavor and to check a
fresh build.
"""
import glob
import importlib.util
import os
import signal
import subprocess
import sys
from typing import List, NamedTuple, Optional, Tuple

from elf_reader import cudart_major
from setup_common import SetupError

# One answer a line, flushed, so that the first survives a crash of the second.
VERSION_QUERY = ('from mmcv.ops import get_compiler_version, get_compiling_cuda_version\n'
                 'print(get_compiling_cuda_version(), flush=True)\n'
                 'print(get_compiler_version(), flush=True)\n')
QUERIES = ('mmcv.ops.get_compiling_cuda_version()', 'mmcv.ops.get_compiler_version()')
NO_CUDA = ('', 'not available')  # what get_compiling_cuda_version() says of a CPU build


class MmcvOpsVersion(NamedTuple):
    """What mmcv's compiled ops say about themselves, asked in a child process."""
    cuda: Optional[str]  # '13.0'; the major ('13') when read from the ELF file; None: unknown
    compiler: Optional[str]  # 'GCC 12.2'; None when the query failed
    error: Optional[str] = None  # why the query failed, e.g. '... crashed (signal 11: SIGSEGV)'
    elf: Optional[str] = None  # when it failed: what mmcv's _ext file says instead


def _query_child(code: str, timeout: float) -> Tuple[List[str], Optional[str]]:
    """The lines a child Python running ``code`` printed, and why it failed
    (None if it printed both answers): a segfault there ends only the child."""
    try:
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f'{QUERIES[0]} timed out after {timeout:g} s'
    except OSError as exc:
        return [], f'{QUERIES[0]} could not run in a child process: {exc}'
    lines = out.stdout.splitlines()
    if out.returncode == 0 and len(lines) >= len(QUERIES):
        return lines, None
    call = QUERIES[min(len(lines), len(QUERIES) - 1)]
    if out.returncode < 0:
        try:
            name = signal.Signals(-out.returncode).name
        except ValueError:
            name = 'unknown signal'
        return lines, f'{call} crashed (signal {-out.returncode}: {name})'
    last = (out.stderr.strip().splitlines() or ['no output'])[-1]
    return lines, f'{call} failed (exit status {out.returncode}: {last})'


def mmcv_ext_path() -> Optional[str]:
    """mmcv's compiled ops library, found without importing mmcv."""
    try:
        spec = importlib.util.find_spec('mmcv')
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(os.path.join(folder, '_ext*.so')))
        if found:
            return found[0]
    return None


def _version_from_elf(error: str) -> MmcvOpsVersion:
    """The CUDA major version mmcv's _ext links, when asking mmcv failed."""
    path = mmcv_ext_path()
    if path is None:
        return MmcvOpsVersion(None, None, error, "mmcv's _ext library was not found")
    try:
        major = cudart_major(path)
    except (OSError, ValueError) as exc:
        return MmcvOpsVersion(None, None, error, f'{path} could not be read: {exc}')
    if major is None:
        return MmcvOpsVersion('not available', None, error,
                              f'read from {path}: it links no libcudart')
    return MmcvOpsVersion(major, None, error,
                          f'major only, read from {path}: NEEDED libcudart.so.{major}')


def mmcv_ops_version(code: Optional[str] = None, timeout: float = 120.0) -> MmcvOpsVersion:
    """mmcv's ``get_compiling_cuda_version()`` and ``get_compiler_version()``,
    asked in a child process: a crash, a failure or a timeout there is
    returned as ``error``, and the CUDA major version is then read from the
    ELF file of mmcv's _ext instead (``elf`` says so).

    Args:
        code: what the child runs (default ``VERSION_QUERY``).
        timeout: seconds the child may take.
    """
    lines, error = _query_child(VERSION_QUERY if code is None else code, timeout)
    if error is None:
        return MmcvOpsVersion(lines[0], lines[1])
    if lines:  # the CUDA version came before the compiler query failed
        return MmcvOpsVersion(lines[0], None, error)
    return _version_from_elf(error)


def probe_mmcv() -> Optional[dict]:
    """The flavor of the mmcv installed now, as far as it can tell (no arch
    list: an mmcv built before flavors were recorded is rebuilt for CUDA)."""
    import torch
    try:
        import mmcv.ops  # noqa: F401  (needs the compiled mmcv._ext)
    except ImportError:
        return None
    cuda = mmcv_ops_version().cuda
    if cuda is None or cuda in NO_CUDA:
        return dict(kind='cpu', torch=torch.__version__)
    return dict(kind='cuda', torch=torch.__version__, cuda=cuda, archs=None)


def check_compiled_cuda(flavor: dict) -> List[str]:
    """mmcv's ops name torch's CUDA version (major.minor; the major only
    when the query crashed and it was read from mmcv's _ext file).

    Args:
        flavor: the CUDA flavor mmcv was built as (``cuda``, ``archs``).
    """
    found = mmcv_ops_version()
    lines = [found.error + (f'; CUDA version {found.elf}' if found.elf else '')] \
        if found.error else []
    if found.cuda is None:
        raise SetupError(f'cannot tell whether mmcv has CUDA ops: {found.error}; {found.elf}')
    source = (f'mmcv\'s CUDA version ({found.elf}; {found.error})' if found.elf else
              QUERIES[0])
    want = flavor['cuda'].split('.')[0] if found.elf else flavor['cuda']
    if found.cuda != want:
        raise SetupError(f'{source} is {found.cuda!r}, not torch\'s CUDA {want}: the CUDA ops '
                         'were not compiled')
    how = ' (major only, read from its _ext file)' if found.elf else ''
    return lines + [f'mmcv ops compiled with CUDA {found.cuda}{how} for archs {flavor["archs"]}']


def check_install(flavor: dict) -> List[str]:
    """Fail here, not in the middle of a training run: mmcv's ops exist, a
    CUDA flavor names torch's CUDA version and, where a GPU is visible, runs
    nms and roi_align on CUDA like on the CPU. Returns the lines to print.

    Args:
        flavor: the flavor mmcv was built as.
    """
    import torch
    from mmcv.ops import nms, roi_align
    lines = []
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = nms(boxes, scores, 0.5)[1].tolist()
    if keep != [0, 2]:
        raise SetupError(f'mmcv nms on the CPU kept {keep}, not [0, 2]')
    if flavor['kind'] == 'cuda':
        lines += check_compiled_cuda(flavor)
        if torch.cuda.is_available():
            feats = torch.arange(2 * 64, dtype=torch.float32).reshape(1, 2, 8, 8)
            rois = torch.tensor([[0., 1.5, 0.5, 6.0, 7.0]])
            on_cpu = roi_align(feats, rois, (3, 3), 1.0, 2, 'avg', True)
            try:
                gpu_keep = nms(boxes.cuda(), scores.cuda(), 0.5)[1].tolist()
                on_gpu = roi_align(feats.cuda(), rois.cuda(), (3, 3), 1.0, 2, 'avg', True).cpu()
            except RuntimeError as exc:
                raise SetupError(f'mmcv\'s CUDA ops fail on {torch.cuda.get_device_name(0)}: '
                                 f'{exc}') from exc
            if gpu_keep != keep or not torch.allclose(on_gpu, on_cpu, atol=1e-4):
                raise SetupError('mmcv nms / roi_align on CUDA disagree with the CPU: '
                                 f'{gpu_keep} vs {keep}, {on_gpu} vs {on_cpu}')
            lines.append(f'nms and roi_align on {torch.cuda.get_device_name(0)} agree with the CPU')
        else:
            lines.append('no GPU visible: nms / roi_align on CUDA not run')
    return lines
