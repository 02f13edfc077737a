"""The GPU run's bookkeeping (``benchmarks.gpu``), on the CPU with steps that
are small Python programs: saved after every step, a failure diagnosed and
rerun on the PyTorch path, no step started without its time, a resume that
runs only what is missing; and every real step's command parsed by its case."""
import json
import os.path as osp
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from benchmarks.gpu import session as gpu_session
from benchmarks.gpu import steps as gpu_steps
from benchmarks.gpu.session import Session, finished, read_progress, select
from benchmarks.gpu.steps import Step
from benchmarks.run import build_parser
from convneur_mm.models.layers.memory_ops.dispatch import FORCE_ENV
from tests.paths import REPO


def _py(code: str):
    return ('{python}', '-c', code)


def _step(name, code='pass', estimate_s=1.0, **kw) -> Step:
    return Step(name, name, _py(code), estimate_s, dry_argv=_py(code), **kw)


def _in(seconds):
    return time.time() + seconds


def _statuses(out):
    return [(line['step'], line['status']) for line in read_progress(str(out))]


def test_each_step_is_saved_and_packed_as_it_finishes_and_a_failure_names_its_kernel(tmp_path):
    out, tar = tmp_path / 'out', str(tmp_path / 'out.tgz')
    fault = ("import sys; print('in read_backward_rows_kernel'); "
             "print('RuntimeError: CUDA error: an illegal memory access'); sys.exit(3)")
    steps = [_step('a/ok'), _step('b/fault', fault), _step('c/after')]
    code = Session(str(out), steps, deadline=None, tar=tar).run()
    assert code == 1  # a step failed
    assert _statuses(out) == [('a/ok', 'ok'), ('b/fault', 'failed (exit 3)'), ('c/after', 'ok')]
    failed = read_progress(str(out))[1]
    assert failed['kernels_named'] == ['read_backward_rows_kernel']
    assert failed['error'].startswith('RuntimeError: CUDA error')
    assert 'illegal memory access' in (out / 'b_fault.log').read_text()
    with tarfile.open(tar) as packed:
        names = packed.getnames()
    assert 'out/progress.jsonl' in names and 'out/c_after.log' in names


def test_a_failed_step_that_plans_its_own_path_reruns_on_pytorch(tmp_path):
    code = (f"import os, sys; sys.exit(0 if os.environ.get('{FORCE_ENV}') == 'torch' else 5)")
    write = ("import sys; open(sys.argv[1], 'w').write('x'); " + code)
    steps = [Step('bench/x', 'x', ('{python}', '-c', write, '{out}/bench_x.json'), 1.0,
                  reruns_on_torch=True),
             _step('bench/y', 'import sys; sys.exit(5)')]
    Session(str(tmp_path), steps, deadline=None).run()
    lines = read_progress(str(tmp_path))
    assert [(l['step'], l['status'], l['attempt']) for l in lines] == [
        ('bench/x', 'failed (exit 5)', 'as planned'), ('bench/x', 'ok', 'on PyTorch'),
        ('bench/y', 'failed (exit 5)', 'as planned')]  # no rerun where it was not asked for
    assert (tmp_path / 'bench_x.torch.log').exists()
    # the rerun's record beside the first attempt's, not over it
    assert (tmp_path / 'bench_x.json').exists() and (tmp_path / 'bench_x.torch.json').exists()
    # the planned attempt decides a resume: a failed one is retried on request
    assert finished(lines) == {'bench/x': 'failed (exit 5)', 'bench/y': 'failed (exit 5)'}
    assert finished(lines, retry_failed=True) == {}


