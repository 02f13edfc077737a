"""Impossible options of the analysis and launch tools stop at start with a
usage error (exit 2), not with a traceback after the work, a silent default or
a run that writes where it should not. No model is measured here."""
import os
import os.path as osp
import subprocess
import tempfile

import pytest

from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from projects.global_probe.probe import train as probe
from ..paths import ANALYSIS_TOOLS, REPO, import_analysis_tool

DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')
MIB, GIB = 2**20, 2**30

# (tool, arguments before the bad option, the option): every count these tools take
COUNTS = [('benchmark_speed', [], opt) for opt in ('--batch', '--iters', '--rounds')]
COUNTS += [('benchmark_memory', [], opt)
           for opt in ('--batch', '--tokens', '--dim', '--chunk', '--repeats')]
COUNTS += [('benchmark_with_cp', [], opt)
           for opt in ('--batch', '--chunk-size', '--repeats', '--threads')]
COUNTS += [('benchmark_onnx', [], '--repeats'),
           ('imagenet_memory', [], '--batch'), ('imagenet_memory', [], '--size'),
           ('imagenet_memory', [], '--gpus')]
COUNTS += [('fp16_headroom', [DEMO_CONFIG], opt) for opt in ('--iters', '--batch', '--top')]


def _usage_error(parse, argv, capsys) -> str:
    """What ``parse(argv)`` says on stderr when it exits 2 (argparse's usage error)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('tool,before,option', COUNTS)
@pytest.mark.parametrize('value', ['0', '-3'])
def test_counts_below_one_are_usage_errors(tool, before, option, value, capsys):
    parse = import_analysis_tool(tool).parse_args
    err = _usage_error(parse, before + [option, value], capsys)
    assert f'argument {option}: must be a positive integer, got {int(value)}' in err, err
    assert getattr(parse(before + [option, '2']), option[2:].replace('-', '_')) == 2


def test_with_cp_sizes_and_imagenet_memory_gpu_sizes(capsys):
    with_cp = import_analysis_tool('benchmark_with_cp').parse_args
    assert 'must be a positive integer' in _usage_error(with_cp, ['--size', '512', '0'], capsys)
    memory = import_analysis_tool('imagenet_memory').parse_args
    err = _usage_error(memory, ['--gpu-gib', '0'], capsys)
    assert 'argument --gpu-gib: must be a number above 0' in err
    assert 'must be a number >= 0' in _usage_error(memory, ['--reserve-gib', '-1'], capsys)
    assert memory(['--reserve-gib', '0']).reserve_gib == 0


def _accepted(*args, **kwargs):
    raise AssertionError('the impossible option was accepted')


@pytest.mark.parametrize('option', ['--steps', '--batch', '--train-count', '--size',
                                    '--kinds', '--memory-dim', '--chunk-size', '--dims'])
def test_probe_counts_below_one_are_usage_errors(option, capsys, monkeypatch):
    """``--steps 0`` divided by zero after training; the others built nothing."""
    monkeypatch.setattr(probe, 'probe_data', _accepted)  # no training if one gets through
    err = _usage_error(probe.main, [option, '0'], capsys)
    assert f'argument {option}: must be a positive integer, got 0' in err


def test_probe_learning_rate_is_positive(capsys, monkeypatch):
    monkeypatch.setattr(probe, 'probe_data', _accepted)
    assert 'must be a number above 0' in _usage_error(probe.main, ['--lr', '0'], capsys)


def test_benchmark_speed_out_is_checked_before_measuring(tmp_path, capsys):
    """The JSON was written after every model had been measured: a missing
    directory lost them all."""
    bench = import_analysis_tool('benchmark_speed')
    err = _usage_error(bench.parse_args, ['--out', '/nonexistent/x.json'], capsys)
    assert 'argument --out: the directory /nonexistent does not exist' in err
    err = _usage_error(bench.parse_args, ['--out', str(tmp_path)], capsys)
    assert 'is a directory' in err
    out = str(tmp_path / 'speed.json')
    assert bench.parse_args(['--out', out]).out == out and not osp.exists(out)
    # no --batch: the protocol's batch of the device, never a silent default for 0
    assert bench.throughput_batch(bench.parse_args(['--device', 'cpu'])) == 16


def test_benchmark_onnx_out_dir_is_checked_before_exporting(tmp_path, capsys):
    onnx = import_analysis_tool('benchmark_onnx').parse_args
    (tmp_path / 'file').write_text('')
    err = _usage_error(onnx, ['--out-dir', str(tmp_path / 'file' / 'onnx')], capsys)
    assert 'argument --out-dir: cannot make' in err and 'is not a directory' in err
    new = str(tmp_path / 'a' / 'b')  # made by the tool later, not by the check
    assert onnx(['--out-dir', new]).out_dir == new and not osp.exists(new)


@pytest.fixture
def imagenet_memory(monkeypatch):
    """The tool with a fixed estimate (300 MiB of weights and optimizer
    state, 100 MiB per image) instead of a measurement."""
    tool = import_analysis_tool('imagenet_memory')
    monkeypatch.setattr(tool, 'estimate', lambda arch, batch, size: dict(
        per_image=100 * MIB, saved_per_image=90 * MIB, fixed=300 * MIB, params=300 * MIB / 16))
    return tool


def test_imagenet_memory_exits_1_when_no_batch_fits(imagenet_memory, capsys):
    """A GPU of 1 GiB with 3 GiB reserved: it printed a per-GPU batch of 1
    with a peak above the GPU, and exited 0."""
    assert imagenet_memory.fitting_batch(100 * MIB, 300 * MIB, 1 * GIB, 3 * GIB) == 0
    with pytest.raises(SystemExit) as exit_info:
        imagenet_memory.main(['--archs', 'm1', '--gpu-gib', '1'])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert 'none fits' in out
    assert 'not even a batch of 1 fits a GPU of 1 GiB' in err and 'ConvNeur-M1' in err


def test_imagenet_memory_warns_when_the_global_batch_is_not_4096(imagenet_memory, capsys):
    """3 GPUs x 128 x 10 is 3840: the table's accumulative_counts said nothing."""
    rows = imagenet_memory.main(['--archs', 'm1', '--gpus', '3'])
    assert rows['m1']['batch'] == 128 and rows['m1']['accumulative_counts'] == 10
    assert rows['m1']['global_batch'] == 3840
    out = capsys.readouterr().out
    assert 'warning: ConvNeur-M1: 3 GPUs x batch 128 x accumulative_counts 10 = global ' \
           'batch 3840, not 4096' in out
    rows = imagenet_memory.main(['--archs', 'm1', '--gpus', '8'])
    assert rows['m1']['global_batch'] == 4096 and 'warning' not in capsys.readouterr().out


