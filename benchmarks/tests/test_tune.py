"""The kernels' tuning search: which candidates it refuses, which it keeps,
and a dry run of the whole search in Triton's interpreter."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.kernels import tune as kernel_tuning
from benchmarks.kernels.tune import Trial, agrees, best_trial, tune_kernel
from convneur_mm.models.layers.memory_ops.kernels import tiles as kernel_tiles

from tests.paths import REPO
from tests.test_analysis.test_timing import _fake_clock

START = dict(BM=32, BH=32, num_warps=4, num_stages=2)


def _current(option: str) -> int:
    """The option the read kernel would launch with now (forced or default)."""
    return kernel_tiles.tile_config('read', 32, 64, None, None, torch.float16)[option]


def test_agrees_bounds_the_max_relative_difference_and_refuses_non_finite_or_missing():
    want = [torch.tensor([1.0, -2.0]), torch.ones(3)]
    assert agrees([t.clone() for t in want], want, 1e-5)
    assert agrees([want[0] + 1e-6, want[1]], want, 1e-5)
    assert not agrees([want[0] + 1e-4, want[1]], want, 1e-5)
    assert not agrees([torch.tensor([1.0, float('nan')]), want[1]], want, 1e-5)
    assert not agrees(want, [torch.tensor([1.0, float('nan')]), want[1]], 1e-5)
    assert not agrees([want[0], torch.ones(4)], want, 1e-5)
    assert not agrees(want[:1], want, 1e-5)


def test_a_candidate_that_computes_otherwise_or_fails_is_refused_and_the_start_kept():
    def call():  # its result depends on BM; BH 64 fails as a compile would
        if _current('BH') == 64:
            raise RuntimeError('out of resources: shared memory')
        return [torch.tensor([float(_current('BM'))])]

    axes = dict(BM=(16, 32), BH=(32, 64), num_warps=(4, ), num_stages=(2, ))
    trials = tune_kernel('read', call, START, {}, 'cpu', 1e-5, axes, repeats=1)
    assert trials[0].options == START and trials[0].seconds is not None
    refused = {t.options['BM'] if t.options['BM'] != 32 else 'BH': t.error
               for t in trials[1:]}
    assert 'results differ' in refused[16]
    assert 'RuntimeError: out of resources' in refused['BH']
    assert best_trial(trials) == trials[0]


def test_a_start_that_fails_is_reported_as_the_only_trial():
    def call():
        raise RuntimeError('out of resources')

    trials = tune_kernel('read', call, START, {}, 'cpu', 1e-5, repeats=1)
    assert len(trials) == 1 and 'out of resources' in trials[0].error
    assert best_trial(trials) == trials[0]


def test_the_other_kernels_chosen_options_are_forced_while_one_is_tuned():
    seen = []

    def call():
        seen.append(kernel_tiles.tile_config('grads_rows', 32, 64, None, None, torch.float16)['BM'])
        return [torch.zeros(1)]

    axes = dict(BM=(32, ), BH=(32, ), num_warps=(4, ), num_stages=(2, ))
    tune_kernel('read', call, START, {'grads_rows': dict(BM=16), 'read': dict(BM=64)}, 'cpu',
                1e-5, axes, repeats=1)
    assert seen and set(seen) == {16}


def test_best_trial_needs_the_minimum_gain_over_the_start():
    start = Trial(START, 1.0)
    slightly = Trial(dict(START, BM=64), 1.0 - kernel_tuning.MIN_GAIN / 2)
    clearly = Trial(dict(START, BM=128), 0.8)
    assert best_trial([start, slightly]) == start
    assert best_trial([start, slightly, clearly, Trial(dict(START, BH=16), None, 'x')]) == clearly
    # a refused start (its options fail to compile) gives way to any timed one
    assert best_trial([Trial(START, None, 'x'), slightly]) == slightly


def test_a_run_past_its_deadline_tries_the_start_only():
    calls = []
    trials = tune_kernel('read', lambda: calls.append(1) or [torch.zeros(1)], START, {}, 'cpu',
                         1e-5, dict(BM=(16, 32, 64)), repeats=1, deadline=0.0)
    assert [t.options for t in trials] == [START]


def test_measured_paths_sum_the_write_and_read_per_mode_as_auto_reads_them():
    calls = {name: dict(triton_default_ms=9.0, triton_tuned_ms=ms, torch_ms=2 * ms)
             for name, ms in (('write', 1.0), ('read', 2.0), ('write step', 4.0),
                              ('read step', 8.0))}
    entries = kernel_tuning.measured_paths(calls, 90, torch.bfloat16, 'NVIDIA H200',
                                           kernel_tuning.DRY_SHAPE)
    assert [(e.arch, e.operand_dtype, e.training, e.triton_ms, e.torch_ms) for e in entries] == [
        (90, 'bfloat16', False, 3.0, 6.0), (90, 'bfloat16', True, 12.0, 24.0)]
    assert 'NVIDIA H200' in entries[0].measured


def test_calls_that_launch_a_kernel_known_to_fault_on_cuda_are_found(monkeypatch):
    """A read's backward kernel listed as faulting: its training step (and
    no other call) is left out on CUDA; off CUDA nothing is."""
    from convneur_mm.models.layers.memory_ops.kernels import availability
    assert kernel_tuning.faulting_calls(True) == {}  # none listed
    monkeypatch.setattr(availability, 'CUDA_FAULTS', {'read_backward_rows': 'seen somewhere'})
    faulty = kernel_tuning.faulting_calls(True)
    assert list(faulty) == ['read step'] and 'read_backward_rows' in faulty['read step']
    assert kernel_tuning.faulting_calls(False) == {}


def test_a_call_left_out_takes_its_kernels_and_its_path_entry_with_it(monkeypatch):
    names = ('write', 'read', 'write step', 'read step')
    timed = []
    monkeypatch.setattr(kernel_tuning, 'stage_calls', lambda *args, **kwargs: kernel_tuning.Calls(
        *({name: (lambda: [torch.ones(1)]) for name in names} for _ in range(2))))
    monkeypatch.setattr(kernel_tuning, 'faulting_calls', lambda on_cuda: {'read step': 'why'})
    monkeypatch.setattr(kernel_tuning, 'time_kernel', lambda call, device, repeats: 1e-3)
    monkeypatch.setattr(kernel_tuning, 'tune_kernel',
                        lambda kernel, call, start, *args: [Trial(start, 1e-3)])
    monkeypatch.setattr(kernel_tuning, '_time_calls',
                        lambda result, calls, *args: timed.extend(calls.triton))
    result = kernel_tuning.tune_stage(kernel_tuning.DRY_SHAPE, torch.float16, 'cpu',
                                      kernels=['read', 'read_backward_rows', 'grads_rows'])
    assert list(result['kernels']) == ['read', 'grads_rows']
    assert timed == ['write', 'read', 'write step'] and result['skipped'] == {'read step': 'why'}
    assert 'Left out: the read step call and its kernels (why).' in \
        kernel_tuning.format_report(result)
    calls = {name: dict(triton_tuned_ms=1.0, torch_ms=2.0) for name in names[:3]}
    entries = kernel_tuning.measured_paths(calls, 90, torch.bfloat16, 'NVIDIA H200',
                                           kernel_tuning.DRY_SHAPE)
    assert [e.training for e in entries] == [False]  # inference only


def test_kernel_seconds_on_cuda_sum_the_kernels_own_launches(monkeypatch):
    rows = [dict(name='read_kernel', ms=2.0), dict(name='read_backward_rows_kernel', ms=5.0),
            dict(name='read_kernel_0d1d2', ms=1.0), dict(name='void at::reduce', ms=7.0)]
    monkeypatch.setattr(kernel_tuning, 'is_cuda', lambda device: True)
    monkeypatch.setattr(kernel_tuning, 'profile_kernels',
                        lambda call, **kw: dict(kernels=rows))
    monkeypatch.setattr(kernel_tuning, 'time_kernel', lambda call, device, repeats: 42.0)
    assert kernel_tuning.kernel_seconds('read', None, 'cuda') == pytest.approx(3e-3)
    # a kernel the profile does not name: none (a tuning run then times whole calls)
    assert kernel_tuning.kernel_seconds('grads_rows', None, 'cuda') is None
    assert kernel_tuning.kernel_seconds('read', None, 'cuda', by_kernel=False) == 42.0


def test_a_call_that_fails_at_its_defaults_is_recorded_and_the_run_goes_on(monkeypatch):
    """A default launch that fails (a compile error at a GPU's tiles) leaves a
    record written before any kernel is tuned, and the others still tune."""
    names = ('write', 'read', 'write step', 'read step')

    def failing():
        raise RuntimeError('out of resources: shared memory')

    monkeypatch.setattr(kernel_tuning, 'stage_calls', lambda *args, **kwargs: kernel_tuning.Calls(
        *({name: failing if name == 'read' else (lambda: [torch.ones(1)]) for name in names}
          for _ in range(2))))
    monkeypatch.setattr(kernel_tuning, 'time_kernel', lambda call, device, repeats: (
        call(), 1e-3)[1])
    monkeypatch.setattr(kernel_tuning, 'tune_kernel',
                        lambda kernel, call, start, *args: [Trial(start, 1e-3)])
    monkeypatch.setattr(kernel_tuning, '_time_calls', lambda *args: None)
    progress = []
    result = kernel_tuning.tune_stage(
        kernel_tuning.DRY_SHAPE, torch.float16, 'cpu', kernels=['read', 'grads_rows'],
        on_progress=lambda r: progress.append(dict(r.get('call_errors', {}))))
    assert 'out of resources' in result['call_errors']['read']
    assert progress[0] == result['call_errors']  # written before the first kernel's search
    assert list(result['kernels']) == ['read', 'grads_rows']


def test_a_kernel_that_replaces_others_is_timed_against_their_sum(monkeypatch):
    """The chunk gradients' one program per chunk against its rows and
    columns passes at their chosen options (itself not chosen meanwhile, not
    even where a tuned entry runs it on this GPU): their own launches
    summed; none where the profile misses one."""
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    seen = {}

    def seconds(kernel, call, device, repeats):
        seen[kernel] = (kernel_tiles.chosen_kernel('grads_chunk', 32, torch.float16, 90),
                        kernel_tiles.tile_config('grads_rows', 32, 64, None, None,
                                           torch.float16)['BM'])
        return times[kernel]

    entry = tuned.TunedTile('grads_chunk', 90, 'float16', 32, False, 32, 32, 8, 2)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (entry, ))
    assert kernel_tiles.chosen_kernel('grads_chunk', 32, torch.float16, 90)
    monkeypatch.setattr(kernel_tuning, 'is_cuda', lambda device: True)
    monkeypatch.setattr(kernel_tuning, 'kernel_seconds', seconds)
    chosen = {'grads_chunk': dict(BM=32), 'grads_rows': dict(BM=16)}
    times = {'grads_rows': 1.0, 'grads_cols': 2.0}
    assert kernel_tuning.replaced_seconds('grads_chunk', None, chosen, 'cuda') == 3.0
    assert seen == {'grads_rows': (False, 16), 'grads_cols': (False, 16)}
    times['grads_cols'] = None
    assert kernel_tuning.replaced_seconds('grads_chunk', None, chosen, 'cuda') is None


def test_a_replacing_kernel_must_compute_what_the_replaced_ones_compute(monkeypatch):
    """Its candidates are checked against its own start only: the one
    chosen is then checked against the kernels it replaces."""
    def call():  # a one-program-per-chunk result off by BM 64
        one = kernel_tiles.chosen_kernel('grads_chunk', 32, torch.float16, None)
        bm = kernel_tiles.tile_config('grads_chunk', 32, 64, None, None, torch.float16)['BM']
        return [torch.tensor([1.0 + (one and bm == 64)])]

    chosen = {'grads_rows': dict(BM=16)}
    assert kernel_tuning.agrees_with_replaced('grads_chunk', call, dict(BM=32), chosen, 1e-5)
    assert not kernel_tuning.agrees_with_replaced('grads_chunk', call, dict(BM=64), chosen, 1e-5)


def test_the_report_says_whether_a_replacing_kernel_replaces():
    record = dict(call='write', start=START, chosen=START, start_ms=1.0, chosen_ms=1.0,
                  trials=[dict(START, ms=1.0, error=None)], replaced_ms=2.0)
    for replaces, agreed, error, verdict in (
            (True, True, None, 'it replaces them'), (False, True, None, 'they stay'),
            (False, False, None, 'they stay (its results differ'),
            (False, False, 'RuntimeError: CUDA error', 'they stay (the comparison failed: '
             'RuntimeError: CUDA error)')):
        result = dict(arch=None, kernels={'grads_chunk': dict(
                          record, replaces=replaces, agrees_with_replaced=agreed, error=error)},
                      calls={}, entries=[], paths=[], stopped_at=None, error=None)
        assert (f'grads_chunk: 1.000 ms against 2.000 ms for the kernels it replaces: '
                f'{verdict}') in kernel_tuning.format_report(result)


def test_the_report_says_where_the_time_limit_or_an_error_ended_the_run():
    trial = dict(START, ms=1.0, error=None)
    result = dict(arch=90, kernels={'read': dict(call='read', start=START, chosen=START, start_ms=1.0,
                                        chosen_ms=1.0, trials=[trial])},
                  calls={}, entries=[], paths=[], stopped_at='read',
                  error='RuntimeError: CUDA error: an illegal memory access')
    report = kernel_tuning.format_report(result)
    assert 'No new entry: no candidate beat its start by 3%' in report
    assert 'The time limit ended the search at read' in report
    assert 'The final timings failed: RuntimeError: CUDA error' in report


@pytest.mark.slow  # imports triton in a child without the interpreter
def test_tuning_on_a_cpu_without_the_interpreter_is_refused_with_the_way_to_run_it(capsys):
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    done = subprocess.run([sys.executable, '-m', 'benchmarks.run', 'tune',
                           '--dry-run'], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert done.returncode == 2 and 'TRITON_INTERPRET=1' in done.stderr


@pytest.mark.slow  # about 30 s: the interpreter runs every call of the search
def test_a_dry_run_tunes_in_the_interpreter_and_reports_every_call(tmp_path):
    """Four kernels, two forward and two backward (one the projections'), at
    tiny shapes: each starts from the options it launches with, every
    candidate computes the start's results, and the six calls are timed
    through both paths."""
    out = tmp_path / 'tune.json'
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', 'tune', '--dry-run', '--kernels',
         'read', 'grads_backward_cols', 'project_backward', 'grads_chunk', '--rounds', '1',
         '--json', str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert record['case'] == 'tune'
    result = record['result']
    assert list(result['kernels']) == ['read', 'grads_backward_cols', 'project_backward',
                                       'grads_chunk']
    # the one program per chunk, timed against the two passes it would replace
    assert result['kernels']['grads_chunk']['replaced_ms'] > 0
    assert result['kernels']['grads_chunk']['agrees_with_replaced'] is True
    assert isinstance(result['kernels']['grads_chunk']['replaces'], bool)
    shape = kernel_tuning.DRY_SHAPE
    for name, kernel in result['kernels'].items():
        axes, start, _ = kernel_tuning.kernel_start(name, shape, torch.float16, None,
                                                    kernel_tuning.DRY_AXES)
        assert kernel['start'] == start and set(start) == set(axes)
        assert kernel['trials'][0] == dict(kernel['start'], ms=kernel['start_ms'], error=None)
        assert len(kernel['trials']) > 1
        assert all(t['error'] is None and t['ms'] > 0 for t in kernel['trials'])
    assert result['kernels']['grads_backward_cols']['call'] == 'write step'
    assert result['kernels']['project_backward']['call'] == 'project step'
    assert set(result['calls']) == {'write', 'read', 'write step', 'read step', 'project',
                                    'project step'}
    for call in result['calls'].values():
        # the kernels observed while they ran in the interpreter; no peak for a CPU
        assert call.pop('roofline_ms') is None
        assert all(v > 0 for v in call.values()), call
    calls = result['calls']
    assert calls['write step']['kernels_gflop'] > calls['write']['kernels_gflop']
    # the interpreter compiles for no GPU: nothing to record
    assert result['entries'] == [] and result['paths'] == []
    assert result['stopped_at'] is None and result['error'] is None
    assert result['settings']['dry_run'] and result['settings']['operand_dtype'] == 'float16'
    assert '| read | read |' in done.stdout and 'this run had none' in done.stdout


@pytest.mark.slow  # the interpreter runs the read's search
def test_a_dry_run_of_a_decomposed_jobs_read(tmp_path):
    """``--job fpn-m3`` (max_lr 0.2, float16 operands): the decomposed read's
    kernels, each candidate agreeing with the start, and their calls only."""
    out = tmp_path / 'tune.json'
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', 'tune', '--dry-run', '--job', 'fpn-m3',
         '--kernels', 'read', 'grads_rows', '--rounds', '1', '--json', str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())['result']
    assert result['settings']['decomposed'] and result['settings']['job'] == 'fpn-m3'
    assert list(result['kernels']) == ['read'] and set(result['calls']) == {'read', 'read step'}
    trials = result['kernels']['read']['trials']
    assert len(trials) > 1 and all(t['error'] is None and t['ms'] > 0 for t in trials)


def test_the_projections_start_from_their_wrappers_tiles_on_their_own_axes():
    """No hidden units or persistent programs; M4's split tried, and the
    backward's output block; their entries name the memory's whole width."""
    from benchmarks.memory.bytes import MemoryShape
    shape = MemoryShape(batch=128, tokens=3136, chunk=196, heads=1, head_dim=160)
    axes, start, width = kernel_tuning.kernel_start('project_backward', shape, torch.bfloat16,
                                                    90, kernel_tuning.AXES)
    assert (width, axes['split']) == (160, (0, 1))
    assert set(axes) == {*kernel_tuning.PROJECTION_AXES, 'split'}
    assert start == dict(BM=16, num_warps=8, num_stages=1, split=1, BO=32)
    assert axes['BO'] == (0, 32, 64)  # whole rows against blocks of output features
    axes, start, _ = kernel_tuning.kernel_start('project', shape._replace(head_dim=128),
                                                torch.bfloat16, 90, kernel_tuning.AXES)
    assert set(axes) == set(kernel_tuning.PROJECTION_AXES) - {'BO'}
    assert start == dict(BM=32, num_warps=8, num_stages=2)
    axes, start, width = kernel_tuning.kernel_start('read', shape, torch.bfloat16, 90,
                                                    kernel_tuning.AXES)
    assert width == 160 and 'BH' in axes and 'BH' in start and 'BO' not in axes
    assert [kernel_tuning.OP_OF[k] for k in ('project', 'project_backward')] == [
        'project', 'project step']


@pytest.mark.parametrize('kernel', ['read', 'project_backward'])
def test_a_gain_on_a_gpu_is_recorded_as_an_entry_the_tables_accept(monkeypatch, kernel):
    """As on a GPU (a compute capability, candidates timed): the faster
    options become a ``TunedTile`` that ``apply_tuned``'s checks accept and
    that sets them again; the projections' without hidden units."""
    from convneur_mm.models.layers.memory_ops.kernels.tiles import check_tuned_tiles
    from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
    monkeypatch.setattr(kernel_tuning, 'target_arch', lambda device: 80)
    monkeypatch.setattr(kernel_tuning, 'time_kernel', lambda *args, **kwargs: 1e-3)
    monkeypatch.setattr(kernel_tuning, '_time_calls', lambda *args, **kwargs: None)
    monkeypatch.setattr(kernel_tuning, 'measured_paths', lambda *args, **kwargs: [])
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'a card')

    def faster_with_other_warps(kernel, call, start, *args, **kwargs):
        return [Trial(start, 2e-3), Trial(dict(start, num_warps=12 - start['num_warps']), 1e-3)]

    monkeypatch.setattr(kernel_tuning, 'tune_kernel', faster_with_other_warps)
    result = kernel_tuning.tune_stage(kernel_tuning.DRY_SHAPE, torch.float16, 'cpu', [kernel])
    entry = TunedTile(**result['tiles'][0])
    check_tuned_tiles([entry])
    chosen = result['kernels'][kernel]['chosen']
    assert entry.options() == chosen and (entry.kernel, entry.arch) == (kernel, 80)
    assert ('BH' in chosen) == (kernel == 'read')
    assert result['entries'] == [f'{entry!r},']


def test_a_decomposed_read_is_tuned_alone_into_its_own_kind_of_entries(monkeypatch):
    """``decomposed``: of the kernels asked for, the decomposed read's only,
    from its own defaults, recorded as decomposed entries, no path measured."""
    from convneur_mm.models.layers.memory_ops.kernels.tiles import check_tuned_tiles
    from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
    monkeypatch.setattr(kernel_tuning, 'target_arch', lambda device: 90)
    monkeypatch.setattr(kernel_tuning, 'time_kernel', lambda *args, **kwargs: 1e-3)
    monkeypatch.setattr(kernel_tuning, '_time_calls', lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'a card')
    starts = []

    def faster_with_other_warps(kernel, call, start, *args, **kwargs):
        starts.append((kernel, start))
        return [Trial(start, 2e-3), Trial(dict(start, num_warps=12 - start['num_warps']), 1e-3)]

    monkeypatch.setattr(kernel_tuning, 'tune_kernel', faster_with_other_warps)
    shape = kernel_tuning.DRY_SHAPE._replace(head_dim=160)
    result = kernel_tuning.tune_stage(shape, torch.bfloat16, 'cpu',
                                      ['grads_rows', 'read', 'read_backward_cols', 'project'],
                                      decomposed=True)
    assert list(result['kernels']) == ['read', 'read_backward_cols']
    for kernel, start in starts:  # M4's split at the decomposed read's own tiles
        config = kernel_tiles.tile_config(kernel, 160, shape.chunk, None, None, torch.bfloat16,
                                          True, 90)
        assert start == dict(BM=config['BM'], BH=config['BH'], num_warps=config['num_warps'],
                             num_stages=2, programs_per_sm=0, split=1) and config['BH'] == 16
    entries = [TunedTile(**tile) for tile in result['tiles']]
    check_tuned_tiles(entries)
    assert [(e.kernel, e.decomposed) for e in entries] == [('read', True),
                                                           ('read_backward_cols', True)]
    assert result['paths'] == [] and result['measured_paths'] == []


def test_a_jobs_stage_is_its_configs_memory_at_its_largest_image():
    from benchmarks.common.record import UsageError
    shape, max_lr = kernel_tuning.job_stage('cascade-m3', 0)
    assert (shape.batch, shape.tokens, shape.chunk, shape.head_dim, max_lr) == (
        2, 200 * 333, 4096, 128, 1e-3)  # 800 x 1333, chunks of 4096
    shape, max_lr = kernel_tuning.job_stage('upernet-m4', 1)
    assert (shape.batch, shape.tokens, shape.chunk, shape.head_dim, max_lr) == (
        4, 64 * 64, 1024, 160, 0.2)
    with pytest.raises(UsageError, match='--stage must be in'):
        kernel_tuning.job_stage('fpn-m3', 4)


def test_rows_past_a_kernels_row_limit_are_not_tried():
    axes = kernel_tuning.AXES
    limited = kernel_tuning.within_row_limit(axes, 'read_backward_rows', torch.bfloat16, 90)
    assert limited['BM'] == (16, 32) and limited['BH'] == axes['BH']
    for kernel, dtype, arch in (('read', torch.bfloat16, 90),
                                ('read_backward_rows', torch.float32, 90),
                                ('read_backward_rows', torch.bfloat16, 80),
                                ('read_backward_rows', torch.bfloat16, None)):
        assert kernel_tuning.within_row_limit(axes, kernel, dtype, arch) is axes


def test_the_split_is_tried_only_where_a_width_has_two_column_blocks():
    axes = kernel_tuning.AXES
    for d, be in ((160, 32), (96, 0)):
        tiles = kernel_tiles.tile_config('read', d, 196, None, None, torch.bfloat16, arch=90)
        split_axes, start = kernel_tuning.with_split_axis(axes, dict(START), tiles, d)
        assert split_axes['split'] == (0, 1) and start == dict(START, split=int(be > 0))
    # 128 columns: one block, whatever the split
    tiles = kernel_tiles.tile_config('read', 128, 196, None, None, torch.bfloat16, arch=90)
    assert kernel_tuning.with_split_axis(axes, dict(START), tiles, 128) == (axes, START)


def test_time_kernel_is_the_median_after_a_warm_up_off_cuda_and_do_bench_on_it(monkeypatch):
    clock = _fake_clock(monkeypatch, [3.0, 1.0, 2.0])
    calls = []
    assert kernel_tuning.time_kernel(lambda: calls.append(1), 'cpu', repeats=3) == 2.0
    assert len(calls) == 4 and not clock
    import triton.testing
    asked = []
    monkeypatch.setattr(triton.testing, 'do_bench',
                        lambda fn, **kw: asked.append((fn, kw)) or 1.5)  # milliseconds
    monkeypatch.setattr(torch.cuda, 'device', lambda device: contextlib.nullcontext())
    work = object()
    assert kernel_tuning.time_kernel(work, 'cuda:1') == pytest.approx(1.5e-3)
    assert asked == [(work, dict(warmup=25, rep=100, return_mode='median'))]


def _tune_record(path, tiles=(), paths=()):
    import json
    from convneur_mm.models.layers.memory_ops.kernels.tuned import MeasuredPath, TunedTile
    path.write_text(json.dumps(dict(case='tune', argv=[], result=dict(
        tiles=[TunedTile(*t)._asdict() for t in tiles],
        measured_paths=[MeasuredPath(*p)._asdict() for p in paths]))))
    return str(path)


def test_apply_tuned_puts_a_records_entries_in_place_of_those_it_measures_again(
        tmp_path, monkeypatch):
    from convneur_mm.models.layers.memory_ops.kernels import tiles, tuned
    old = tuned.TunedTile('read', 90, 'bfloat16', 128, False, 16, 32, 4, 2)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (old, ))
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', tuned.MEASURED_PATHS)
    record = _tune_record(tmp_path / 'tune.json',
                          tiles=[('read', 90, 'bfloat16', 128, False, 32, 64, 8, 3),
                                 ('grads_rows', 90, 'bfloat16', 128, False, 16, 64, 8, 2, 2)],
                          paths=[(90, 'bfloat16', True, 1.0, 2.0, 'an H200')])
    assert kernel_tuning.apply_tuned([record]) == dict(tiles=2, measured_paths=1)
    assert tiles.tuned_tiles('read', 90, torch.bfloat16, 128, False)['BM'] == 32
    assert tiles.tuned_tiles('grads_rows', 90, torch.bfloat16, 128, False)['programs_per_sm'] == 2
    assert [e.triton_ms for e in tuned.MEASURED_PATHS
            if (e.arch, e.operand_dtype, e.training, e.block_d) == (90, 'bfloat16', True, 128)
            ] == [1.0]


def test_apply_tuned_refuses_what_is_no_tune_record_or_a_bad_entry(tmp_path, monkeypatch):
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    monkeypatch.setattr(tuned, 'TUNED_TILES', ())
    other = tmp_path / 'memory.json'
    other.write_text('{"case": "memory", "result": {}}')
    with pytest.raises(ValueError, match='not a record of the tune case'):
        kernel_tuning.apply_tuned([str(other)])
    bad = _tune_record(tmp_path / 'bad.json',
                       tiles=[('read', 90, 'bfloat16', 128, False, 24, 64, 8, 3)])
    with pytest.raises(ValueError, match='BM'):
        kernel_tuning.apply_tuned([bad])
    assert tuned.TUNED_TILES == ()  # nothing applied
