"""tools/analysis_tools/benchmark.py: bad tasks and options are usage errors,
and every task runs once at tiny sizes on the CPU (``--dry-run``; the tasks
that start processes or compile are ``slow``). The documented commands are
parsed in tests/test_docs_commands.py."""
import json
import os.path as osp

import pytest

from ..paths import import_analysis_tool
from ..threads import one_thread


@pytest.mark.parametrize('args', [['--task', 'nosuch'], ['--task', 'speed', '--nosuch', '1'],
                                  ['--task', 'memory', '--sections', 'nosuch'], [],
                                  ['--task', 'onnx', '--device', 'cpu']])
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


def _dry(task: str, tmp_path, *args: str) -> dict:
    """``--task task --dry-run`` with ``--json``: the JSON written."""
    path = tmp_path / f'{task}.json'
    with one_thread():
        import_analysis_tool('benchmark').main(['--task', task, '--dry-run', '--json',
                                                str(path), *args])
    written = json.loads(path.read_text())
    assert written['task'] == task
    return written['result']


def test_memory_paths(tmp_path, capsys):
    paths = _dry('memory', tmp_path, '--sections', 'paths')['paths']
    assert set(paths['train']) >= {'ours (closed form, scan)', 'autograd reference'}
    assert all(s > 0 for s in paths['train'].values()) and paths['flops']['ours'] > 0
    assert 'speed-up over the reference' in capsys.readouterr().out


@pytest.mark.slow
def test_memory_backbone(tmp_path, capsys):
    """Five processes: three peaks, two timings."""
    backbone = _dry('memory', tmp_path, '--sections', 'backbone')['backbone']
    assert set(backbone['peaks']) == {'local-only', 'm3', 'm3, working_set_mib 64'}
    assert all(len(t) == 1 and t[0] > 0 for t in backbone['seconds'].values())
    assert '| local-only |' in capsys.readouterr().out


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


def test_train(tmp_path):
    pytest.importorskip('benchmarks.training.throughput',
                        reason='the train task\'s module is not in this tree')
    result = _dry('train', tmp_path, '--jobs', 'cls-m3', '--peers', 'local-only')
    assert 'cls-m3' in result['jobs']


@pytest.mark.slow
def test_speed(tmp_path, capsys):
    result = _dry('speed', tmp_path, '--models', 'ConvNeur-M3', 'ConvNeur-M3 local-only')
    names = {r['name'] for r in result['results']}
    assert names == {'ConvNeur-M3', 'ConvNeur-M3 local-only'}
    assert all(r['throughput'] > 0 and r['peak_mb'] >= 0 for r in result['results'])
    assert 'ConvNeur-M3 measured / bound (eager)' in capsys.readouterr().out


@pytest.mark.slow
def test_compile(tmp_path, capsys):
    result = _dry('compile', tmp_path, '--workloads', 'inference', 'train',
                  '--models', 'ConvNeur-M1', '--repeats', '1')
    assert set(result['results']) == {'inference ConvNeur-M1', 'train'}
    assert all(r['eager'] > 0 and r['compiled'] > 0 for r in result['results'].values())
    assert '| workload |' in capsys.readouterr().out


@pytest.mark.slow
def test_onnx(tmp_path):
    pytest.importorskip('onnxruntime')
    (row, ) = _dry('onnx', tmp_path)['results']
    assert row['name'] == 'm1' and row['size'] == 64 and row['diffs']['onnxruntime'] < 1e-3


@pytest.mark.slow
def test_resolution(tmp_path):
    result = _dry('resolution', tmp_path, '--out-dir', str(tmp_path))
    assert [r['size'] for r in result['results']] == [[32, 32], [64, 64]]
    assert osp.isfile(result['figure'])


@pytest.mark.slow
def test_memory_gpu_sections(tmp_path):
    result = _dry('memory', tmp_path, '--sections', 'gemm', 'latency')
    sections = result['suite']['sections']
    assert sections['gemm']['status'] == 'ok'
    assert sections['latency']['status'] == 'skipped: needs CUDA'
    assert sections['model']['status'] == 'skipped: not asked for (--sections)'
    assert result['exit_code'] == 0
