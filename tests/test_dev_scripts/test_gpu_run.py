""".dev_scripts/gpu_run.sh, the one GPU run, checked on the CPU: the install
step, its loud stop before any step, and the hand-over to the lab's gpu case
with what is left of the time limit (the case's own bookkeeping is tested in
benchmarks/tests/test_gpu_session.py)."""
import json
import os
import os.path as osp
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from ..paths import REPO

SCRIPT = osp.join(REPO, '.dev_scripts', 'gpu_run.sh')


def _wheels(folder, *names: str) -> str:
    """A wheel folder holding empty files of these names (a dry run only lists them)."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(osp.join(folder, name), 'w').close()
    return str(folder)


def _run(out, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT, '--out', str(out), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, **{'PYTHON': sys.executable, **env}))


def _progress(out) -> list:
    with open(osp.join(out, 'progress.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def host_wheels(tmp_path):
    """The folder download_stack.sh and build_mmcv_cuda_wheel.sh fill, for this Python."""
    tag = 'cp%d%d' % sys.version_info[:2]
    mmcv = f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64'
    return _wheels(tmp_path / 'wheels', 'addict-2.4.0-py3-none-any.whl', f'{mmcv}.whl',
                   f'{mmcv}.flavor.json')


def test_a_dry_run_installs_nothing_and_runs_the_gpu_cases_checks_into_out(tmp_path,
                                                                           host_wheels):
    out, tar, record = tmp_path / 'results', tmp_path / 'results.tgz', tmp_path / 'gpu.json'
    done = _run(out, '--dry-run', '--limit-s', '400', '--tar', str(tar), '--',
                '--only', 'correctness/tiles', '--json', str(record), WHEELS=host_wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'mmcv-2.1.0' in (out / 'install.log').read_text()
    (line, ) = _progress(out)
    assert (line['step'], line['status'], line['dry_run']) == ('correctness/tiles',
                                                              'ok (dry run)', True)
    lines = json.loads(record.read_text())['result']['lines']
    assert [l['status'] for l in lines] == ['ok (dry run)']
    assert 'test_persistent_programs_on_cuda' in (out / 'correctness_tiles.log').read_text()
    # the gpu case got what the install left of the limit
    assert 0 < line['left_s'] <= 400 and tar.exists()


def test_the_gpu_cases_options_pass_after_the_double_dash(tmp_path, host_wheels):
    done = _run(tmp_path, '--dry-run', '--no-mmcv-ops', '--', '--list', WHEELS=host_wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'correctness/forward' in done.stdout and 'sanitizer/memcheck' in done.stdout


def test_an_mmcv_wheel_for_another_python_stops_the_run_before_any_step(tmp_path):
    wheels = _wheels(tmp_path / 'wheels', 'addict-2.4.0-py3-none-any.whl',
                     'mmcv-2.1.0-cp399-cp399-linux_x86_64.whl')
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', WHEELS=wheels)
    assert done.returncode == 3
    assert 'INSTALL FAILED' in done.stderr and 'build_mmcv_cuda_wheel.sh' in done.stderr
    assert not (out / 'progress.jsonl').exists()


def test_a_wheel_folder_without_the_stacks_wheels_stops_the_run_and_packs_its_log(tmp_path):
    tag = 'cp%d%d' % sys.version_info[:2]
    mmcv = f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64'
    wheels = _wheels(tmp_path / 'wheels', f'{mmcv}.whl', f'{mmcv}.flavor.json')
    out, tar = tmp_path / 'results', tmp_path / 'results.tgz'
    out.mkdir()
    (out / 'ncu_read.ncu-rep').write_bytes(b'a resumed run\'s report')
    done = _run(out, '--dry-run', '--tar', str(tar), WHEELS=wheels)
    assert done.returncode == 3
    assert 'none of the stack' in done.stderr and 'download_stack.sh' in done.stderr
    assert not (out / 'progress.jsonl').exists()
    with tarfile.open(tar) as packed:  # the log alone: a resumed folder's reports stay out
        assert packed.getnames() == ['results/install.log']


def test_the_gpu_cases_exit_status_is_the_runs(tmp_path):
    # a Python that answers the install's one-line checks and fails everything else
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo cp3; exit 0; fi\n'
                    'echo "fake python: $*"; exit 7\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = _run(tmp_path / 'results', '--no-mmcv-ops', PYTHON=str(fake),
                WHEELS=str(tmp_path / 'no_wheels'))
    assert done.returncode == 7, done.stdout + done.stderr
    assert 'fake python: -m benchmarks.run gpu --out' in done.stdout
    deadline = int(done.stdout.split('--deadline ')[1].split()[0])
    assert '--no-mmcv-ops' in done.stdout and 0 < deadline - time.time() <= 520


@pytest.mark.parametrize('args', [['bogus'], ['--limit-s', 'soon'], ['--frobnicate']])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args):
    done = _run(tmp_path, *args)
    assert done.returncode == 2
    assert args[0] in done.stderr or args[-1] in done.stderr
