"""The decisions of ``tools/setup/setup_env.sh``: which torch build, which mmcv
flavor (CPU, or CUDA with which archs), which CUDA compiler, and whether the
mmcv already installed is the one wanted.

Run by path (``python tools/setup/cuda_setup.py COMMAND``) inside the
virtual environment being set up, before the package is installed: it imports
only the standard library and ``cuda_env`` at import time.

Why each step exists (docs/user_guides/cuda.md has the long form):

* mmcv compiles its CUDA ops when torch sees a GPU or ``FORCE_CUDA=1``, with
  nvcc from ``CUDA_HOME``. PyPI's torch already installs a CUDA tree into the
  venv (``site-packages/nvidia/cu13``: runtime, headers, libraries); the
  compiler pieces at exactly torch's CUDA version complete it. Unpinned,
  ``nvidia-nvvm`` resolves to a newer CUDA and ptxas rejects its PTX.
* The runtime wheel ships ``libcudart.so.13`` but no ``libcudart.so`` for the
  link, so the venv gets its own ``cuda/`` tree of links.
* ``TORCH_CUDA_ARCH_LIST`` unset with no GPU visible makes torch's extension
  builder fail with an IndexError: a default is always chosen.
* pip sees ``mmcv==2.1.0`` installed, or reuses a CPU-only wheel from its
  cache, and does not rebuild when the flavor changes: the flavor an mmcv was
  built with is recorded, a CUDA build never uses pip's wheel cache.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Dict, List, Mapping, Optional, Tuple

try:
    from convneur_mm.utils import cuda_env
except ImportError:  # run by path before the package is installed: its module by path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    os.pardir, 'convneur_mm', 'utils'))
    import cuda_env  # type: ignore[no-redef]

TORCH_INDEX = 'CONVNEUR_TORCH_INDEX'
TORCH_INDEX_DEFAULT = 'https://download.pytorch.org/whl/{build}'
TORCH_PACKAGES = ('torch', 'torchvision')
# what torch's CUDA extensions include or link, checked in CUDA_HOME
REQUIRED_FILES = ('bin/nvcc', 'include/cuda_runtime.h', 'include/cusparse.h',
                  'include/cublas_v2.h', 'include/cusolverDn.h', 'lib64/libcudart.so')


class SetupError(RuntimeError):
    """A set-up step that cannot go on; the message says what to do."""


# ------------------------------------------------------------------- torch
def read_pins(path: str) -> Dict[str, str]:
    """``name===version`` / ``name==version`` lines of a requirements file."""
    pins = {}
    with open(path) as f:
        for line in f:
            match = re.match(r'\s*([A-Za-z0-9_.-]+)\s*={2,3}\s*([^\s#;]+)', line)
            if match:
                pins[match.group(1).lower()] = match.group(2)
    return pins


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
    """
    note = ''
    if not build:
        base, local = split_local(installed.get('torch'))
        if not (local and base == pins['torch']):
            return [f'{name}==={pins[name]}' for name in TORCH_PACKAGES], None, \
                'PyPI default build'
        build = local
        note = f'keeping the installed torch {installed["torch"]} ({cuda_env.TORCH_BUILD}={build})'
    if not re.fullmatch(r'cu\d{3}|cpu|rocm\d+(\.\d+)*|xpu', build):
        raise SetupError(f'{cuda_env.TORCH_BUILD}={build!r} is not a PyTorch build tag such as '
                         'cu126, cu128, cu129 or cpu')
    lines = [f'{name}=={pins[name]}+{build}' for name in TORCH_PACKAGES]
    return lines, index or TORCH_INDEX_DEFAULT.format(build=build), \
        note or f'{cuda_env.TORCH_BUILD}={build}'


