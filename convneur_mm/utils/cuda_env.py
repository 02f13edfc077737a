"""Is CUDA usable here, and if not, why: checked before a run starts.

PyPI's torch falls back to the CPU with only a warning when the NVIDIA driver
is too old for its CUDA runtime, and runs no kernel on a GPU older than the
archs it was built for. ``tools/dist_train.sh CONFIG 4`` would then quietly
start 4 gloo CPU processes, a hundred times slower. ``check_cuda`` stops
instead, naming the driver, what torch needs and what to do. Machines without
NVIDIA hardware, and runs that hide the GPUs on purpose
(``CUDA_VISIBLE_DEVICES=``), keep the CPU path; ``CONVNEUR_ALLOW_CPU=1``
keeps it on a machine whose GPUs cannot be used.

torch and mmcv are imported by the functions that need them. The installer
(``tools/setup/``) decides its own way, before the package is installed.
"""
import os
import re
import shutil
import subprocess
import sys
import warnings
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

PROC_VERSION = '/proc/driver/nvidia/version'
ALLOW_CPU = 'CONVNEUR_ALLOW_CPU'
TORCH_BUILD = 'CONVNEUR_TORCH_BUILD'
DOCS = 'docs/user_guides/cuda.md'
# Minimum Linux driver for each CUDA major version (NVIDIA's CUDA compatibility
# table; within a major version a newer runtime runs on the oldest driver).
MIN_DRIVER = {11: '450.80.02', 12: '525.60.13', 13: '580.65.06'}
MMCV_WITHOUT_CUDA_OPS = (
    'mmcv here was compiled without its CUDA ops, so the first RoIAlign would fail. Rebuild '
    'it on this machine: `bash tools/setup/setup_env.sh` (it sees the GPU and recompiles mmcv; see '
    f'{DOCS}).')
# what mmcv's dispatcher raises for a device it has no kernel for:
# 'nms_impl: implementation for device cuda:0 not found.'
NO_KERNEL = 'implementation for device cuda'


class Gpu(NamedTuple):
    name: str
    capability: Tuple[int, int]


class NvidiaInfo(NamedTuple):
    """What the machine says about NVIDIA hardware, without torch."""
    driver: Optional[str]  # kernel module version, e.g. '550.54.15'
    gpus: List[Gpu]  # from nvidia-smi, when it is installed

    @property
    def present(self) -> bool:
        return self.driver is not None or bool(self.gpus)


class CudaUnavailableError(RuntimeError):
    """NVIDIA hardware is here but this torch / mmcv cannot use it."""


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r'\d+', version))


def read_driver_version(path: str = PROC_VERSION) -> Optional[str]:
    """The kernel module's version from /proc (None without an NVIDIA driver)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r'Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)', text)
    return match.group(1) if match else 'unknown'


def query_nvidia_smi(smi: Optional[str] = 'nvidia-smi') -> Tuple[Optional[str], List[Gpu]]:
    """Driver version and GPUs as nvidia-smi lists them ((None, []) without it)."""
    path = shutil.which(smi) if smi else None
    if path is None:
        return None, []
    try:
        out = subprocess.run([path, '--query-gpu=name,compute_cap,driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, []
    driver, gpus = None, []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(',')]
        if len(fields) == 3 and re.fullmatch(r'\d+\.\d+', fields[1]):
            major, minor = fields[1].split('.')
            gpus.append(Gpu(fields[0], (int(major), int(minor))))
            driver = fields[2]
    return driver, gpus


def detect_nvidia(proc_path: str = PROC_VERSION, smi: Optional[str] = 'nvidia-smi') -> NvidiaInfo:
    smi_driver, gpus = query_nvidia_smi(smi)
    return NvidiaInfo(read_driver_version(proc_path) or smi_driver, gpus)


def gpus_hidden(env: Mapping[str, str] = os.environ) -> bool:
    """``CUDA_VISIBLE_DEVICES`` set to nothing (or -1): the CPU on purpose."""
    visible = env.get('CUDA_VISIBLE_DEVICES')
    return visible is not None and visible.strip() in ('', '-1')


def required_driver(cuda_version: str) -> str:
    return MIN_DRIVER.get(_version_tuple(cuda_version)[0], 'unknown')


def unsupported_capabilities(capabilities: Sequence[Tuple[int, int]],
                             arch_list: Sequence[str]) -> List[Tuple[int, int]]:
    """The device capabilities none of torch's compiled archs (``sm_XY``,
    ``compute_XY``) can run on, by torch's own compatibility rules."""
    import torch.cuda
    codes = [int(re.sub(r'\D', '', a.split('_', 1)[1])) for a in arch_list
             if a.startswith('sm_')]
    ptx = [int(re.sub(r'\D', '', a.split('_', 1)[1])) for a in arch_list
           if a.startswith('compute_')]
    missing = []
    for cap in capabilities:
        cc = 10 * cap[0] + cap[1]
        if not (any(torch.cuda._code_compatible_with_device(cc, code) for code in codes)
                or any(code <= cc for code in ptx)):
            missing.append(tuple(cap))
    return missing


