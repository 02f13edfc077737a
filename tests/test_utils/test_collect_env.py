"""``python -m convneur_mm env``: the rows a bug report needs, and a report
that shows a failing check instead of failing."""
import json
import subprocess
import sys

import pytest
import torch

from convneur_mm.utils import collect_env
from convneur_mm.utils.cuda_env import detect_nvidia
from ..paths import REPO


def _rows(text: str) -> dict:
    return {k: v.strip() for k, v in (line.split(':', 1) for line in text.splitlines())}


def test_env_report_names_the_stack():
    out = subprocess.run([sys.executable, '-m', 'convneur_mm', 'env'], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(out.stdout)
    assert rows['torch'] == torch.__version__ and rows['torch CUDA'] == str(torch.version.cuda)
    assert rows['NVIDIA driver'] == (detect_nvidia().driver or 'none')
    assert rows['mmcv ops'] == 'importable'
    for key in ('CUDA available', 'mmcv built as', 'mmdet', 'mmsegmentation', 'mmpretrain',
                'mmengine', 'CUDA check'):
        assert rows[key], key


def test_env_report_reads_the_setups_record_of_mmcv(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'prefix', str(tmp_path))
    assert _rows(collect_env.env_report())['mmcv built as'].startswith('no record')
    (tmp_path / collect_env.MMCV_FLAVOR_RECORD).write_text(
        json.dumps(dict(kind='cuda', torch='2.13.0+cu130', cuda='13.0', archs='9.0')) + '\n')
    assert _rows(collect_env.env_report())['mmcv built as'] == \
        'kind cuda, torch 2.13.0+cu130, cuda 13.0, archs 9.0'


def test_env_report_shows_a_failing_check(monkeypatch):
    def broken_check(env):
        raise RuntimeError('CUDA error: unspecified launch failure')
    monkeypatch.setattr(collect_env, 'check_cuda', broken_check)
    rows = _rows(collect_env.env_report())
    assert rows['CUDA check'] == 'RuntimeError: CUDA error: unspecified launch failure'


def test_env_report_never_asks_mmcvs_version_query(monkeypatch):
    """That query can crash the process while mmcv's CUDA kernels work."""
    mmcv_ops = pytest.importorskip('mmcv.ops')

    def crash(*args):
        pytest.fail('get_compiling_cuda_version() was called')
    monkeypatch.setattr(mmcv_ops, 'get_compiling_cuda_version', crash)
    assert 'mmcv ops' in _rows(collect_env.env_report())
