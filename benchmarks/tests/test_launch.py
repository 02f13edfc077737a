"""The ``launch`` case: one kernel's call, compared with the PyTorch path on
the same inputs; a disagreement or a NaN is exit status 1."""
import json
import math
import os
import subprocess
import sys

import torch

from benchmarks.kernels import one_launch
from benchmarks.kernels.tune import DRY_SHAPE, Calls
from tests.paths import REPO


def test_a_dry_run_launches_the_kernel_at_forced_rows_in_the_interpreter(tmp_path):
    out = tmp_path / 'launch.json'
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', 'launch', 'read_backward_rows', '--rows', '16',
         '--dry-run', '--json', str(out)], capture_output=True, text=True, cwd=REPO,
        timeout=600, env=dict(os.environ, TRITON_INTERPRET='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())['result']
    assert (result['call'], result['rows'], result['agrees']) == ('read step', 16, True)
    assert len(result['errors']) == 4 and 0 < result['worst_error'] < 1e-2  # the read's 4 grads


def _calls(got):
    want = [torch.ones(4), torch.ones(3)]
    return Calls({'read': lambda: got}, {'read': lambda: want})


def test_a_kernel_that_disagrees_or_writes_nan_fails(monkeypatch):
    for got, worst in (([torch.ones(4), torch.full((3, ), 2.0)], 1.0),
                       ([torch.full((4, ), math.nan), torch.ones(3)], math.nan)):
        monkeypatch.setattr(one_launch, 'stage_calls', lambda *args, got=got: _calls(got))
        result = one_launch.launch_once('read', DRY_SHAPE, torch.float16, 'cpu', warmup=0)
        assert not result['agrees']
        assert (math.isnan(result['worst_error']) if math.isnan(worst)
                else result['worst_error'] == worst)
    monkeypatch.setattr(one_launch, 'stage_calls',
                        lambda *args: _calls([torch.ones(4), torch.ones(3)]))
    assert one_launch.launch_once('read', DRY_SHAPE, torch.float16, 'cpu')['agrees']
