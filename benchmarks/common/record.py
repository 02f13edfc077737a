"""One record per lab run: the case, its command line, the device line and
the environment beside the figures, written as JSON.

``Record.write`` rewrites the whole file atomically, so a case that measures
for minutes can write after each step (a run cut short keeps what it
measured); the runner checks the path at start (``utils.cli.writable_file``).
"""
import importlib.util
import json
import os
import os.path as osp
import platform
import subprocess
from typing import Dict, Optional, Sequence

import torch

from benchmarks.common.subjects import backbone_memory_keys, describe_error, supported_memory_keys
from convneur_mm.analysis.timing import setup_benchmark_device


class UsageError(ValueError):
    """A case's options that do not fit together or this machine: the runner
    reports it as a usage error (exit 2) before anything is measured."""


def device_line(device: str) -> str:
    """The device a case measures on, set up as every benchmark sets it up
    (``timing.setup_benchmark_device``: threads, malloc, TF32 off), in words."""
    return setup_benchmark_device(device)


def environment(device: str, description: str) -> Dict:
    """Versions, the device and its state, the commit: what the figures need beside them.

    Args:
        device: 'cpu' or a CUDA device.
        description: its device line (``device_line``).
    """
    info = dict(description=description, python=platform.python_version(),
                torch=torch.__version__, cuda=torch.version.cuda, host=platform.node(),
                cpu_count=os.cpu_count(), memory_keys=supported_memory_keys(),
                backbone_memory_keys=backbone_memory_keys())
    for name in ('triton', 'mmcv', 'mmengine', 'mmpretrain'):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (recorded, not needed)
            info[name] = describe_error(exc)
    try:
        info['mmcv_ops'] = importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        info['mmcv_ops'] = False
    try:
        info['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'],
                                        cwd=osp.dirname(osp.abspath(__file__)), text=True,
                                        capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info['commit'] = None
    if device.startswith('cuda'):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, capability='%d.%d' % (props.major, props.minor),
                    multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=props.total_memory / 2**30)
        try:
            info['nvidia_smi'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,clocks.sm,clocks.mem,'
                 'clocks.max.sm,power.limit,temperature.gpu', '--format=csv,noheader'],
                text=True, capture_output=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info['nvidia_smi'] = describe_error(exc)
    try:
        from convneur_mm.models.layers.memory_ops.kernels import unavailable_reason
        info['memory_kernels'] = {
            str(dtype).replace('torch.', ''): unavailable_reason(
                torch.device(device), 128, dtype) or 'available'
            for dtype in (torch.float32, torch.bfloat16)}
    except Exception as exc:  # noqa: BLE001 (an older commit has no kernels)
        info['memory_kernels'] = describe_error(exc)
    return info


class Record:
    """The JSON of one run of ``case``: ``{case, argv, result}`` at ``path``
    (None: nothing is written).

    Args:
        path: the JSON file, or None.
        case: the case's name in the runner's registry.
        argv: the case's command line.
    """

    def __init__(self, path: Optional[str], case: str, argv: Sequence[str] = ()):
        self.path = path
        self.case = case
        self.argv = list(argv)

    def write(self, result: Dict) -> None:
        """The whole record, ``result`` its latest figures (atomically: a run
        killed mid-write leaves the last one)."""
        if self.path is None:
            return
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(dict(case=self.case, argv=self.argv, result=result), f, indent=1,
                      allow_nan=True, default=str)
        os.replace(tmp, self.path)
