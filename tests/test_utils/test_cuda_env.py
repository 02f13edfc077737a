"""No silent CPU fallback: the checks' inputs are stubbed (a fake
/proc driver file, a fake nvidia-smi, capability lists), so every branch runs
on this machine without a GPU."""
import sys

import pytest
import torch

from convneur_mm.utils import cuda_env
from convneur_mm.utils.cuda_env import (CudaUnavailableError, Gpu, NvidiaInfo, check_cuda,
                                        cuda_problem, detect_nvidia, read_driver_version,
                                        unsupported_capabilities)

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


# torch.cuda.PYTORCH_RELEASES_CODE_CC, the table behind the fix above: keyed
# by machine since torch 2.13, x86_64 codes only before
RELEASES_2_11 = {'12.6': {50, 60, 70, 80, 86, 90}, '12.8': {70, 80, 86, 90, 100, 120}}
RELEASES_2_13 = {'12.6': {'x86_64': {50, 60, 70, 75, 80, 86, 90}, 'aarch64': {80, 90}},
                 '12.9': {'x86_64': {75, 80, 86, 90, 100, 120}, 'aarch64': {80, 90, 100, 120}}}


@pytest.mark.parametrize('releases,machine,capability,builds', [
    (RELEASES_2_11, 'x86_64', (7, 0), ['cu126', 'cu128']),
    (RELEASES_2_11, 'x86_64', (6, 1), ['cu126']),  # runs sm_60 code
    (RELEASES_2_11, 'aarch64', (7, 0), []),  # that table knows x86_64 only
    (RELEASES_2_13, 'x86_64', (7, 0), ['cu126']),
    (RELEASES_2_13, 'aarch64', (9, 0), ['cu126', 'cu129']),  # GH200
    (RELEASES_2_13, 'aarch64', (7, 0), []),
])
def test_builds_for_a_gpu_read_either_table(monkeypatch, releases, machine, capability,
                                            builds):
    """torch 2.11's table (a set per CUDA version) raised AttributeError where
    the message for a GPU older than the wheel was built."""
    monkeypatch.setattr(torch.cuda, 'PYTORCH_RELEASES_CODE_CC', releases, raising=False)
    assert cuda_env._builds_for(capability, machine) == builds


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


# ---- mmcv's ops: nms on the GPU; mmcv's version query is never asked here
# (it can crash the process while mmcv's CUDA kernels work)
NO_CUDA_OPS = 'nms_impl: implementation for device cuda:0 not found.\n'  # mmcv's own words


@pytest.fixture
def usable_gpu(monkeypatch):
    """torch sees a supported GPU; nms is faked (the tensors stay on the CPU);
    get_compiling_cuda_version() fails the test if anything calls it."""
    import mmcv.ops
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda i=None: 'NVIDIA H100 80GB HBM3')
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: TORCH_13)
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.setattr(cuda_env, '_probe_device', lambda env: torch.device('cpu'),
                        raising=False)

    def crash(*args):
        pytest.fail('get_compiling_cuda_version() was called (it can crash the process)')
    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version', crash)
    calls = []

    def use_nms(error=None):
        def nms(boxes, scores, iou_threshold):
            calls.append(len(boxes))
            if error:
                raise error
            return boxes, torch.arange(len(boxes))
        monkeypatch.setattr(mmcv.ops, 'nms', nms)
        return calls
    return use_nms


def test_mmcv_without_cuda_ops_is_found_by_running_nms(tmp_path, usable_gpu):
    proc = _proc(tmp_path, PROPRIETARY)
    calls = usable_gpu(RuntimeError(NO_CUDA_OPS))
    with pytest.raises(CudaUnavailableError, match='compiled without its CUDA ops.*'
                       r'bash tools/setup/setup_env.sh.*CONVNEUR_ALLOW_CPU=1'):
        check_cuda(env={}, proc_path=proc, smi=None)
    assert calls == [2]
    with pytest.warns(UserWarning, match='compiled without its CUDA ops'):
        assert check_cuda(env={'CONVNEUR_ALLOW_CPU': '1'}, proc_path=proc, smi=None) == 'cpu'


def test_mmcv_with_cuda_ops_passes(tmp_path, usable_gpu):
    calls = usable_gpu()
    assert check_cuda(env={}, proc_path=_proc(tmp_path, PROPRIETARY), smi=None) == 'cuda'
    assert calls == [2]


def test_other_cuda_errors_of_the_probe_propagate(tmp_path, usable_gpu):
    """Only mmcv's "no kernel for cuda" means "rebuild mmcv"; anything else is
    another problem, shown as it is."""
    usable_gpu(RuntimeError('CUDA error: an illegal memory access was encountered'))
    with pytest.raises(RuntimeError, match='illegal memory access') as raised:
        check_cuda(env={}, proc_path=_proc(tmp_path, PROPRIETARY), smi=None)
    assert not isinstance(raised.value, CudaUnavailableError)


def test_probe_runs_on_the_ranks_own_gpu(monkeypatch):
    """Under torchrun each rank probes its GPU, not GPU 0 (a CUDA context
    there per rank for the whole run)."""
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    assert cuda_env._probe_device({'LOCAL_RANK': '2'}) == torch.device('cuda', 2)
    assert cuda_env._probe_device({'SLURM_LOCALID': '5'}) == torch.device('cuda', 1)
    assert cuda_env._probe_device({}) == torch.device('cuda')


@pytest.mark.parametrize('chosen,env,restarts', [
    ('cpu', {'CONVNEUR_ALLOW_CPU': '1'}, True),  # GPUs torch sees, not to be used
    ('cpu', {'CUDA_VISIBLE_DEVICES': ''}, False),  # hidden already
    ('cuda', {}, False),
])
def test_the_cpu_chosen_beside_visible_gpus_restarts_with_them_hidden(monkeypatch, chosen, env,
                                                                       restarts):
    """CONVNEUR_ALLOW_CPU=1 beside GPUs torch can see but not use: the tool
    starts again with CUDA_VISIBLE_DEVICES='' (torch reads it once), so
    that MMEngine, DDP and autocast do not take the GPUs."""
    monkeypatch.setattr(cuda_env, 'check_cuda', lambda env: chosen)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    calls = []
    device = cuda_env.run_on_checked_device(env, lambda *args: calls.append(args))
    assert device == chosen
    if not restarts:
        assert calls == []
        return
    ((executable, argv, new_env), ) = calls
    assert argv[1:] == sys.orig_argv[1:] and executable == sys.executable
    assert new_env == dict(env, CUDA_VISIBLE_DEVICES='')