def test_no_step_starts_without_its_time_and_a_step_past_its_timeout_is_stopped(
        tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, 'TIMEOUT_SLACK_S', 0.0)
    marker = tmp_path / 'orphan.txt'
    child = tmp_path / 'child.py'  # a child that outlives its step, as ncu's and torchrun's do
    child.write_text(f'import time\ntime.sleep(4)\nopen({str(marker)!r}, "w").write("alive")\n')
    orphan = (f'import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); '
              'time.sleep(60)')
    steps = [_step('a/long', estimate_s=100.0), _step('b/hangs', orphan, estimate_s=0.5,
                                                      reruns_on_torch=True)]
    session = Session(str(tmp_path), steps, deadline=_in(30.0), speed=0.5)
    assert session.need(steps[1]) == 1.0  # a slower card needs more
    assert session.run() == 1  # a hang is a failure
    statuses = _statuses(tmp_path)
    assert statuses[0][0] == 'a/long' and statuses[0][1].startswith('skipped: ')
    assert 'needs about 200 s' in statuses[0][1]
    assert statuses[1][1].startswith('timed out after 2 s')
    assert statuses[2] == ('b/hangs', statuses[2][1]) and statuses[2][1].startswith('timed out')
    time.sleep(5)
    assert not marker.exists()  # the step's whole process group was stopped


def test_a_resume_runs_only_what_is_missing(tmp_path):
    marker = tmp_path / 'runs.txt'
    count = f"open({str(marker)!r}, 'a').write('x')"
    steps = [_step('a/ok', count), _step('b/failed', count + '; import sys; sys.exit(1)'),
             _step('c/long', count, estimate_s=50.0), _step('d/tool', **{})]
    steps[3] = Step('d/tool', 'needs a tool', ('no-such-profiler-here', '--x'), 1.0)
    Session(str(tmp_path), steps, deadline=_in(20.0)).run()
    assert marker.read_text() == 'xx'
    assert finished(read_progress(str(tmp_path))) == {'a/ok': 'ok', 'b/failed': 'failed (exit 1)'}
    assert _statuses(tmp_path)[3] == ('d/tool', 'not run: no-such-profiler-here is not on PATH '
                                                'here')
    Session(str(tmp_path), steps, deadline=None).run()  # a later lease, with time
    assert marker.read_text() == 'xxx'  # only the step that had been skipped ran
    Session(str(tmp_path), steps, deadline=None, retry_failed=True).run()
    assert marker.read_text() == 'xxxx'  # and now the failed one


def test_a_line_cut_short_by_a_kill_is_not_read_back_nor_swallows_the_next(tmp_path):
    (tmp_path / gpu_session.PROGRESS).write_text(
        json.dumps(dict(step='a/ok', status='ok')) + '\n{"step": "b/x", "sta')
    assert finished(read_progress(str(tmp_path))) == {'a/ok': 'ok'}
    Session(str(tmp_path), [_step('a/ok'), _step('c/next')], deadline=None).run()
    assert finished(read_progress(str(tmp_path))) == {'a/ok': 'ok', 'c/next': 'ok'}


def test_a_step_without_its_report_or_with_no_test_run_failed(tmp_path):
    xml = ('<testsuites><testsuite tests="2" skipped="2" failures="0" errors="0">'
           '</testsuite></testsuites>')
    skipped = f"open({str(tmp_path)!r} + '/t.xml', 'w').write({xml!r})"
    # the report's reading back (``then``) runs only where the report was written
    steps = [Step('ncu/x', 'x', _py('pass'), 1.0, report='{out}/ncu_x.ncu-rep',
                  then=_py('import sys; sys.exit(4)')),
             Step('tests/x', 'x', _py(skipped), 1.0, junit='{out}/t.xml')]
    assert Session(str(tmp_path), steps, deadline=None).run() == 1
    assert [s for _, s in _statuses(tmp_path)] == [
        'failed: no ncu_x.ncu-rep written (nothing profiled?)',
        "failed: no test ran ({'tests': 2, 'skipped': 2, 'failed': 0})"]


def test_the_diagnosis_finds_pytests_ncus_and_the_sanitizers_errors_and_names_only_kernels():
    log = ('  File "launcher.py", in launch_kernel\n    read_backward_rows_kernel[grid](...)\n'
           'E   RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered\n')
    found = gpu_session.diagnose(log, gpu_steps.MEMORY_KERNELS)
    assert found == dict(error='RuntimeError: Triton Error [CUDA]: an illegal memory access '
                         'was encountered', kernels_named=['read_backward_rows_kernel'])
    assert gpu_session.diagnose('==ERROR== Failed to profile', ())['error'] == \
        '==ERROR== Failed to profile'
    assert gpu_session.diagnose('========= Invalid __global__ read of size 2', ())['error'] \
        .startswith('========= Invalid')


