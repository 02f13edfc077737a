""".dev_scripts/gpu_run.sh, the one GPU run, checked on the CPU: its dry run
(the commands, their order and their outputs under --out), the install
step's loud stop before any section, and that a failing section is recorded
while the next one runs."""
import csv
import os
import os.path as osp
import stat
import subprocess
import sys

import pytest

from ..paths import REPO

SCRIPT = osp.join(REPO, '.dev_scripts', 'gpu_run.sh')
SECTIONS = ['profile', 'bench', 'train', 'tests']


def _wheels(folder, *names: str) -> str:
    """A wheel folder holding empty files of these names (a dry run only lists them)."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(osp.join(folder, name), 'w').close()
    return str(folder)


def _run(out, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT, '--out', str(out), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, **{'PYTHON': sys.executable, **env}))


def _summary(out) -> list:
    with open(osp.join(out, 'summary.tsv')) as f:
        return list(csv.DictReader(f, delimiter='\t'))


@pytest.fixture
def host_wheels(tmp_path):
    """The folder download_stack.sh and build_mmcv_cuda_wheel.sh fill, for this Python."""
    tag = 'cp%d%d' % sys.version_info[:2]
    mmcv = f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64'
    return _wheels(tmp_path / 'wheels', 'addict-2.4.0-py3-none-any.whl', f'{mmcv}.whl',
                   f'{mmcv}.flavor.json')


def test_dry_run_plans_every_section_in_order_into_out(tmp_path, host_wheels):
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', WHEELS=host_wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _summary(out)
    assert [r['step'] for r in rows] == ['install'] + SECTIONS
    assert all(r['status'] == 'dry-run' for r in rows)
    by_step = {r['step']: r for r in rows}
    assert '-m benchmarks.run memory ' in by_step['bench']['command']
    assert f'--json {out}/bench.json' in by_step['bench']['command']
    assert '-m benchmarks.run memory --sections profile' in by_step['profile']['command']
    assert '-m benchmarks.run train' in by_step['train']['command']
    assert f'--json {out}/train.json' in by_step['train']['command']
    tests = by_step['tests']['command']
    assert '-m gpu' in tests and 'fp16_amp' in tests and 'roi_align' in tests
    assert 'graph_breaks' in tests and f'--junitxml {out}/tests.xml' in tests
    # each section's limit leaves the sections after it their estimates
    limits = [int(by_step[s]['limit_s']) for s in SECTIONS]
    assert limits == sorted(limits) and limits[-1] <= 600
    for name in SECTIONS:
        assert by_step[name]['command'] in (out / f'{name}.log').read_text()
    assert 'mmcv-2.1.0' in (out / 'install.log').read_text()


def _only_section(tmp_path, wheels: str, name: str, *args: str, **env: str):
    """A dry run of the one section ``name``: the results folder and its summary row."""
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', *args, name, WHEELS=wheels, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _summary(out)
    assert [r['step'] for r in rows] == ['install', name]
    return out, rows[1]


def test_the_kernels_section_runs_only_when_named(tmp_path, host_wheels):
    out, row = _only_section(tmp_path, host_wheels, 'kernels')
    command = row['command']
    assert '-m gpu' in command and 'on_cuda' in command
    assert f'--junitxml {out}/kernels.xml' in command


def test_the_tune_section_runs_only_when_named_within_its_limit(tmp_path, host_wheels):
    out, row = _only_section(tmp_path, host_wheels, 'tune', '--limit-s', '400',
                             TUNE_ARGS='--stage 1')
    command = row['command']
    assert '-m benchmarks.run tune' in command and '--stage 1' in command
    assert f'--json {out}/tune.json' in command
    # it stops trying candidates early enough to time the calls within the section's limit
    limit = int(row['limit_s'])
    assert f'--limit-s {limit - 45} ' in command


def test_the_precision_section_runs_only_when_named_with_its_options(tmp_path, host_wheels):
    out, row = _only_section(tmp_path, host_wheels, 'precision', PRECISION_ARGS='--seeds 0 1')
    command = row['command']
    assert '-m benchmarks.run precision' in command and '--seeds 0 1' in command
    assert f'--work-dir {out}/precision_runs' in command
    assert f'--json {out}/precision.json' in command
    default = _only_section(tmp_path / 'default', host_wheels, 'precision')[1]['command']
    assert '--precisions float32 bfloat16 float16' in default


def test_without_mmcv_ops_the_tests_that_need_them_are_left_out(tmp_path, host_wheels):
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', '--no-mmcv-ops', 'tests', WHEELS=host_wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = {r['step']: r for r in _summary(out)}['tests']['command']
    assert 'graph_breaks' in tests and 'fp16_amp' not in tests and 'roi_align' not in tests


def test_sections_run_in_the_order_given_and_are_skipped_past_the_limit(tmp_path, host_wheels):
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', '--limit-s', '100', 'tests', 'profile', WHEELS=host_wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _summary(out)
    assert [r['step'] for r in rows] == ['install', 'tests', 'profile']
    assert rows[1]['status'].startswith('skipped') and rows[2]['status'] == 'dry-run'


def test_an_mmcv_wheel_for_another_python_stops_the_run_before_any_section(tmp_path):
    wheels = _wheels(tmp_path / 'wheels', 'addict-2.4.0-py3-none-any.whl',
                     'mmcv-2.1.0-cp399-cp399-linux_x86_64.whl')
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', WHEELS=wheels)
    assert done.returncode == 3
    assert 'INSTALL FAILED' in done.stderr and 'build_mmcv_cuda_wheel.sh' in done.stderr
    assert [(r['step'], r['status']) for r in _summary(out)] == [('install', 'failed')]


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    # a Python that answers the install's one-line checks and fails every section
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo cp3; exit 0; fi\n'
                    'echo "fake python: $*"; exit 7\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / 'results'
    done = _run(out, '--no-mmcv-ops', 'bench', 'tests', PYTHON=str(fake),
                WHEELS=str(tmp_path / 'no_wheels'))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r['step']: r['status'] for r in _summary(out)}
    assert rows == {'install': 'ok', 'bench': 'failed (exit 7)', 'tests': 'failed (exit 7)'}
    assert '-m benchmarks.run memory' in (out / 'bench.log').read_text()


@pytest.mark.parametrize('args', [['bogus'], ['--limit-s', 'soon'], ['--frobnicate']])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args):
    done = _run(tmp_path, *args)
    assert done.returncode == 2
    assert args[0] in done.stderr or args[-1] in done.stderr


def test_section_s_replaces_the_estimates_that_size_each_sections_limit(tmp_path, host_wheels):
    out = tmp_path / 'results'
    done = _run(out, '--dry-run', '--limit-s', '500', 'bench', 'kernels', WHEELS=host_wheels,
                SECTION_S='kernels=170')
    assert done.returncode == 0, done.stdout + done.stderr
    by_step = {r['step']: r for r in _summary(out)}
    # the bench leaves the kernels their 170 s of what the install left
    assert int(by_step['install']['left_s']) == 500
    assert int(by_step['bench']['limit_s']) == int(by_step['bench']['left_s']) - 170
    assert int(by_step['bench']['left_s']) <= 500 - int(by_step['install']['seconds'])
    assert by_step['kernels']['status'] == 'dry-run'
    for bad in ('kernels=soon', 'nosuch=10'):
        done = _run(out, '--dry-run', WHEELS=host_wheels, SECTION_S=bad)
        assert done.returncode == 2 and 'SECTION_S' in done.stderr


def test_the_bench_section_takes_its_options(tmp_path, host_wheels):
    out, row = _only_section(tmp_path, host_wheels, 'bench',
                             BENCH_ARGS='--sections branch compiled')
    assert row['command'].rstrip().endswith(f'--json {out}/bench.json --sections branch compiled')