def _builds_for(capability: Tuple[int, int], machine: Optional[str] = None) -> List[str]:
    """PyTorch's CUDA builds (cuXYZ) that have kernels for this GPU on this
    machine's architecture (torch's table is ``{cuda: {machine: codes}}``
    since 2.13, ``{cuda: codes}`` for x86_64 before)."""
    import platform

    import torch.cuda
    machine = machine or platform.machine()
    cc = 10 * capability[0] + capability[1]
    releases = getattr(torch.cuda, 'PYTORCH_RELEASES_CODE_CC', {})

    def codes(by_arch) -> set:
        if isinstance(by_arch, dict):
            return by_arch.get(machine, set())
        return by_arch if machine == 'x86_64' else set()

    return ['cu' + cuda.replace('.', '') for cuda, by_arch in releases.items()
            if any(torch.cuda._code_compatible_with_device(cc, code)
                   for code in codes(by_arch))]


def cuda_problem(info: NvidiaInfo, cuda_available: bool, torch_version: str,
                 cuda_version: Optional[str], arch_list: Sequence[str],
                 device_capabilities: Sequence[Tuple[int, int]],
                 device_names: Sequence[str] = ()) -> Optional[str]:
    """Why NVIDIA hardware that is present cannot be used (None if it can,
    or if there is none). Pure: every input is passed in."""
    if not info.present:
        return None
    driver = info.driver or 'unknown'
    if cuda_version is None:
        return (f'An NVIDIA driver ({driver}) is installed, but torch {torch_version} '
                'is a CPU-only build. Reinstall the pinned CUDA build: '
                f'`bash tools/setup/setup_env.sh` (see {DOCS}).')
    if not cuda_available:
        need = required_driver(cuda_version)
        older = ''
        if driver != 'unknown' and need != 'unknown' and \
                _version_tuple(driver) < _version_tuple(need):
            older = (f' Driver {driver} is older than the {need} that CUDA {cuda_version} '
                     'needs.')
        return (f'NVIDIA driver {driver} found, but torch {torch_version} (CUDA '
                f'{cuda_version}, needs driver >= {need}) cannot use it: '
                'torch.cuda.is_available() is False.' + older +
                ' Update the NVIDIA driver, or install the same torch built for CUDA 12.x '
                f'(`{TORCH_BUILD}=cu126 bash tools/setup/setup_env.sh`, driver >= '
                f'{MIN_DRIVER[12]}; see {DOCS}).')
    bad = unsupported_capabilities(device_capabilities, arch_list)
    if bad:
        names = dict(zip(map(tuple, device_capabilities), device_names))
        gpus = ', '.join(f'{names.get(cap, "GPU")} (sm_{cap[0]}{cap[1]})' for cap in bad)
        builds = sorted({b for cap in bad for b in _builds_for(cap)})
        fix = (f'install the same torch built for CUDA 12.x: `{TORCH_BUILD}={builds[0]} '
               f'bash tools/setup/setup_env.sh` (see {DOCS})' if builds else
               'no PyTorch build of this version supports these GPUs')
        return (f'torch {torch_version} (CUDA {cuda_version}) has kernels for '
                f'{" ".join(arch_list)} only, not for {gpus}: {fix}.')
    return None