def test_a_tar_inside_the_results_is_refused_and_a_failed_pack_does_not_end_the_run(tmp_path):
    with pytest.raises(gpu_session.UsageError, match='pack itself'):
        Session(str(tmp_path), [], deadline=None, tar=str(tmp_path / 'r.tgz'))
    code = Session(str(tmp_path / 'out'), [_step('a/ok')], deadline=None,
                   tar=str(tmp_path / 'no_such_dir' / 'r.tgz')).run()
    assert code == 0 and _statuses(tmp_path / 'out') == [('a/ok', 'ok')]


def test_the_tar_keeps_within_its_limit_leaving_out_the_largest_reports(tmp_path):
    import os
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'progress.jsonl').write_text('{}\n')
    for name, size in (('ncu_a.ncu-rep', 300_000), ('ncu_b.ncu-rep', 100_000)):
        (out / name).write_bytes(os.urandom(size))  # incompressible, as a report nearly is
    tar = str(tmp_path / 'out.tgz')
    note = gpu_session.pack(str(out), tar, limit_bytes=250_000)
    assert note == 'left out 1 reports to stay within 250000 bytes (0 copied beside it)'
    with tarfile.open(tar) as packed:
        names = packed.getnames()
        left = packed.extractfile('out/left_out_of_tar.txt').read().decode()
    assert 'out/ncu_b.ncu-rep' in names and 'out/ncu_a.ncu-rep' not in names
    assert left == 'ncu_a.ncu-rep\t300000 bytes\n' and osp.getsize(tar) <= 250_000
    # a report within the limit, left out, comes back as a file of its own
    (out / 'ncu_c.ncu-rep').write_bytes(os.urandom(200_000))
    assert gpu_session.pack(str(out), tar, limit_bytes=250_000).startswith('left out 2')
    assert (tmp_path / 'ncu_c.ncu-rep').read_bytes() == (out / 'ncu_c.ncu-rep').read_bytes()
    assert not (tmp_path / 'ncu_a.ncu-rep').exists()
    assert gpu_session.pack(str(out), tar) is None  # no limit: everything
    with tarfile.open(tar) as packed:
        assert 'out/ncu_a.ncu-rep' in packed.getnames()
    assert gpu_session.pack(str(out), tar, limit_bytes=100).endswith('still larger than the limit')


def test_a_steps_budget_and_a_reruns_records_are_filled_in():
    argv = ('{python}', '--budget-s', '{budget}', '--json', '{out}/b.json', '{tuned}')
    assert gpu_steps.expand(argv, 'py', '/o', ['t.json'], 95.4, '.torch') == [
        'py', '--budget-s', '95', '--json', '/o/b.torch.json', '--tuned', 't.json']


def test_a_dry_run_checks_each_step_on_the_cpu_and_only_shows_the_host_tools(tmp_path):
    steps = [_step('a/check', 'import os; assert os.environ["CHECKED"] == "1"',
                   dry_env=(('CHECKED', '1'), )),
             Step('b/ncu', 'a profiler', ('ncu', '{python}', '-c', 'pass'), 1.0)]
    code = Session(str(tmp_path), steps, deadline=None, dry_run=True).run()
    assert code == 0
    assert [s for _, s in _statuses(tmp_path)] == [
        'ok (dry run)', "dry-run: shown, not run (needs the GPU host's tools)"]
    assert finished(read_progress(str(tmp_path))) == {}  # a real run does everything


