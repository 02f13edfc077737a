"""The CUDA compiler and CUDA_HOME under which mmcv compiles its CUDA ops.

PyPI's torch already installs a CUDA tree into the venv
(``site-packages/nvidia/cu13``: runtime, headers, libraries); the compiler
pieces at exactly torch's CUDA version complete it (unpinned,
``nvidia-nvvm`` resolves to a newer CUDA and ptxas rejects its PTX). The
runtime wheel ships ``libcudart.so.13`` but no ``libcudart.so`` for the link,
so the venv gets its own ``cuda/`` tree of links. A user's own ``CUDA_HOME``
is checked, never silently replaced.
"""
import os
import re
import shutil
import subprocess
from typing import Dict, List, Mapping, Optional

from setup_common import DOCS, SetupError

# what torch's CUDA extensions include or link, checked in CUDA_HOME
REQUIRED_FILES = ('bin/nvcc', 'include/cuda_runtime.h', 'include/cusparse.h',
                  'include/cublas_v2.h', 'include/cusolverDn.h', 'lib64/libcudart.so')


def compiler_requirements(cuda_version: str, dists: Mapping[str, Optional[str]]) -> List[str]:
    """The PyPI packages that complete torch's CUDA tree into a toolkit,
    pinned to the CUDA version torch was built with.

    Args:
        cuda_version: ``torch.version.cuda``.
        dists: installed versions of ``cuda-toolkit`` and
            ``nvidia-cuda-runtime-cuN`` (None: not installed).
    """
    major, minor = cuda_version.split('.')[:2]
    toolkit = dists.get('cuda-toolkit')
    if toolkit:
        if toolkit.split('.')[:2] != [major, minor]:
            raise SetupError(f'cuda-toolkit {toolkit} is installed but torch is built for CUDA '
                             f'{cuda_version}: reinstall torch (`bash tools/setup/setup_env.sh`)')
        # crt and nvvm by name: 13.0.2's nvcc extra leaves them unpinned, and a
        # newer nvvm emits PTX that this ptxas rejects
        return [f'cuda-toolkit[nvcc,cccl,crt,nvvm]=={toolkit}']
    if dists.get(f'nvidia-cuda-runtime-cu{major}'):  # the one-package-per-library layout
        return [f'nvidia-cuda-nvcc-cu{major}=={major}.{minor}.*',
                f'nvidia-cuda-cccl-cu{major}=={major}.{minor}.*']
    raise SetupError(f'cannot tell which CUDA compiler matches torch (CUDA {cuda_version}): '
                     'neither cuda-toolkit nor nvidia-cuda-runtime is installed. Point '
                     f'CUDA_HOME at a CUDA {cuda_version} toolkit (see {DOCS}).')


def cuda_trees(site_packages: str, cuda_version: str) -> List[str]:
    """The CUDA trees pip installed: ``nvidia/cu13`` (one tree), or one
    folder per library (``nvidia/cuda_runtime``, ``nvidia/cublas``, ...)."""
    root = os.path.join(site_packages, 'nvidia')
    single = os.path.join(root, f'cu{cuda_version.split(".")[0]}')
    if os.path.isdir(single):
        return [single]
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d, 'include'))) if os.path.isdir(root) \
        else []


def _merge_links(sources: List[str], dest: str) -> None:
    """``dest`` becomes the union of ``sources`` as symbolic links (folders
    present in several sources are merged; on a file clash the first wins)."""
    os.makedirs(dest, exist_ok=True)
    entries: Dict[str, List[str]] = {}
    for src in sources:
        for name in sorted(os.listdir(src)):
            entries.setdefault(name, []).append(os.path.join(src, name))
    for name, paths in entries.items():
        target = os.path.join(dest, name)
        if len(paths) > 1 and all(os.path.isdir(p) for p in paths):
            _merge_links(paths, target)
        elif not os.path.lexists(target):
            os.symlink(paths[0], target)


