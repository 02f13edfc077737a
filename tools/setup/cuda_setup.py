"""The decisions of ``tools/setup/setup_env.sh``: which torch build, which mmcv
flavor (CPU, or CUDA with which archs), and whether the mmcv already installed
is the one wanted; the commands the script runs.

Run by path (``python tools/setup/cuda_setup.py COMMAND``) inside the virtual
environment being set up, before the package is installed: it imports the
standard library and its neighbours in ``tools/setup/`` (``cuda_archs``,
``cuda_toolkit``, ``mmcv_check``, ``elf_reader``), torch and mmcv only inside
the functions that need them, and nothing from ``convneur_mm``.

Why each step exists (docs/user_guides/cuda.md has the long form):

* mmcv compiles its CUDA ops when torch sees a GPU or ``FORCE_CUDA=1``, with
  nvcc from ``CUDA_HOME`` (``cuda_toolkit``).
* ``TORCH_CUDA_ARCH_LIST`` unset with no GPU visible makes torch's extension
  builder fail with an IndexError: a default is always chosen (``cuda_archs``).
* pip sees ``mmcv==2.1.0`` installed, or reuses a CPU-only wheel from its
  cache, and does not rebuild when the flavor changes: the flavor an mmcv was
  built with is recorded, a CUDA build never uses pip's wheel cache.
* NVIDIA hardware that torch cannot use stops the set-up before mmcv's long
  build, unless ``CONVNEUR_ALLOW_CPU=1``; the package's own preflight check
  (``convneur_mm.utils.cuda_env``) explains such a machine in detail.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from cuda_archs import (arch_list_codes, default_arch_list, runs_on, torch_arch_codes,
                        torch_cuda_archs)
from cuda_toolkit import build_env, compiler_requirements
from mmcv_check import check_install, probe_mmcv
from setup_common import ALLOW_CPU, DOCS, TORCH_BUILD, TORCH_INDEX, SetupError, read_pins

TORCH_INDEX_DEFAULT = 'https://download.pytorch.org/whl/{build}'
TORCH_PACKAGES = ('torch', 'torchvision')
PROC_VERSION = '/proc/driver/nvidia/version'


# ------------------------------------------------------------------- torch
def split_local(version: Optional[str]) -> Tuple[Optional[str], str]:
    """'2.13.0+cu126' -> ('2.13.0', 'cu126')."""
    if version is None:
        return None, ''
    base, _, local = version.partition('+')
    return base, local


def torch_requirements(pins: Mapping[str, str], installed: Mapping[str, Optional[str]],
                       build: Optional[str] = None,
                       index: Optional[str] = None) -> Tuple[List[str], Optional[str], str]:
    """The torch/torchvision requirement lines, the package index to get them
    from (None: PyPI) and a note saying why.

    * ``build`` (``CONVNEUR_TORCH_BUILD``, e.g. ``cu126``): the pinned versions
      of that build from PyTorch's index (or ``index``).
    * none given, and a ``2.13.0+cuXYZ`` torch already installed: keep it (a
      user who installed it by hand), with the torchvision of the same build.
    * otherwise PyPI's default build, ``===`` so that no local build slips in.

    Args:
        pins: ``read_pins('requirements/torch.txt')``.
        installed: the installed versions of ``TORCH_PACKAGES``.
        build: ``CONVNEUR_TORCH_BUILD``.
        index: ``CONVNEUR_TORCH_INDEX``.
    """
    note = ''
    if not build:
        base, local = split_local(installed.get('torch'))
        if not (local and base == pins['torch']):
            return [f'{name}==={pins[name]}' for name in TORCH_PACKAGES], None, \
                'PyPI default build'
        build = local
        note = f'keeping the installed torch {installed["torch"]} ({TORCH_BUILD}={build})'
    if not re.fullmatch(r'cu\d{3}|cpu|rocm\d+(\.\d+)*|xpu', build):
        raise SetupError(f'{TORCH_BUILD}={build!r} is not a PyTorch build tag such as '
                         'cu126, cu128, cu129 or cpu')
    lines = [f'{name}=={pins[name]}+{build}' for name in TORCH_PACKAGES]
    return lines, index or TORCH_INDEX_DEFAULT.format(build=build), \
        note or f'{TORCH_BUILD}={build}'


def installed_versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """{distribution: its installed version, or None}."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------ mmcv flavor
def nvidia_present(proc_path: str = PROC_VERSION, smi: Optional[str] = 'nvidia-smi') -> bool:
    """An NVIDIA kernel driver is loaded, or nvidia-smi lists a GPU (an
    nvidia-smi without a driver, as in some containers, lists none).

    Args:
        proc_path: the driver's version file.
        smi: the nvidia-smi to ask (None: do not ask).
    """
    if os.path.exists(proc_path):
        return True
    path = shutil.which(smi) if smi else None
    if path is None:
        return False
    try:
        out = subprocess.run([path, '--query-gpu=name', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def torch_cannot_use_gpus(devices: Sequence[Tuple[int, int]]) -> Optional[str]:
    """Why the torch installed now cannot use this machine's NVIDIA hardware
    (None if it can): a CPU-only build, no usable GPU (mostly a driver older
    than torch's CUDA needs), or GPUs none of its archs runs on.

    Args:
        devices: the capabilities of the GPUs torch sees.
    """
    import torch
    fix = (f'update the NVIDIA driver, or install the same torch built for CUDA 12.x '
           f'(`{TORCH_BUILD}=cu126 bash tools/setup/setup_env.sh`; see {DOCS})')
    if torch.version.cuda is None:
        return (f'An NVIDIA driver is installed, but torch {torch.__version__} is a CPU-only '
                f'build: rerun without {TORCH_BUILD}=cpu (see {DOCS}).')
    if not devices:
        return (f'NVIDIA hardware is here, but torch {torch.__version__} (CUDA '
                f'{torch.version.cuda}) cannot use it: torch.cuda.is_available() is False. '
                f'Fix: {fix}.')
    codes = torch_arch_codes(torch.cuda.get_arch_list())
    bad = [f'sm_{a}{b}' for a, b in devices if not runs_on(10 * a + b, codes)]
    if bad:
        return (f'torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for '
                f'{" ".join(torch.cuda.get_arch_list())} only, not for {", ".join(bad)}: '
                f'{fix}.')
    return None


def wanted_flavor(env: Mapping[str, str] = os.environ, nvidia: Optional[bool] = None) -> dict:
    """CPU, or CUDA with its arch list: CUDA when torch sees a GPU or
    ``FORCE_CUDA=1`` (a build host without one). NVIDIA hardware that torch
    cannot use stops the set-up unless ``CONVNEUR_ALLOW_CPU=1``.

    Args:
        env: the environment (``FORCE_CUDA``, ``TORCH_CUDA_ARCH_LIST``,
            ``CUDA_VISIBLE_DEVICES``, ``CONVNEUR_ALLOW_CPU``).
        nvidia: whether NVIDIA hardware is here (default: ``nvidia_present()``).
    """
    force = env.get('FORCE_CUDA') == '1'
    visible = env.get('CUDA_VISIBLE_DEVICES')
    hidden = visible is not None and visible.strip() in ('', '-1')  # the CPU on purpose
    nvidia = nvidia_present() if nvidia is None else nvidia
    cpu = dict(kind='cpu', torch=metadata.version('torch'))  # no torch import: a quick no-op
    if not force and (hidden or not nvidia):
        return cpu
    import torch
    available = not hidden and torch.cuda.is_available()
    devices = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if available else []
    if not hidden and nvidia:
        problem = torch_cannot_use_gpus(devices)
        if problem and env.get(ALLOW_CPU) != '1':
            raise SetupError(f'{problem} To set up for the CPU anyway, set {ALLOW_CPU}=1.')
        if problem and not force:
            return cpu
    if torch.version.cuda is None:
        raise SetupError(f'FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only build')
    flavor = dict(kind='cuda', torch=torch.__version__, cuda=torch.version.cuda)
    if env.get('TORCH_CUDA_ARCH_LIST'):
        flavor.update(archs=env['TORCH_CUDA_ARCH_LIST'], arch_source='TORCH_CUDA_ARCH_LIST')
    elif devices:
        top = max(arch_list_codes(default_arch_list(torch_cuda_archs()))[0])
        caps = sorted({min(10 * a + b, top) for a, b in devices})  # as torch clamps
        flavor.update(devices=[f'{c // 10}.{c % 10}' for c in caps], arch_source='visible GPUs')
        flavor['archs'] = ';'.join(flavor['devices'])
    else:
        flavor.update(archs=default_arch_list(torch_cuda_archs()),
                      arch_source="default: torch's archs")
    return flavor


def covers(built: Optional[dict], wanted: dict) -> bool:
    """Whether an mmcv built as ``built`` serves the ``wanted`` flavor: any
    mmcv with ops (against the same torch version) runs CPU ops; a CUDA
    flavor needs the same torch build and CUDA version, and kernels for every
    visible GPU (or every arch asked for)."""
    if not built:
        return False
    if wanted['kind'] == 'cpu':
        return split_local(built.get('torch'))[0] == split_local(wanted['torch'])[0]
    if built.get('kind') != 'cuda' or not built.get('archs'):
        return False
    if (built.get('torch'), built.get('cuda')) != (wanted['torch'], wanted['cuda']):
        return False
    codes = arch_list_codes(built['archs'])
    if wanted.get('devices'):
        return all(runs_on(cc, codes)
                   for cc in arch_list_codes(';'.join(wanted['devices']))[0])
    want_cubins, want_ptx = arch_list_codes(wanted['archs'])
    return want_cubins <= codes[0] and want_ptx <= codes[1]


# --------------------------------------------------------------- commands
def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: List[str]) -> int:
    """One command of ``setup_env.sh``; returns the exit status."""
    command, args = argv[0], argv[1:]
    if command == 'torch-requirements':  # OUT_FILE REQUIREMENTS_FILE -> index url
        out, pins_file = args
        lines, index, note = torch_requirements(
            read_pins(pins_file), installed_versions(TORCH_PACKAGES),
            os.environ.get(TORCH_BUILD), os.environ.get(TORCH_INDEX))
        with open(out, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print(f'[setup] torch: {note}: {" ".join(lines)}', file=sys.stderr)
        print(index or '')
    elif command == 'flavor':
        print(json.dumps(wanted_flavor()))
    elif command == 'stamp-ok':  # STAMP HASH: 0 if nothing to do
        stamp, digest = args
        try:
            with open(stamp) as f:
                recorded = f.readline().strip()
        except OSError:
            return 1
        return 0 if recorded == digest and covers(_load(stamp), wanted_flavor()) else 1
    elif command == 'mmcv-covers':  # FLAVOR FLAVOR_FILE
        flavor, record = json.loads(args[0]), args[1]
        built = _load(record) if os.path.exists(record) else probe_mmcv()
        return 0 if covers(built, flavor) else 1
    elif command == 'compiler-requirements':
        import torch
        dists = installed_versions(['cuda-toolkit'] + [f'nvidia-cuda-runtime-cu{m}'
                                                      for m in (11, 12, 13)])
        print('\n'.join(compiler_requirements(torch.version.cuda, dists)))
    elif command == 'build-env':  # FLAVOR VENV -> shell exports
        for key, value in build_env(json.loads(args[0]), args[1]).items():
            print(f'export {key}={shlex.quote(value)}')
    elif command == 'wheel-key':  # FLAVOR -> a folder name for its mmcv wheel
        flavor = json.loads(args[0])
        key = json.dumps({k: flavor[k] for k in ('torch', 'cuda', 'archs')}, sort_keys=True)
        print(hashlib.sha256(key.encode()).hexdigest()[:16])
    elif command == 'record':  # FLAVOR FLAVOR_FILE: what the mmcv just installed was built as
        with open(args[1], 'w') as f:
            f.write(json.dumps(json.loads(args[0])) + '\n')
    elif command == 'check':  # FLAVOR
        for line in check_install(json.loads(args[0])):
            print(f'[setup] {line}')
    else:
        raise SystemExit(f'unknown command {command!r}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main(sys.argv[1:]))
    except SetupError as exc:
        print(f'[setup] error: {exc}', file=sys.stderr)
        sys.exit(2)