def test_later_steps_get_the_tune_records_written_before_them(tmp_path):
    write = "open({out!r} + '/tune_m3.json', 'w').write('{{}}')".format(out=str(tmp_path))
    show = Step('b/show', 'x', ('{python}', '-c', 'import sys; print(sys.argv[1:])', '{tuned}'),
                1.0)
    Session(str(tmp_path), [_step('a/tune', write), show], deadline=None).run()
    assert f"['--tuned', '{tmp_path}/tune_m3.json']" in (tmp_path / 'b_show.log').read_text()


def test_select_takes_steps_and_groups_and_refuses_unknown_names():
    steps = gpu_steps.gpu_steps()
    chosen = select(steps, ['correctness', 'tune/m3'], ['correctness/read'])
    assert [s.name for s in chosen] == ['correctness/forward', 'correctness/backward',
                                        'correctness/project', 'correctness/tiles', 'tune/m3']
    with pytest.raises(gpu_session.UsageError, match='nosuch'):
        select(steps, ['nosuch'], [])


def test_a_first_lease_reaches_the_profilers_after_the_kernels_it_profiles_are_checked():
    names = [s.name for s in gpu_steps.gpu_steps()]
    groups = list(dict.fromkeys(s.group for s in gpu_steps.gpu_steps()))
    assert groups[:4] == ['correctness', 'ncu', 'sanitizer', 'tune']
    assert names[:3] == list(gpu_steps.FIRST_CHECKS)
    assert names[3:10] == [f'ncu/{k}' for k in gpu_steps.NCU_KERNELS] + [
        'sanitizer/memcheck', 'sanitizer/racecheck']
    # the read's launch variants (one known to fault) and the minimal kernel, then tuning
    assert names[10:14] == ['correctness/tiles', 'correctness/read', 'sanitizer/repro',
                            'sanitizer/repro-memcheck']
    assert [n for n in names if n.startswith('tune/')] == names[14:18] == [
        'tune/m3', 'tune/m4', 'tune/cascade-m3', 'tune/upernet-m4']
    assert names.index('tune/upernet-m4') < names.index('bench/model')
    # an H200's install (67 s with mmcv's ops) leaves the three checks, the five
    # profiles and memcheck within gpu_run.sh's default limit of 520 s
    estimates = {s.name: s.estimate_s for s in gpu_steps.gpu_steps()}
    assert 67 + sum(estimates[n] for n in names[:9]) <= 520


def test_a_step_whose_record_skipped_items_for_time_is_partial_and_resumed(tmp_path):
    record = tmp_path / 'bench_x.json'
    write = (f"import json; json.dump(dict(result=dict(sections=dict(branch=dict(rows=["
             f"'ok', 'skipped: budget (3 s left, needs about 20 s)'])))), "
             f"open({str(record)!r}, 'w'))")
    steps = [Step('bench/x', 'x', _py(write), 1.0, reruns_on_torch=True,
                  record='{out}/bench_x.json')]
    assert Session(str(tmp_path), steps, deadline=None).run() == 0  # not a failure
    assert _statuses(tmp_path) == [('bench/x', 'partial: 1 items skipped for time')]  # no rerun
    assert finished(read_progress(str(tmp_path))) == {}  # a resume runs it again
    assert gpu_session.record_items(str(tmp_path / 'none.json')) == (0, [])


