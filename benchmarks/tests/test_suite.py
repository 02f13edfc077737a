"""``python -m benchmarks.run memory`` in its CPU dry run: the case a GPU
host runs without edits (.dev_scripts/gpu_run.sh's bench and profile
sections), so its set-up, sections and JSON are checked here (its figures only
mean something on the GPU)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import run
from benchmarks.common.record import Record
from benchmarks.common.subjects import BRANCH_VARIANTS, unsupported
from benchmarks.memory import suite as memory_suite
from tests.paths import REPO
from tests.threads import one_thread


def _run(*args, timeout=300):
    # one intra-op thread: on 2 shared cores OpenMP's spinning threads made
    # the dry run 3x slower (tests/threads.py)
    return subprocess.run([sys.executable, '-m', 'benchmarks.run', 'memory', '--dry-run',
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    done = _run('--json', str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    record = json.loads(out.read_text())
    assert record['case'] == 'memory' and record['argv'][:2] == ['memory', '--dry-run']
    return record['result'], done.stdout


def test_dry_run_writes_a_result_of_the_schema_with_no_failure(dry_run):
    result, stdout = dry_run
    assert memory_suite.check_schema(result) == []
    assert result['dry_run'] and result['setup'] == 'ok'
    failed = [(p, s) for p, s in memory_suite.statuses(result['sections'])
              if s.startswith('error')]
    assert not failed
    assert 'targets' in stdout and 'wrote' in stdout


def test_dry_run_measures_what_a_cpu_can_and_skips_the_cuda_items(dry_run):
    result, _ = dry_run
    sections = result['sections']
    gemm = {(r['product'], r['precision']): r for r in sections['gemm']['rows']}
    assert all(r['tflops'] > 0 for (_, p), r in gemm.items() if p in ('float32', 'bf16'))
    assert all(r['status'] == 'skipped: needs CUDA' for (_, p), r in gemm.items()
               if p == 'tf32')
    assert any(name.startswith('write ') for name, _ in gemm)  # stage 1 writes at 64x64
    for mode in ('float32', 'bf16_autocast', 'train_bf16_autocast'):
        row = sections['model']['modes'][mode]
        assert row['status'] == 'ok'
        assert row['models']['M3']['ms'] > 0 and row['models']['M3 local-only']['ms'] > 0
    # the training-step target reads the model section's training row
    assert result['targets']['training step overhead over local-only, bf16 eager']['value'] \
        == sections['model']['modes']['train_bf16_autocast']['overhead_over_local']
    assert sections['compiled']['backend'] == 'eager'
    assert sections['compiled']['modes']['float32']['status'] == 'ok'
    assert sections['latency']['status'] == 'skipped: needs CUDA'
    branch = sections['branch']['rows']
    assert branch['tf32']['status'] == 'skipped: needs CUDA'
    assert branch['train_float32']['status'] == 'ok'


def test_variants_that_run_the_float32_path_on_a_cpu_match_it_exactly(dry_run):
    """On a CPU the defaults are the PyTorch path in float32 ('auto'), so the
    variants that name it explicitly compute the same products in the same
    order: their error against the float32 row is 0. A variant that rounds
    (bf16 operands or autocast) is not 0."""
    branch = dry_run[0]['sections']['branch']['rows']
    for name in ('torch_float32', 'matmul_float32'):
        assert branch[name]['status'] == 'ok' and branch[name]['error_vs_float32'] == 0, name
    for name in ('matmul_bfloat16', 'bf16_autocast'):
        assert branch[name]['status'] == 'ok' and branch[name]['error_vs_float32'] > 0, name


def test_memory_variants_run_exactly_where_the_installed_memory_takes_their_keys(dry_run):
    """Whatever this commit's NeuralMemory takes runs (or needs CUDA);
    the rest is skipped with the reason, never a crash."""
    result, _ = dry_run
    keys = result['environment']['memory_keys']
    for name, row in result['sections']['branch']['rows'].items():
        cfg, _, _, cuda_only = BRANCH_VARIANTS[name]
        if cuda_only:
            assert row['status'] == 'skipped: needs CUDA', name
        elif keys is not None and not set(cfg) <= set(keys):
            assert row['status'].startswith('skipped: NeuralMemory here takes no'), name
        else:
            assert row['status'] == 'ok', (name, row['status'])


def test_dry_run_numerics_against_float64(dry_run):
    numerics = dry_run[0]['sections']['numerics']
    logits = numerics['logits']['rows']
    assert logits['float32']['error_vs_float64'] < 1e-4
    assert 0 < logits['bf16_autocast']['error_vs_float32'] < 0.2
    memory = numerics['memory']['rows']
    for max_lr in ('1', '0.2', '0.001'):
        row = memory[f'max_lr={max_lr}']
        assert row['update_over_output'] > 0  # a chunk was written and read
        assert row['float32']['output_error'] < 1e-5
        assert row['float32']['update_error'] < 1e-2, row['float32']


def test_budget_guard_records_what_it_skipped(tmp_path):
    out = tmp_path / 'bench.json'
    with one_thread():
        result = run.main(['memory', '--dry-run', '--json', str(out), '--budget-s', '0',
                           '--sections', 'gemm', 'branch'])
    assert result['exit_code'] == 0
    sections = json.loads(out.read_text())['result']['sections']
    assert sections['model']['status'] == 'skipped: not asked for (--sections)'
    rows = sections['branch']['rows']
    assert rows['float32']['status'].startswith('skipped: budget')
    assert rows['tf32']['status'] == 'skipped: needs CUDA'


def test_budget_estimates_an_item_by_the_last_of_its_kind():
    suite = memory_suite.MemorySuite(Record(None, 'memory'), dry_run=True, budget_s=1000.0)
    assert suite.why_not('model') is None  # nothing measured yet
    suite.last_s['model'] = 5000.0
    assert suite.why_not('model').startswith('skipped: budget')
    assert suite.why_not('branch_variant') is None


def _compiled_row(m3_ms, status='ok'):
    return dict(status=status, models={'M3': dict(ms=m3_ms), 'M3 local-only': dict(ms=4.0)},
                overhead_over_local=(m3_ms - 4.0) / 4.0)


def test_the_compiled_section_gives_the_entry_auto_reads_under_compile(monkeypatch):
    """Both compiled rows ok: a ``MeasuredPath`` with ``compiled=True`` that
    the path policy accepts, the kernels' row its Triton time; either row
    not ok: none. The target takes the faster row, as a measured 'auto' does."""
    from convneur_mm.models.layers.memory_ops import dispatch
    from convneur_mm.models.layers.memory_ops.dispatch import check_measured_paths
    kernels = 'bf16_autocast implementation=triton'
    modes = {'bf16_autocast': _compiled_row(12.0), kernels: _compiled_row(6.0)}
    entry = memory_suite.compiled_measured_path(modes, (9, 0), 'NVIDIA H200', 128, 128)
    assert (entry.arch, entry.operand_dtype, entry.training, entry.compiled) == (
        90, 'bfloat16', False, True)
    assert (entry.triton_ms, entry.torch_ms, entry.block_d, entry.every_kernel) == (
        6.0, 12.0, 128, True)
    assert 'H200' in entry.measured
    check_measured_paths([entry])
    for broken in ('bf16_autocast', kernels):
        assert memory_suite.compiled_measured_path(
            dict(modes, **{broken: dict(status='error: x')}), (9, 0), 'a card', 128,
            128) is None
    # a rerun on the PyTorch path (after a fault) times no kernels' row, so gives no entry
    monkeypatch.setattr(dispatch, 'FORCED_IMPLEMENTATION', 'torch')
    row = memory_suite._compiled_kernels_rows(None, 'inductor', None, lambda part: None)
    assert row['status'] == ('skipped: CONVNEUR_MEMORY_IMPLEMENTATION=torch puts every memory '
                             'on the PyTorch path')
    assert memory_suite.compiled_measured_path(dict(modes, **{kernels: row}), (9, 0), 'a card',
                                               128, 128) is None
    result = dict(sections=dict(compiled=dict(modes=modes)))
    assert memory_suite.targets(result)['branch overhead over local-only, bf16 compiled'][
        'value'] == 0.5


def test_a_compiled_mode_does_not_start_without_its_first_estimate_on_a_gpu():
    suite = memory_suite.MemorySuite(Record(None, 'memory'), dry_run=True, budget_s=30.0)
    assert suite.why_not('compiled_mode') is None  # a dry run has no GPU estimate
    suite.dry = False
    assert 'needs about 60 s' in suite.why_not('compiled_mode')
    assert suite.why_not('model') is None


def test_an_unwritable_output_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(SystemExit) as info:
        run.main(['memory', '--dry-run', '--json', str(blocker / 'bench.json')])
    assert info.value.code == 2
    assert 'argument --json' in capsys.readouterr().err
    assert not (blocker / 'bench.json').exists()


def test_without_cuda_a_measuring_run_exits_2_with_the_way_to_check_it(capsys, monkeypatch):
    monkeypatch.setattr(memory_suite.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as info:
        run.main(['memory'])
    assert info.value.code == 2 and '--dry-run' in capsys.readouterr().err


def test_schema_check_and_key_detection_catch_what_they_should():
    assert unsupported({'recompute': True}, ['dim', 'chunk_size']).startswith(
        "skipped: NeuralMemory here takes no 'recompute'")
    assert unsupported({'recompute': True}, ['recompute']) is None
    assert unsupported({'anything': 1}, None) is None  # **kwargs: try it
    good = dict(schema=memory_suite.SCHEMA, dry_run=True, sizes={}, budget_s=None,
                environment={}, elapsed_s=1.0,
                sections={name: dict(status='ok', seconds=1.0)
                          for name in memory_suite.SECTIONS})
    assert memory_suite.check_schema(good) == []
    bad = json.loads(json.dumps(good))
    bad['sections']['gemm']['rows'] = [dict(status='fine')]
    del bad['sections']['latency']
    problems = memory_suite.check_schema(bad)
    assert any("'fine'" in p for p in problems) and any('latency' in p for p in problems)


def test_profile_section_runs_on_request_only(tmp_path):
    """Not among the defaults; asked for, its CPU cases hold kernel tables and
    the Triton case says it needs CUDA."""
    assert 'profile' in memory_suite.SECTIONS
    assert 'profile' not in memory_suite.DEFAULT_SECTIONS
    code, result = memory_suite.run(Record(str(tmp_path / 'p.json'), 'memory'), ['profile'],
                                    dry_run=True)
    rows = result['sections']['profile']['rows']
    assert all(rows[name]['status'] == 'skipped: needs CUDA'
               for name in ('triton', 'training_triton', 'triton_m4', 'triton_m4_one_block'))
    for case in ('torch', 'training', 'torch_m4'):
        assert rows[case]['status'] == 'ok', rows[case]
        assert rows[case]['case'] == case and rows[case]['kernels']
    assert result['sections']['gemm']['status'].startswith('skipped: not asked')


def test_variants_narrow_the_branch_and_numerics_rows_beside_their_reference(tmp_path):
    """What the GPU run does to give one variant a process: its rows alone,
    their error still against float32, which was not asked for."""
    code, result = memory_suite.run(Record(str(tmp_path / 'v.json'), 'memory'),
                                    ['branch'], dry_run=True,
                                    variants=['matmul_bfloat16', 'train_float32'])
    rows = result['sections']['branch']['rows']
    assert code == 0 and list(rows) == ['matmul_bfloat16', 'train_float32'], rows
    assert rows['matmul_bfloat16']['status'] == 'ok'
    assert 0 < rows['matmul_bfloat16']['error_vs_float32'] < 0.05


def test_the_profile_section_saves_after_every_case(monkeypatch):
    from benchmarks.kernels import profile
    monkeypatch.setattr(profile, 'CASES', {'torch': None, 'training': None})
    monkeypatch.setattr(profile, 'profile_case', lambda name, **kw: dict(case=name))
    suite = memory_suite.MemorySuite(Record(None, 'memory'), dry_run=True)
    suite.section, suite.section_start = 'profile', 0.0
    saved = []
    monkeypatch.setattr(suite, 'write', lambda: saved.append(
        list(suite.result['sections']['profile']['rows'])))
    memory_suite.section_profile(suite)
    assert saved == [['torch'], ['torch', 'training']]
