"""No silent CPU fallback (issue 16): the checks' inputs are stubbed (a fake
/proc driver file, a fake nvidia-smi, capability lists), so every branch runs
on this machine without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

from convneur_mm.utils import cuda_env
from convneur_mm.utils.cuda_env import (CudaUnavailableError, Gpu, NvidiaInfo, check_cuda,
                                        cuda_problem, detect_nvidia, mmcv_problem,
                                        read_driver_version, unsupported_capabilities)
from ..paths import REPO

PROPRIETARY = ('NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 '
               '22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0\n')
OPEN = ('NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.82.07  Release Build  '
        '(dvs-builder@U16-I3-B03-4-3)\n')
TORCH_13 = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']  # PyPI's 2.13.0
NVIDIA = NvidiaInfo('550.54.15', [])


def _proc(tmp_path, text):
    path = tmp_path / 'version'
    path.write_text(text)
    return str(path)


def test_driver_version_from_proc(tmp_path):
    assert read_driver_version(_proc(tmp_path, PROPRIETARY)) == '550.54.15'
    assert read_driver_version(_proc(tmp_path, OPEN)) == '580.82.07'
    assert read_driver_version(str(tmp_path / 'missing')) is None


def test_gpus_from_nvidia_smi(tmp_path):
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\necho "Tesla V100-SXM2-32GB, 7.0, 535.104.05"\n'
                   'echo "NVIDIA A100-SXM4-80GB, 8.0, 535.104.05"\n')
    smi.chmod(0o755)
    info = detect_nvidia(str(tmp_path / 'missing'), str(smi))
    assert info.driver == '535.104.05' and info.present
    assert info.gpus == [Gpu('Tesla V100-SXM2-32GB', (7, 0)), Gpu('NVIDIA A100-SXM4-80GB', (8, 0))]
    assert not detect_nvidia(str(tmp_path / 'missing'), None).present


def test_no_nvidia_hardware_keeps_the_cpu_path():
    assert cuda_problem(NvidiaInfo(None, []), False, '2.13.0+cu130', '13.0', [], []) is None


def test_old_driver_names_driver_requirement_and_fix():
    problem = cuda_problem(NVIDIA, False, '2.13.0+cu130', '13.0', [], [])
    assert '550.54.15' in problem and '>= 580.65.06' in problem
    assert 'older than the 580.65.06' in problem
    assert 'CONVNEUR_TORCH_BUILD=cu126' in problem and 'Update the NVIDIA driver' in problem


def test_cpu_only_torch_beside_a_driver():
    assert 'CPU-only build' in cuda_problem(NVIDIA, False, '2.13.0+cpu', None, [], [])


@pytest.mark.parametrize('capability,supported', [
    ((7, 0), False),  # V100: below CUDA 13's sm_75
    ((6, 1), False),
    ((7, 5), True), ((8, 6), True),
    ((8, 9), True),  # L40 / RTX 4090: runs sm_86 code
    ((12, 1), True),  # runs sm_120 code
])
def test_gpus_older_than_the_wheel_are_named(capability, supported):
    assert (unsupported_capabilities([capability], TORCH_13) == []) == supported
    problem = cuda_problem(NVIDIA, True, '2.13.0+cu130', '13.0', TORCH_13, [capability],
                           ['Tesla V100'])
    if supported:
        assert problem is None
    else:
        assert f'sm_{capability[0]}{capability[1]}' in problem and 'Tesla V100' in problem
        assert 'CONVNEUR_TORCH_BUILD=cu126' in problem  # PyTorch's cu126 build has sm_70


def test_mmcv_without_cuda_ops_is_named():
    assert 'compiled without its CUDA ops' in mmcv_problem('not available')
    assert mmcv_problem('13.0') is None


def test_check_stops_when_the_driver_is_there_but_cuda_is_not(tmp_path):
    """This machine: torch sees no GPU. With a (fake) driver it must stop."""
    proc = _proc(tmp_path, PROPRIETARY)
    with pytest.raises(CudaUnavailableError, match='550.54.15.*CONVNEUR_ALLOW_CPU=1'):
        check_cuda(env={}, proc_path=proc, smi=None)
    with pytest.warns(UserWarning, match='Running on the CPU'):
        assert check_cuda(env={'CONVNEUR_ALLOW_CPU': '1'}, proc_path=proc, smi=None) == 'cpu'
    # GPUs hidden on purpose, or no NVIDIA hardware at all: the CPU, silently
    assert check_cuda(env={'CUDA_VISIBLE_DEVICES': ''}, proc_path=proc, smi=None) == 'cpu'
    assert check_cuda(env={}, proc_path=str(tmp_path / 'none'), smi=None) == 'cpu'


def test_env_report_names_the_stack():
    out = subprocess.run([sys.executable, '-m', 'convneur_mm', 'env'], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {k: v.strip() for k, v in (line.split(':', 1) for line in out.stdout.splitlines())}
    assert rows['torch'] == torch.__version__ and rows['torch CUDA'] == str(torch.version.cuda)
    assert rows['NVIDIA driver'] == (detect_nvidia().driver or 'none')
    assert rows['mmcv ops'].endswith('CUDA: not available')  # this machine's CPU-only mmcv
    for key in ('CUDA available', 'mmdet', 'mmsegmentation', 'mmpretrain', 'mmengine',
                'CUDA check'):
        assert rows[key], key
