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
from ..paths import REPO, import_analysis_tool, import_file, import_tool

DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')

# (tool, arguments before the bad option, the option): every count these tools take
COUNTS = [('benchmark', ['--task', 'speed'], opt)
          for opt in ('--batch', '--iters', '--rounds', '--size')]
COUNTS += [('benchmark', ['--task', 'checkpointing'], opt)
           for opt in ('--batch', '--chunk-size', '--repeats', '--threads', '--gpus')]
COUNTS += [('analyze_model', ['--tasks', 'fp16-headroom', DEMO_CONFIG], opt)
           for opt in ('--iters', '--batch', '--top')]


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


def test_checkpointing_sizes_and_gpu_sizes(capsys):
    parse = import_analysis_tool('benchmark').parse_args
    task = ['--task', 'checkpointing']
    assert 'must be a positive integer' in _usage_error(parse, task + ['--size', '512', '0'],
                                                        capsys)
    err = _usage_error(parse, task + ['--gpu-gib', '0'], capsys)
    assert 'argument --gpu-gib: must be a number above 0' in err
    assert 'must be a number >= 0' in _usage_error(parse, task + ['--reserve-gib', '-1'], capsys)
    assert parse(task + ['--reserve-gib', '0']).reserve_gib == 0


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


def test_benchmark_json_is_checked_before_measuring(tmp_path, capsys):
    """The JSON is written after every model has been measured: a missing
    directory would lose them all."""
    parse = import_analysis_tool('benchmark').parse_args
    task = ['--task', 'speed']
    err = _usage_error(parse, task + ['--json', '/nonexistent/x.json'], capsys)
    assert 'argument --json: the directory /nonexistent does not exist' in err
    assert 'is a directory' in _usage_error(parse, task + ['--json', str(tmp_path)], capsys)
    out = str(tmp_path / 'speed.json')
    assert parse(task + ['--json', out]).json == out and not osp.exists(out)


def test_an_unknown_arch_is_a_usage_error_dry_run_or_not(capsys):
    parse = import_analysis_tool('benchmark').parse_args
    for extra in ([], ['--dry-run']):
        err = _usage_error(parse, ['--task', 'checkpointing', '--arch', 'm9', *extra], capsys)
        assert "argument --arch: invalid choice: 'm9'" in err
    err = _usage_error(parse, ['--task', 'checkpointing', '--per-gpu-batch', '--archs', 'm1',
                               'M2'], capsys)
    assert "argument --archs: invalid choice: 'M2'" in err


def test_test_py_checks_out_before_the_evaluation(tmp_path, capsys):
    """test.py dumps its predictions after the whole evaluation: a path it
    cannot write would lose it."""
    parse = import_tool('test').parse_args
    start = [DEMO_CONFIG, 'epoch_1.pth', '--out']
    assert 'must end with .pkl' in _usage_error(parse, start + ['preds.json'], capsys)
    (tmp_path / 'x.pkl').mkdir()
    assert 'is a directory' in _usage_error(parse, start + [str(tmp_path / 'x.pkl')], capsys)
    (tmp_path / 'file').write_text('')
    assert 'is not a directory' in _usage_error(
        parse, start + [str(tmp_path / 'file' / 'preds.pkl')], capsys)
    out = str(tmp_path / 'new' / 'preds.pkl')  # MMEngine makes the missing directory
    assert parse(start + [out]).out == out
    assert parse(start + ['s3://bucket/preds.pkl']).out == 's3://bucket/preds.pkl'
    if os.geteuid() != 0:  # root writes a read-only file
        locked = tmp_path / 'locked.pkl'
        locked.write_text('')
        locked.chmod(0o444)
        assert 'is not writable' in _usage_error(parse, start + [str(locked)], capsys)


def test_fp16_headroom_missing_data_is_a_clear_error_and_leaves_no_temp_dir(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    tool = import_analysis_tool('analyze_model')
    missing = str(tmp_path / 'no_imagenet')
    with pytest.raises(FileNotFoundError, match='the dataset named by the config is not there'):
        tool.main(['--tasks', 'fp16-headroom', DEMO_CONFIG, '--iters', '1', '--cfg-options',
                   f'train_dataloader.dataset.data_root={missing}'])
    assert not list(tmp_path.glob('fp16_headroom_*'))


def test_fp16_headroom_removes_its_work_dir(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / 'imagenet_tiny')
    generate_imagenet_tiny(root, train_per_class=1, val_per_class=1)
    temp = tmp_path / 'temp'
    temp.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(temp))
    tool = import_analysis_tool('analyze_model')
    assert tool.main(['--tasks', 'fp16-headroom', DEMO_CONFIG, '--iters', '1', '--batch', '2',
                      '--cfg-options',
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


SOAK = osp.join(REPO, '.dev_scripts', 'exit_code_soak.sh')


@pytest.mark.parametrize('script,starts', [(SOAK, '[soak]')])
def test_shell_tools_help(script, starts, tmp_path):
    """``--help`` is no WORK_DIR (mkdir's help, then a soak)."""
    for flag in ('--help', '-h'):
        result = _run(script, flag, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('usage:') and osp.basename(script) in result.stdout
        assert starts not in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())


DEMO_SCRIPTS = [osp.join(REPO, 'tools', 'demo', f'{task}.sh')
                for task in ('detection', 'segmentation', 'classification')]
SETUP_SCRIPTS = [osp.join(REPO, 'tools', 'setup', f'{name}.sh')
                 for name in ('run_demo', 'setup_env')]


@pytest.mark.parametrize('script', DEMO_SCRIPTS + SETUP_SCRIPTS)
def test_demo_and_setup_scripts_answer_help_and_refuse_options(script, tmp_path):
    """``--help`` printed the header, not a demo run into a WORK_DIR named
    '--help' (nor a set-up); an option is no WORK_DIR either."""
    # by an absolute path, and by a relative one (the script changes directory)
    for flag, path in (('--help', script), ('-h', osp.relpath(script, tmp_path))):
        result = _run(path, flag, cwd=tmp_path, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[0] in ('The', 'Create', 'Classification'), result.stdout[:200]
        assert not result.stderr and 'set -e' not in result.stdout
    refused = _run(script, '--work-dir', cwd=tmp_path, timeout=30)
    assert refused.returncode == 2 and 'unknown option --work-dir' in refused.stderr
    too_many = _run(script, 'a', 'b', cwd=tmp_path, timeout=30)
    assert too_many.returncode == 2 and 'takes at most' in too_many.stderr
    assert not list(tmp_path.iterdir())


def test_smoke_answers_help(capsys):
    smoke = import_file('smoke', osp.join(REPO, 'tools', 'demo', 'smoke.py'))
    with pytest.raises(SystemExit) as exit_info:
        smoke.main(['--help'])
    assert exit_info.value.code == 0 and 'usage: ' in capsys.readouterr().out


@pytest.mark.parametrize('script,starts', [(SOAK, '[soak]')])
def test_shell_tools_stop_on_a_directory_they_cannot_make(script, starts, tmp_path):
    """A WORK_DIR that cannot be made stops the soak with a word of its own
    (not an empty WORK, its files at /)."""
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