def installed_versions(names) -> Dict[str, Optional[str]]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------- CUDA compiler
def compiler_requirements(cuda_version: str, dists: Mapping[str, Optional[str]]) -> List[str]:
    """The PyPI packages that complete torch's CUDA tree into a toolkit,
    pinned to the CUDA version torch was built with."""
    major, minor = cuda_version.split('.')[:2]
    toolkit = dists.get('cuda-toolkit')
    if toolkit:
        if toolkit.split('.')[:2] != [major, minor]:
            raise SetupError(f'cuda-toolkit {toolkit} is installed but torch is built for CUDA '
                             f'{cuda_version}: reinstall torch (`bash tools/setup/setup_env.sh`)')
        return [f'cuda-toolkit[nvcc,cccl]=={toolkit}']
    if dists.get(f'nvidia-cuda-runtime-cu{major}'):  # the one-package-per-library layout
        return [f'nvidia-cuda-nvcc-cu{major}=={major}.{minor}.*',
                f'nvidia-cuda-cccl-cu{major}=={major}.{minor}.*']
    raise SetupError(f'cannot tell which CUDA compiler matches torch (CUDA {cuda_version}): '
                     'neither cuda-toolkit nor nvidia-cuda-runtime is installed. Point '
                     f'CUDA_HOME at a CUDA {cuda_version} toolkit (see {cuda_env.DOCS}).')


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
    unversioned ``libcudart.so`` the link step needs."""
    if not trees:
        raise SetupError('torch installed no CUDA libraries into this venv (site-packages/nvidia '
                         f'is missing): set CUDA_HOME to a CUDA toolkit (see {cuda_env.DOCS})')
    shutil.rmtree(dest, ignore_errors=True)
    libs = [os.path.join(t, 'lib') for t in trees if os.path.isdir(os.path.join(t, 'lib'))]
    _merge_links([t for t in trees], dest)
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
    try:
        out = subprocess.run([os.path.join(cuda_home, 'bin', 'nvcc'), '--version'],
                             capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return None
    match = re.search(r'release (\d+\.\d+)', out)
    return match.group(1) if match else None


def toolkit_problems(cuda_home: str, cuda_version: str, nvcc: Optional[str]) -> List[str]:
    """What keeps ``cuda_home`` from compiling torch extensions for
    ``cuda_version`` (missing files, another nvcc version)."""
    problems = [f'{cuda_home} has no {f}' for f in REQUIRED_FILES
                if not os.path.exists(os.path.join(cuda_home, f))
                and not (f.startswith('lib64/') and
                         os.path.exists(os.path.join(cuda_home, 'lib', f[6:])))]
    if nvcc is not None and nvcc != cuda_version:
        problems.append(f'its nvcc is CUDA {nvcc}, torch is built with CUDA {cuda_version}')
    elif nvcc is None and os.path.exists(os.path.join(cuda_home, 'bin', 'nvcc')):
        problems.append(f'{cuda_home}/bin/nvcc does not run')
    return problems


# ------------------------------------------------------------ mmcv flavor
def default_arch_list(torch_archs: List[str]) -> str:
    """torch's own archs (``sm_75`` ... ``sm_120``) as TORCH_CUDA_ARCH_LIST,
    with PTX of the newest for GPUs newer than all of them."""
    codes = sorted({int(a[3:]) for a in torch_archs if re.fullmatch(r'sm_\d+', a)})
    if not codes:
        raise SetupError(f'torch lists no CUDA archs ({torch_archs}); is it a CUDA build?')
    archs = [f'{c // 10}.{c % 10}' for c in codes]
    return ';'.join(archs[:-1] + [archs[-1] + '+PTX'])


def _codes(arch_list: str) -> Tuple[set, set]:
    """'7.5;8.6+PTX' -> ({75, 86}, {86}): cubin archs and PTX archs."""
    cubins, ptx = set(), set()
    for arch in re.split(r'[;\s]+', arch_list.strip()):
        if not arch:
            continue
        major, minor = arch.split('+')[0].split('.')
        code = 10 * int(major) + int(re.sub(r'\D', '', minor))
        cubins.add(code)
        if arch.endswith('+PTX'):
            ptx.add(code)
    return cubins, ptx


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
    cubins, ptx = _codes(built['archs'])
    if wanted.get('devices'):
        import torch.cuda
        return all(any(torch.cuda._code_compatible_with_device(cc, code) for code in cubins)
                   or any(code <= cc for code in ptx)
                   for cc in (c for c in _codes(';'.join(wanted['devices']))[0]))
    want_cubins, want_ptx = _codes(wanted['archs'])
    return want_cubins <= cubins and want_ptx <= ptx


def wanted_flavor(env: Mapping[str, str] = os.environ, info=None) -> dict:
    """CPU, or CUDA with its arch list: CUDA when torch sees a GPU or
    ``FORCE_CUDA=1`` (a build host without one). NVIDIA hardware that torch
    cannot use stops the set-up unless ``CONVNEUR_ALLOW_CPU=1``."""
    force = env.get('FORCE_CUDA') == '1'
    hidden = cuda_env.gpus_hidden(env)
    info = cuda_env.detect_nvidia() if info is None else info
    cpu = dict(kind='cpu', torch=metadata.version('torch'))  # no torch import: a quick no-op
    if not force and (hidden or not info.present):
        return cpu
    import torch
    available = not hidden and torch.cuda.is_available()
    devices = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if available else []
    if not hidden:
        problem = cuda_env.cuda_problem(
            info, available, torch.__version__, torch.version.cuda,
            torch.cuda.get_arch_list() if available else [], devices)
        if problem and env.get(cuda_env.ALLOW_CPU) != '1':
            raise SetupError(f'{problem} To set up for the CPU anyway, set '
                             f'{cuda_env.ALLOW_CPU}=1.')
        if problem and not force:
            return cpu
    if torch.version.cuda is None:
        raise SetupError(f'FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only build')
    flavor = dict(kind='cuda', torch=torch.__version__, cuda=torch.version.cuda)
    if env.get('TORCH_CUDA_ARCH_LIST'):
        flavor.update(archs=env['TORCH_CUDA_ARCH_LIST'], arch_source='TORCH_CUDA_ARCH_LIST')
    elif devices:
        top = max(_codes(default_arch_list(cuda_env.torch_cuda_archs()))[0])
        caps = sorted({min(10 * a + b, top) for a, b in devices})  # as torch clamps
        flavor.update(devices=[f'{c // 10}.{c % 10}' for c in caps], arch_source='visible GPUs')
        flavor['archs'] = ';'.join(flavor['devices'])
    else:
        flavor.update(archs=default_arch_list(cuda_env.torch_cuda_archs()),
                      arch_source="default: torch's archs")
    return flavor


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
    """The variables under which mmcv compiles its CUDA ops."""
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
                         '; '.join(problems) + f'. Fix: {hint} (see {cuda_env.DOCS}).')
    return dict(FORCE_CUDA='1', MMCV_WITH_OPS='1', CUDA_HOME=cuda_home,
                PATH=f'{cuda_home}/bin:{env.get("PATH", "")}',
                TORCH_CUDA_ARCH_LIST=flavor['archs'], MAX_JOBS=max_jobs(env))


# ------------------------------------------------------- after installing
def probe_mmcv() -> Optional[dict]:
    """The flavor of the mmcv installed now, as far as it can tell (no arch
    list: an mmcv built before flavors were recorded is rebuilt for CUDA).
    Its CUDA version is asked in a child process (``cuda_env.mmcv_ops_version``)."""
    import torch
    try:
        import mmcv.ops  # noqa: F401  (needs the compiled mmcv._ext)
    except ImportError:
        return None
    cuda = cuda_env.mmcv_ops_version().cuda
    if cuda is None or cuda_env.mmcv_problem(cuda):
        return dict(kind='cpu', torch=torch.__version__)
    return dict(kind='cuda', torch=torch.__version__, cuda=cuda, archs=None)


def check_compiled_cuda(flavor: dict) -> List[str]:
    """mmcv's ops name torch's CUDA version (major.minor; the major only
    when the query crashed and it was read from mmcv's _ext file). The query
    runs in a child process: it can segfault while the kernels work."""
    found = cuda_env.mmcv_ops_version()
    lines = [found.error + (f'; CUDA version {found.elf}' if found.elf else '')] \
        if found.error else []
    if found.cuda is None:
        raise SetupError(f'cannot tell whether mmcv has CUDA ops: {found.error}; {found.elf}')
    source = (f'mmcv\'s CUDA version ({found.elf}; {found.error})' if found.elf else
              cuda_env.QUERIES[0])
    want = flavor['cuda'].split('.')[0] if found.elf else flavor['cuda']
    if found.cuda != want:
        raise SetupError(f'{source} is {found.cuda!r}, not torch\'s CUDA {want}: the CUDA ops '
                         'were not compiled')
    how = ' (major only, read from its _ext file)' if found.elf else ''
    return lines + [f'mmcv ops compiled with CUDA {found.cuda}{how} for archs {flavor["archs"]}']


def check_install(flavor: dict) -> List[str]:
    """Fail here, not in the middle of a training run: the stack imports,
    mmcv's ops exist, a CUDA flavor names torch's CUDA version and, where a GPU
    is visible, runs nms and roi_align on CUDA like on the CPU."""
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


# --------------------------------------------------------------- commands
def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: List[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == 'torch-requirements':  # OUT_FILE REQUIREMENTS_FILE -> index url
        out, pins_file = args
        lines, index, note = torch_requirements(
            read_pins(pins_file), installed_versions(TORCH_PACKAGES),
            os.environ.get(cuda_env.TORCH_BUILD), os.environ.get(TORCH_INDEX))
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
        import hashlib
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
    except (SetupError, cuda_env.CudaUnavailableError) as exc:
        print(f'[setup] error: {exc}', file=sys.stderr)
        sys.exit(2)