def test_a_step_whose_record_holds_a_failed_row_fails_and_reruns_on_pytorch(tmp_path):
    """A case records a row's error and exits 0 (a train variant's CUDA fault
    fails every later row too): the step failed, and reruns on PyTorch."""
    write = ("import json, os, sys; torch = os.environ.get('%s') == 'torch'; "
             "rows = dict(train={'M3': dict(status='ok'), 'M3 kernels': dict(status='ok' if "
             "torch else 'error: RuntimeError: CUDA error: an illegal memory access')}, "
             "errors={'M3 kernels': 'skipped: the kernels cannot run here (forced)'}); "
             "json.dump(dict(result=dict(jobs=dict(cls=rows))), open(sys.argv[1], 'w'))"
             % FORCE_ENV)
    steps = [Step('train/x', 'x', ('{python}', '-c', write, '{out}/train_x.json'), 1.0,
                  reruns_on_torch=True, record='{out}/train_x.json')]
    assert Session(str(tmp_path), steps, deadline=None).run() == 1
    assert _statuses(tmp_path) == [
        ('train/x', 'failed: 1 rows failed, the first with error: RuntimeError: CUDA error: '
         'an illegal memory access'), ('train/x', 'ok')]
    # a row's own failure (an OOM) is recorded as failed, and costs no rerun
    oom = write.replace('CUDA error: an illegal memory access',
                        'OutOfMemoryError: CUDA out of memory').replace("'ok' if torch else ", '')
    out = tmp_path / 'oom'
    steps = [Step('train/x', 'x', ('{python}', '-c', oom, '{out}/train_x.json'), 1.0,
                  reruns_on_torch=True, record='{out}/train_x.json')]
    assert Session(str(out), steps, deadline=None).run() == 1
    assert _statuses(out) == [('train/x', 'failed: 1 rows failed (no GPU fault), the first with '
                                          'error: RuntimeError: OutOfMemoryError: CUDA out of memory')]
    built = tmp_path / 'built.json'  # a variant that failed to build, in 'errors'
    built.write_text(json.dumps(dict(result=dict(errors={'M3 compiled': 'error: a', 'M4': 'ok'},
                                                 runs=[dict(error='error: b')]))))
    assert gpu_session.record_items(str(built)) == (0, ['error: a', 'error: b'])


def test_a_stopped_run_stops_its_step_records_it_and_packs(tmp_path):
    import os
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        pytest.skip('signal handlers are set in the main thread only')
    tar = str(tmp_path / 'out.tgz')
    marker = tmp_path / 'survived.txt'
    # the step writes the marker 5 s after it starts, unless its group is stopped
    child = f'import time; time.sleep(5); open({str(marker)!r}, "w").write("alive")'
    steps = [_step('a/ok'), _step('b/long', child, estimate_s=100.0), _step('c/never')]
    handler = signal.getsignal(signal.SIGTERM)
    session = Session(str(tmp_path / 'out'), steps, deadline=None, tar=tar)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    session.run_step = _after_first(session.run_step, timer.start)  # SIGTERM within b/long
    begin = time.time()
    try:
        code = session.run()
    finally:
        timer.cancel()
    assert code == 1 and time.time() - begin < 5
    assert _statuses(tmp_path / 'out') == [
        ('a/ok', 'ok'), ('b/long', 'timed out: the run was stopped (SIGTERM)')]
    assert finished(read_progress(str(tmp_path / 'out'))) == {'a/ok': 'ok'}
    with tarfile.open(tar) as packed:
        assert 'out/b_long.log' in packed.getnames()
    time.sleep(max(0.0, begin + 7 - time.time()))
    assert not marker.exists()  # the step's process group was stopped
    assert signal.getsignal(signal.SIGTERM) is handler


def _after_first(run_step, then):
    """``run_step`` that calls ``then`` once its first step has ended."""
    done = []

    def wrapped(step):
        if done:
            then()
        done.append(step)
        return run_step(step)
    return wrapped


def test_a_stop_after_a_step_was_recorded_keeps_its_outcome(tmp_path):
    """SIGTERM while the folder is packed after a step: the step keeps its
    recorded outcome (a resume does not run it again)."""
    session = Session(str(tmp_path), [_step('a/ok')], deadline=None)
    packs = []

    def stopped_while_packing():  # the first pack, after the step; not the last
        packs.append(1)
        if len(packs) == 1:
            raise gpu_session.Stopped()

    session.pack = stopped_while_packing
    assert session.run() == 1
    assert _statuses(tmp_path) == [('a/ok', 'ok')]


def test_a_partial_step_is_tried_again_with_twice_its_estimate_then_kept(tmp_path):
    record = tmp_path / 'bench_x.json'
    write = (f"import json; json.dump(dict(rows=['skipped: budget (1 s left)']), "
             f"open({str(record)!r}, 'w'))")
    steps = [Step('bench/x', 'x', _py(write), 10.0, record='{out}/bench_x.json')]
    Session(str(tmp_path), steps, deadline=None).run()
    again = Session(str(tmp_path), steps, deadline=None)
    assert 'bench/x' not in again.kept and again.need(steps[0]) == 20.0
    again.run()
    assert finished(read_progress(str(tmp_path))) == {
        'bench/x': 'partial: 1 items skipped for time'}  # twice partial: kept