def assemble_cuda_home(trees: List[str], dest: str) -> str:
    """A CUDA_HOME made of links into pip's CUDA trees, with ``lib64`` and the
    unversioned ``libcudart.so`` the link step needs.

    Args:
        trees: ``cuda_trees(...)``.
        dest: the folder to (re)create, e.g. ``.venv/cuda``.
    """
    if not trees:
        raise SetupError('torch installed no CUDA libraries into this venv (site-packages/nvidia '
                         f'is missing): set CUDA_HOME to a CUDA toolkit (see {DOCS})')
    shutil.rmtree(dest, ignore_errors=True)
    libs = [os.path.join(t, 'lib') for t in trees if os.path.isdir(os.path.join(t, 'lib'))]
    _merge_links(list(trees), dest)
    lib = os.path.join(dest, 'lib')
    if os.path.islink(lib):  # a single tree: a real folder, to add the link below
        os.unlink(lib)
    _merge_links(libs, lib)
    runtimes = sorted(n for n in os.listdir(lib) if re.fullmatch(r'libcudart\.so\.\d+', n))
    if runtimes and not os.path.lexists(os.path.join(lib, 'libcudart.so')):
        os.symlink(runtimes[-1], os.path.join(lib, 'libcudart.so'))
    if not os.path.lexists(os.path.join(dest, 'lib64')):
        os.symlink('lib', os.path.join(dest, 'lib64'))
    return dest


def nvcc_version(cuda_home: str) -> Optional[str]:
    """The CUDA release ``cuda_home``'s nvcc reports ('13.0'; None if it does not run)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, 'bin', 'nvcc'), '--version'],
                             capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return None
    match = re.search(r'release (\d+\.\d+)', out)
    return match.group(1) if match else None


def toolkit_problems(cuda_home: str, cuda_version: str, nvcc: Optional[str]) -> List[str]:
    """What keeps ``cuda_home`` from compiling torch extensions for
    ``cuda_version`` (missing files, another nvcc version).

    Args:
        cuda_home: the toolkit's root.
        cuda_version: torch's CUDA version.
        nvcc: ``nvcc_version(cuda_home)``.
    """
    problems = [f'{cuda_home} has no {f}' for f in REQUIRED_FILES
                if not os.path.exists(os.path.join(cuda_home, f))
                and not (f.startswith('lib64/') and
                         os.path.exists(os.path.join(cuda_home, 'lib', f[6:])))]
    if nvcc is not None and nvcc != cuda_version:
        problems.append(f'its nvcc is CUDA {nvcc}, torch is built with CUDA {cuda_version}')
    elif nvcc is None and os.path.exists(os.path.join(cuda_home, 'bin', 'nvcc')):
        problems.append(f'{cuda_home}/bin/nvcc does not run')
    return problems


def max_jobs(env: Mapping[str, str] = os.environ) -> str:
    """MAX_JOBS if given, else one job per core and per 2 GiB of free memory
    (an nvcc job holds 1-2 GiB)."""
    if env.get('MAX_JOBS'):
        return env['MAX_JOBS']
    jobs = os.cpu_count() or 1
    try:
        with open('/proc/meminfo') as f:
            kib = int(re.search(r'MemAvailable:\s+(\d+)', f.read()).group(1))
        jobs = min(jobs, kib // (2 * 2**20))
    except (OSError, AttributeError):
        pass
    return str(max(1, jobs))


def build_env(flavor: dict, venv: str, env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The variables under which mmcv compiles its CUDA ops.

    Args:
        flavor: the wanted CUDA flavor (its ``archs``).
        venv: the virtual environment, where a CUDA_HOME of links is made.
        env: the environment (``CUDA_HOME``, ``MAX_JOBS``, ``PATH``).
    """
    import torch
    cuda = torch.version.cuda
    if env.get('CUDA_HOME'):  # the user's own toolkit: checked, never silently replaced
        cuda_home = env['CUDA_HOME']
    else:
        site = os.path.dirname(os.path.dirname(torch.__file__))
        cuda_home = assemble_cuda_home(cuda_trees(site, cuda), os.path.join(venv, 'cuda'))
    problems = toolkit_problems(cuda_home, cuda, nvcc_version(cuda_home))
    if problems:
        hint = ('unset CUDA_HOME to use the CUDA pieces the set-up installs into the venv'
                if env.get('CUDA_HOME') else 'the compiler pieces did not install completely')
        raise SetupError(f'cannot compile mmcv\'s CUDA ops with CUDA_HOME={cuda_home}: ' +
                         '; '.join(problems) + f'. Fix: {hint} (see {DOCS}).')
    return dict(FORCE_CUDA='1', MMCV_WITH_OPS='1', CUDA_HOME=cuda_home,
                PATH=f'{cuda_home}/bin:{env.get("PATH", "")}',
                TORCH_CUDA_ARCH_LIST=flavor['archs'], MAX_JOBS=max_jobs(env))