def test_fp16_headroom_missing_data_is_a_clear_error_and_leaves_no_temp_dir(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    tool = import_analysis_tool('fp16_headroom')
    missing = str(tmp_path / 'no_imagenet')
    with pytest.raises(FileNotFoundError, match='the dataset named by the config is not there'):
        tool.main([DEMO_CONFIG, '--iters', '1', '--cfg-options',
                   f'train_dataloader.dataset.data_root={missing}'])
    assert not list(tmp_path.glob('fp16_headroom_*'))


def test_fp16_headroom_removes_its_work_dir(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / 'imagenet_tiny')
    generate_imagenet_tiny(root, train_per_class=1, val_per_class=1)
    temp = tmp_path / 'temp'
    temp.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(temp))
    tool = import_analysis_tool('fp16_headroom')
    assert tool.main([DEMO_CONFIG, '--iters', '1', '--batch', '2', '--cfg-options',
                      f'train_dataloader.dataset.data_root={root}']) == 0
    assert 'loss scale bound over 1 iteration(s)' in capsys.readouterr().out
    assert not list(temp.glob('fp16_headroom_*'))  # (torch's compile cache may be there)


def _run(script, *args, cwd, timeout=60):
    """A shell tool with an interpreter that does nothing (``false``) and no
    soak runs: also a script that got past its checks writes nothing."""
    env = dict(os.environ, PYTHON='false', SEG_RUNS='0', CLS_RUNS='0', LOAD='0',
               ADE20K_TINY_ROOT=str(cwd / 'ade'), IMAGENET_TINY_ROOT=str(cwd / 'imagenet'))
    return subprocess.run(['bash', script, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


SOAK = osp.join(ANALYSIS_TOOLS, 'exit_code_soak.sh')
SPEED_REPORT = osp.join(ANALYSIS_TOOLS, 'speed_report.sh')


@pytest.mark.parametrize('script,starts', [(SOAK, '[soak]'), (SPEED_REPORT, '### ')])
def test_shell_tools_help(script, starts, tmp_path):
    """``--help`` was the soak's WORK_DIR (mkdir's help, then a soak) and the
    report's OUT_DIR (mkdir's help, then tee's and argparse's errors)."""
    for flag in ('--help', '-h'):
        result = _run(script, flag, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('usage:') and osp.basename(script) in result.stdout
        assert starts not in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('script,starts', [(SOAK, '[soak]'), (SPEED_REPORT, '### ')])
def test_shell_tools_stop_on_a_directory_they_cannot_make(script, starts, tmp_path):
    """The soak went on with an empty WORK (its files at /); the report
    stopped with mkdir's status and no word of its own."""
    (tmp_path / 'file').write_text('')
    result = _run(script, str(tmp_path / 'file' / 'out'), cwd=tmp_path)
    assert result.returncode == 2
    assert 'cannot' in result.stderr and str(tmp_path / 'file' / 'out') in result.stderr
    assert starts not in result.stdout + result.stderr
    assert _run(script, '--bogus', cwd=tmp_path).returncode == 2


@pytest.mark.parametrize('script,before', [('dist_train.sh', ['cfg.py']),
                                           ('dist_test.sh', ['cfg.py', 'ckpt.pth'])])
@pytest.mark.parametrize('gpus', ['0', '-1', 'two', ''])
def test_launchers_need_a_positive_process_count(script, before, gpus, tmp_path):
    """torchrun's answer to 0 was a bare AssertionError."""
    result = _run(osp.join(REPO, 'tools', script), *before, gpus, cwd=tmp_path)
    assert result.returncode == 2
    assert f"GPUS (processes per node) must be a positive integer, got '{gpus}'" \
        in result.stderr
    assert 'usage:' in result.stderr
