"""The ``aot`` case: the kernels a stage launches, compiled for a GPU on the
CPU, each with its products and how many times each is computed."""
import json

import pytest

from benchmarks import run
from tests.test_models.test_memory_ops.memory_cases import _inspect


def test_a_dry_run_compiles_the_reads_launches_and_records_their_products(tmp_path, capsys):
    _inspect()  # a triton that compiles ahead of time, outside the interpreter
    path = tmp_path / 'aot.json'
    run.main(['aot', '--dry-run', '--json', str(path)])
    result = json.loads(path.read_text())['result']
    assert result['calls'] == ['read'] and result['arch'] == 90
    kernels = [r['kernel'] for r in result['reports']]
    assert kernels and set(kernels) == {'read_kernel'}, kernels
    for report in result['reports']:
        assert report['registers'] > 0 and report['products'], report
        assert all(p['copies'] >= 1 and p['version'] in (2, 3) for p in report['products'])
    assert 'read_kernel sm_90' in capsys.readouterr().out


def test_the_interpreter_is_refused_with_the_reason(monkeypatch, capsys):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    with pytest.raises(SystemExit) as exit_info:
        run.main(['aot', '--dry-run'])
    assert exit_info.value.code == 2
    assert 'without TRITON_INTERPRET' in capsys.readouterr().err


@pytest.mark.parametrize('force,message', [
    (['nosuch', 'BM=16'], "unknown kernel 'nosuch'"),
    (['read', 'BM=x'], "'BM=x' is not KEY=integer"),
    (['read', 'BM=\u00b2'], 'is not KEY=integer'),
    (['read', 'XX=3'], 'forced_tiles takes'),
    (['project', 'BH=16'], "forced_tiles of 'project' takes")])
def test_bad_forced_options_are_refused_with_the_reason(force, message, capsys):
    _inspect()
    with pytest.raises(SystemExit) as exit_info:
        run.main(['aot', '--dry-run', '--force', *force])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_forced_options_are_compiled_and_recorded(tmp_path):
    _inspect()
    path = tmp_path / 'aot.json'
    run.main(['aot', '--dry-run', '--force', 'read', 'BM=16', 'num_warps=2', '--json', str(path)])
    result = json.loads(path.read_text())['result']
    assert result['forced'] == {'read': {'BM': 16, 'num_warps': 2}}
    assert {r['num_warps'] for r in result['reports']} == {2}


def test_the_projections_launch_options_are_forced_too(tmp_path):
    """``--force project_backward ...`` compiles the projections' backward at
    those options (its other kernels at theirs)."""
    _inspect()
    path = tmp_path / 'aot.json'
    run.main(['aot', '--stage', '3', '--batch', '2', '--calls', 'branch step', '--force',
              'project_backward', 'num_warps=4', '--json', str(path)])
    result = json.loads(path.read_text())['result']
    warps = {r['kernel']: r['num_warps'] for r in result['reports']}
    assert result['forced'] == {'project_backward': {'num_warps': 4}}
    assert warps['project_backward_kernel'] == 4 and warps['project_kernel'] == 8, warps


@pytest.mark.slow  # some thirty compiles
def test_a_branch_step_compiles_every_kernel_a_training_step_launches(tmp_path):
    """The projections, the scan, the chunk gradients and the read, forward
    and backward: the kernels the write's and read's calls alone miss."""
    _inspect()
    path = tmp_path / 'aot.json'
    run.main(['aot', '--dry-run', '--calls', 'branch', 'branch step', '--json', str(path)])
    result = json.loads(path.read_text())['result']
    kernels = {r['kernel'] for r in result['reports']}
    assert {'project_kernel', 'scan_kernel', 'read_kernel', 'project_backward_kernel',
            'scan_backward_kernel', 'read_backward_rows_kernel'} <= kernels, kernels
    assert any(k.startswith('grads_backward') for k in kernels), kernels


def test_a_stage_of_one_chunk_compiles_its_branch_without_a_write(tmp_path):
    """Its projections and read, forward and backward; no chunk gradients."""
    _inspect()
    path = tmp_path / 'aot.json'
    run.main(['aot', '--stage', '3', '--batch', '2', '--calls', 'branch step', '--json',
              str(path)])
    kernels = {r['kernel'] for r in json.loads(path.read_text())['result']['reports']}
    assert {'project_kernel', 'read_kernel', 'project_backward_kernel',
            'read_backward_rows_kernel'} <= kernels, kernels
    assert not any(k.startswith('grads') for k in kernels), kernels


def test_the_writes_calls_at_a_stage_of_one_chunk_are_refused_with_the_way_to_run_it(capsys):
    _inspect()
    with pytest.raises(SystemExit) as exit_info:
        run.main(['aot', '--stage', '3', '--batch', '2', '--calls', 'read'])
    assert exit_info.value.code == 2
    assert "holds one chunk and writes nothing" in capsys.readouterr().err


def test_a_job_takes_the_branch_calls_only(capsys):
    _inspect()
    with pytest.raises(SystemExit) as exit_info:
        run.main(['aot', '--job', 'cascade-m3', '--calls', 'read'])
    assert exit_info.value.code == 2
    assert "--job takes the calls branch branch step" in capsys.readouterr().err


def test_the_projections_compile_alone_as_the_tuner_calls_them(tmp_path):
    """``--calls 'project step'``: the projections' forward and backward
    kernels, nothing else."""
    _inspect()
    path = tmp_path / 'aot.json'
    run.main(['aot', '--dry-run', '--calls', 'project step', '--json', str(path)])
    kernels = {r['kernel'] for r in json.loads(path.read_text())['result']['reports']}
    assert kernels == {'project_kernel', 'project_backward_kernel'}, kernels
