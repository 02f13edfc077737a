"""tools/analysis_tools/benchmark.py: bad tasks and options are usage errors,
and every task runs once at tiny sizes on the CPU (``--dry-run``; the speed
task is ``slow``). The lab's measurements left it for ``benchmarks.run``
(benchmarks/tests/test_run.py). The documented commands are parsed in
tests/test_docs_commands.py."""
import json

import pytest

from ..paths import import_analysis_tool
from ..threads import one_thread


@pytest.mark.parametrize('args', [['--task', 'nosuch'], ['--task', 'speed', '--nosuch', '1'],
                                  ['--task', 'memory'], [], ['--task', 'train']])
def test_unknown_tasks_and_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as info:
        import_analysis_tool('benchmark').parse_args(args)
    assert info.value.code == 2 and 'error:' in capsys.readouterr().err


def test_each_task_lists_its_own_options(capsys):
    tool = import_analysis_tool('benchmark')
    with pytest.raises(SystemExit):
        tool.parse_args(['--task', 'checkpointing', '--help'])
    out = capsys.readouterr().out
    assert '--per-gpu-batch' in out and '--sections' not in out


@pytest.mark.parametrize('cuda,args,device', [(True, ['--dry-run'], 'cpu'), (True, [], 'cuda'),
                                               (False, [], 'cpu'),
                                               (True, ['--dry-run', '--device', 'cuda'], 'cuda')])
def test_a_dry_run_takes_the_cpu_unless_a_device_is_named(monkeypatch, cuda, args, device):
    import torch
    tool = import_analysis_tool('benchmark')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    parsed = tool.parse_args(['--task', 'checkpointing', *args])
    assert parsed.device == device


def _dry(task: str, tmp_path, *args: str) -> dict:
    """``--task task --dry-run`` with ``--json``: the JSON written."""
    path = tmp_path / f'{task}.json'
    with one_thread():
        import_analysis_tool('benchmark').main(['--task', task, '--dry-run', '--json',
                                                str(path), *args])
    written = json.loads(path.read_text())
    assert written['task'] == task
    return written['result']


def test_checkpointing(tmp_path, capsys):
    rows = _dry('checkpointing', tmp_path)['rows']
    assert rows['True']['saved'] < rows['False']['saved']
    assert 'with_cp keeps' in capsys.readouterr().out


def test_checkpointing_per_gpu_batch(tmp_path, capsys):
    result = _dry('checkpointing', tmp_path, '--per-gpu-batch')
    assert result['rows']['m1']['batch'] >= 1 and result['exit_code'] == 0
    assert '| ConvNeur-M1 |' in capsys.readouterr().out


def test_checkpointing_per_gpu_batch_exits_1_when_no_batch_fits(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _dry('checkpointing', tmp_path, '--per-gpu-batch', '--gpu-gib', '1')
    assert info.value.code == 1
    out, err = capsys.readouterr()
    assert 'none fits' in out and 'not even a batch of 1 fits a GPU of 1 GiB' in err


@pytest.mark.slow
def test_speed(tmp_path, capsys):
    result = _dry('speed', tmp_path, '--models', 'ConvNeur-M3', 'ConvNeur-M3 local-only')
    names = {r['name'] for r in result['results']}
    assert names == {'ConvNeur-M3', 'ConvNeur-M3 local-only'}
    assert all(r['throughput'] > 0 and r['peak_mb'] >= 0 for r in result['results'])
    assert 'ConvNeur-M3 measured / bound (eager)' in capsys.readouterr().out
