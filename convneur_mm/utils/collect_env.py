"""The environment report of a bug report: ``python -m convneur_mm env``.

torch, CUDA, the NVIDIA driver, the GPUs, mmcv's ops, the toolboxes' versions
and the result of the CUDA preflight check (``cuda_env.check_cuda``), one
``name: value`` row each, as Detectron2's ``collect_env`` prints them.
"""
import json
import os
import platform
import sys
from importlib import metadata
from typing import List, Tuple

from .cuda_env import ALLOW_CPU, CudaUnavailableError, check_cuda, detect_nvidia, gpus_hidden

# what tools/setup/setup_env.sh records in the venv about the mmcv it built
MMCV_FLAVOR_RECORD = '.convneur-mmcv-flavor'
DISTRIBUTIONS = ('torchvision', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'mmpretrain',
                 'convneur-mm', 'numpy', 'opencv-python-headless')


def _mmcv_rows() -> List[Tuple[str, str]]:
    """Whether mmcv's compiled ops import, and what the set-up built them as.
    Whether they run on CUDA is the CUDA check's row: mmcv's own version
    query can crash the process, so it is not asked here."""
    try:
        import mmcv.ops  # noqa: F401
        ops = 'importable'
    except ImportError as exc:
        ops = f'not importable ({exc})'
    try:
        with open(os.path.join(sys.prefix, MMCV_FLAVOR_RECORD)) as f:
            built = json.loads(f.read().splitlines()[-1])
        record = ', '.join(f'{k} {v}' for k, v in built.items() if v is not None)
    except (OSError, ValueError, IndexError, AttributeError):
        record = 'no record (not built by tools/setup/setup_env.sh)'
    return [('mmcv ops', ops), ('mmcv built as', record)]


def _check_row() -> str:
    """The preflight check's verdict, never its warning or its exception."""
    try:
        check_cuda(env={k: v for k, v in os.environ.items() if k != ALLOW_CPU})
        return 'ok'
    except CudaUnavailableError as exc:
        return str(exc)
    except Exception as exc:  # a report for a bug report: say it, do not crash
        return f'{type(exc).__name__}: {exc}'


def env_report() -> str:
    """torch, CUDA, the driver, the GPUs, mmcv's ops and the toolboxes, one
    aligned ``name: value`` row each."""
    import torch
    info = detect_nvidia()
    rows = [('python', sys.version.split()[0]), ('platform', platform.platform()),
            ('torch', torch.__version__), ('torch CUDA', str(torch.version.cuda)),
            ('torch archs', ' '.join(torch.cuda.get_arch_list()) or '-'),
            ('NVIDIA driver', info.driver or 'none')]
    available = torch.cuda.is_available()
    rows.append(('CUDA available', f'{available}' + (' (CUDA_VISIBLE_DEVICES hides the GPUs)'
                                                     if gpus_hidden(os.environ) else '')))
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f'GPU {i}', f'{props.name}, sm_{props.major}{props.minor}, '
                                     f'{props.total_memory / 2**30:.1f} GiB'))
    else:
        rows += [(f'GPU (nvidia-smi) {i}', f'{g.name}, sm_{g.capability[0]}{g.capability[1]}')
                 for i, g in enumerate(info.gpus)]
    rows += _mmcv_rows()
    for name in DISTRIBUTIONS:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, 'not installed'))
    rows.append(('CUDA check', _check_row()))
    width = max(len(k) for k, _ in rows) + 1
    return '\n'.join(f'{k + ":":<{width}} {v}' for k, v in rows)
