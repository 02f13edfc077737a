"""``python -m benchmarks.run``: one registry of cases, their options checked
at start (usage errors, exit 2), and each case's dry run on the CPU, its
record written to ``--json``. The GPU suite's dry run is test_suite.py's,
the tuner's test_tune.py's, the precision case's test_precision.py's, the
seeds case's test_seeds.py's."""
import json
import os.path as osp

import pytest

from benchmarks import run
from tests.threads import one_thread

# (case, a count option): every count the cases take
COUNTS = [('memory-paths', opt) for opt in ('--batch', '--tokens', '--dim', '--chunk',
                                            '--repeats')]
COUNTS += [('memory-backbone', opt) for opt in ('--batch', '--size', '--rounds', '--repeats')]
COUNTS += [('memory', '--batch'), ('onnx', '--repeats'), ('compile', '--repeats'),
           ('resolution', '--iters'), ('precision', '--iters'), ('precision', '--windows'),
           ('bytes', '--batch'), ('ops', '--size'), ('rooflines', '--batch'),
           ('tune', '--rounds'), ('table5', '--gpus'), ('seeds', '--length'),
           ('seeds', '--processes')]


def _usage_error(argv, capsys) -> str:
    """What the runner says on stderr when it exits 2 (argparse's usage error)."""
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_every_case_names_a_module_with_its_two_functions():
    import importlib
    for name, case in run.CASES.items():
        module = importlib.import_module(case.module)
        assert callable(getattr(module, case.add_arguments)), name
        assert callable(getattr(module, case.run)), name
    assert 'table5' in run.case_list() and 'memory-paths' in run.case_list()


@pytest.mark.parametrize('argv,error', [
    ([], 'the following arguments are required: CASE'),
    (['nosuch'], "argument CASE: invalid choice: 'nosuch'"),
    (['bytes', '--nosuch', '1'], 'unrecognized arguments: --nosuch'),
    (['memory', '--sections', 'nosuch'], "invalid choice: 'nosuch'"),
    (['onnx', '--device', 'cpu'], 'unrecognized arguments: --device'),
    (['ops', '--device', 'cuda'], "invalid choice: 'cuda'"),
    (['table5', '--skip-speed', '--speed-only'], 'not allowed with'),
    (['ops', '--json', '/nonexistent/x.json'], 'does not exist'),
])
def test_unknown_cases_and_options_are_usage_errors(argv, error, capsys):
    assert error in _usage_error(argv, capsys)


@pytest.mark.parametrize('case,option', COUNTS)
def test_counts_below_one_are_usage_errors(case, option, capsys):
    err = _usage_error([case, option, '0'], capsys)
    assert f'argument {option}: must be a positive integer, got 0' in err, err
    assert getattr(run.parse_args([case, option, '2']), option[2:].replace('-', '_')) == 2


def test_each_case_lists_its_own_options(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(['memory-backbone', '--help'])
    out = capsys.readouterr().out
    assert '--working-set-mib' in out and '--sections' not in out and '--dry-run' in out


def test_onnx_out_dir_is_checked_before_exporting(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    err = _usage_error(['onnx', '--out-dir', str(tmp_path / 'file' / 'onnx')], capsys)
    assert 'argument --out-dir: cannot make' in err and 'is not a directory' in err
    new = str(tmp_path / 'a' / 'b')  # made by the case later, not by the check
    assert run.parse_args(['onnx', '--out-dir', new]).out_dir == new and not osp.exists(new)


def test_a_case_refusing_its_options_is_a_usage_error(capsys, monkeypatch):
    from benchmarks.kernels import tune
    monkeypatch.setattr(tune.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as info:
        run.main(['tune'])
    assert info.value.code == 2 and '--dry-run checks it on a CPU' in capsys.readouterr().err


def _dry(case: str, tmp_path, *args: str) -> dict:
    """``CASE --dry-run`` with ``--json``: the result recorded."""
    path = tmp_path / f'{case}.json'
    with one_thread():
        returned = run.main([case, '--dry-run', '--json', str(path), *args])
    record = json.loads(path.read_text())
    assert record['case'] == case and record['argv'][:2] == [case, '--dry-run']
    assert record['result'].keys() == json.loads(json.dumps(returned, default=str)).keys()
    return record['result']


def test_memory_paths(tmp_path, capsys):
    paths = _dry('memory-paths', tmp_path)
    assert set(paths['train']) >= {'ours (closed form, scan)', 'autograd reference'}
    assert all(s > 0 for s in paths['train'].values()) and paths['flops']['ours'] > 0
    assert 'speed-up over the reference' in capsys.readouterr().out


@pytest.mark.slow
def test_memory_backbone(tmp_path, capsys):
    """Five processes: three peaks, two timings."""
    backbone = _dry('memory-backbone', tmp_path)
    assert set(backbone['peaks']) == {'local-only', 'm3', 'm3, working_set_mib 64'}
    assert all(len(t) == 1 and t[0] > 0 for t in backbone['seconds'].values())
    assert '| local-only |' in capsys.readouterr().out


def test_bytes_and_ops(tmp_path, capsys):
    counts = _dry('bytes', tmp_path)
    assert set(counts['float32']) == {'autograd', 'closed form', 'Triton kernels (operators)'}
    assert len(counts['float32']['autograd']) == 4  # M1's four stages
    assert 'GB moved by one training step' in capsys.readouterr().out
    ops = _dry('ops', tmp_path, '--device', 'meta')
    assert ops['this tree']['inference']['kernels'] > 0
    assert 'ConvNeur-M1, batch 1 at 64x64, eager, meta' in capsys.readouterr().out


def test_table5_prices_a_row_without_training(tmp_path, capsys):
    result = _dry('table5', tmp_path, '--work-dir', str(tmp_path / 'rows'))
    ((name, cost), ) = result['rows'].items()
    assert name == 'cls_convneur_m3_local_only_300e_in1k' and cost['params'] > 0
    assert 'GMACs at 224x224' in capsys.readouterr().out


def test_train(tmp_path):
    result = _dry('train', tmp_path, '--jobs', 'cls-m3', '--peers', 'local-only')
    assert 'cls-m3' in result['jobs']


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
    sections = result['sections']
    assert sections['gemm']['status'] == 'ok'
    assert sections['latency']['status'] == 'skipped: needs CUDA'
    assert sections['model']['status'] == 'skipped: not asked for (--sections)'
    assert result['exit_code'] == 0