def _probe_device(env: Mapping[str, str] = os.environ) -> 'torch.device':  # noqa: F821
    """The GPU this process will train on: the local rank's under torchrun,
    Slurm or MPI (as MMEngine's launchers pick it), else the current one. Every
    rank probing the current device would leave a CUDA context on GPU 0."""
    import torch
    for var in ('LOCAL_RANK', 'SLURM_LOCALID', 'OMPI_COMM_WORLD_LOCAL_RANK'):
        if env.get(var, '').isdigit():
            return torch.device('cuda', int(env[var]) % max(1, torch.cuda.device_count()))
    return torch.device('cuda')


def mmcv_cuda_problem(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """Run mmcv's nms on two boxes on this process's GPU: an mmcv compiled
    without its CUDA ops raises "implementation for device cuda:0 not found",
    named here; any other error propagates. The kernel is asked, not
    ``get_compiling_cuda_version()``, which can segfault while the CUDA
    kernels work."""
    import torch
    from mmcv.ops import nms
    device = _probe_device(env)
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]], device=device)
    try:
        nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
    except RuntimeError as exc:
        if NO_KERNEL in str(exc) and 'not found' in str(exc):
            return MMCV_WITHOUT_CUDA_OPS
        raise
    return None


def check_cuda(env: Mapping[str, str] = os.environ, proc_path: str = PROC_VERSION,
               smi: Optional[str] = 'nvidia-smi', check_mmcv: bool = True) -> str:
    """Raise ``CudaUnavailableError`` if this machine's NVIDIA GPUs cannot be
    used (with ``CONVNEUR_ALLOW_CPU=1``: warn and go on). Returns 'cuda' or 'cpu'."""
    import torch
    if gpus_hidden(env):
        return 'cpu'
    info = detect_nvidia(proc_path, smi)
    available = torch.cuda.is_available()
    caps, names = [], []
    if available:
        for i in range(torch.cuda.device_count()):
            caps.append(torch.cuda.get_device_capability(i))
            names.append(torch.cuda.get_device_name(i))
    problem = cuda_problem(info, available, torch.__version__, torch.version.cuda,
                           torch.cuda.get_arch_list() if available else [], caps, names)
    if problem is None and available and check_mmcv:
        problem = mmcv_cuda_problem(env)
    if problem is None:
        return 'cuda' if available else 'cpu'
    if env.get(ALLOW_CPU) == '1':
        warnings.warn(f'{problem} Running on the CPU ({ALLOW_CPU}=1).')
        return 'cpu'
    raise CudaUnavailableError(f'{problem} To run on the CPU anyway, set {ALLOW_CPU}=1.')


def run_on_checked_device(env: Mapping[str, str] = os.environ,
                          execve: Callable[..., None] = os.execve) -> str:
    """``check_cuda`` for a tool that builds a runner. Where it chose the
    CPU beside GPUs that torch sees (``CONVNEUR_ALLOW_CPU=1``), this process
    starts again with the GPUs hidden (``CUDA_VISIBLE_DEVICES=''``, which
    torch reads once, at its first CUDA call): MMEngine, DDP and autocast
    would take the GPUs otherwise. Returns 'cuda' or 'cpu'."""
    import torch
    device = check_cuda(env)
    if device == 'cpu' and not gpus_hidden(env) and torch.cuda.is_available():
        argv = list(sys.orig_argv)  # the interpreter's flags too
        execve(sys.executable, argv, dict(env, CUDA_VISIBLE_DEVICES=''))
    return device