def test_variants_that_may_launch_kernels_get_a_process_each():
    assert gpu_steps.launches_kernels('train_triton_bf16_autocast')
    assert gpu_steps.launches_kernels('bf16_autocast')  # 'auto' with bf16 operands
    assert not gpu_steps.launches_kernels('matmul_bfloat16_torch')
    assert not gpu_steps.launches_kernels('float32')
    bench = [s for s in gpu_steps.gpu_steps() if s.name.startswith('bench/branch-')]
    assert all(s.reruns_on_torch for s in bench)
    assert bench[0].name == 'bench/branch-train_bf16_autocast'  # the training rows first
    assert all('{budget}' in s.argv for s in bench)


def test_the_package_tests_leave_out_the_torch_pinned_ones_on_another_torch():
    (tests, ) = [s for s in gpu_steps.gpu_steps(torch_pinned=False) if s.group == 'tests']
    assert 'gpu and not torch_pinned' in tests.argv
    (tests, ) = [s for s in gpu_steps.gpu_steps(torch_pinned=True) if s.group == 'tests']
    assert 'gpu' in tests.argv and 'gpu and not torch_pinned' not in tests.argv
    (tests, ) = [s for s in gpu_steps.gpu_steps(mmcv_ops=False) if s.group == 'tests']
    assert tests.argv[tests.argv.index('-k') + 1] == 'graph_breaks'  # no mmcv ops: no RoIAlign


def test_the_host_torch_is_pinned_only_at_the_pinned_version(monkeypatch):
    with open(osp.join(REPO, 'requirements', 'torch.txt')) as f:
        (pin, ) = [line.split('===')[1].strip() for line in f if line.startswith('torch===')]
    monkeypatch.setattr(torch, '__version__', f'{pin}+cu130')  # the pin's CUDA build
    assert gpu_session.host_torch_is_pinned()
    monkeypatch.setattr(torch, '__version__', '2.11.0+cu130')
    assert not gpu_session.host_torch_is_pinned()


def test_an_h100_is_given_more_time_than_an_h200():
    assert gpu_steps.gpu_speed('NVIDIA H200') == 1.0
    assert gpu_steps.gpu_speed('NVIDIA H100 80GB HBM3') < 1.0
    assert gpu_steps.gpu_speed('NVIDIA B200') == gpu_steps.UNKNOWN_GPU_SPEED


@pytest.mark.parametrize('dry', [False, True])
def test_every_lab_command_of_the_plan_parses_with_its_case(tmp_path, dry, monkeypatch):
    """A renamed option or variant fails here, not on the GPU host."""
    if not dry:  # as on the GPU host: the precision case refuses float16 without one
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for step in gpu_steps.gpu_steps():
        argv = step.dry_argv if dry else step.argv
        if argv is None:
            continue
        argv = gpu_steps.expand(argv, sys.executable, str(tmp_path), ['t.json'])
        if 'benchmarks.run' not in argv:
            continue
        args = argv[argv.index('benchmarks.run') + 1:]
        build_parser(args[0]).parse_args(args)


def test_the_gpu_case_lists_its_steps_and_refuses_an_unknown_one(tmp_path):
    """Its dry step through the runner: tests/test_dev_scripts/test_gpu_run.py,
    through the script that runs it on a GPU host."""
    def run(*args):
        return subprocess.run([sys.executable, '-m', 'benchmarks.run', 'gpu', *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
    listed = run('--out', str(tmp_path / 'l'), '--list')
    assert listed.returncode == 0 and 'sanitizer/racecheck' in listed.stdout
    bad = run('--out', str(tmp_path / 'b'), '--only', 'nosuch', '--dry-run')
    assert bad.returncode == 2 and 'nosuch' in bad.stderr
