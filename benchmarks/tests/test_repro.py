"""The ``repro`` case: a minimal kernel that stands for the read's backward
rows pass at 64-row tiles. Its logic is exact in the interpreter; it compiles
for sm_90 to the pass's matrix layouts; faults and wrong results are findings."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.kernels import repro
from tests.paths import REPO
from tests.test_models.test_memory_ops.memory_cases import _inspect


def test_a_dry_run_of_one_variant_agrees_with_float64_in_the_interpreter(tmp_path):
    out = tmp_path / 'repro.json'
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', 'repro', '--rows', '64', '--warps', '8',
         '--stages', '2', '--dry-run', '--json', str(out)], capture_output=True, text=True,
        cwd=REPO, timeout=600, env=dict(os.environ, TRITON_INTERPRET='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())['result']
    # 80 rows: a whole 64-row tile and a masked one, each row written
    assert result['agrees'] and 0 < result['error'] < 1e-3, result


def _pass_products(rows: int, warps: int):
    """The read's backward rows pass at M3's stage-1 width, forced to
    ``rows``-row tiles and ``warps`` warps, as it compiles for sm_90."""
    inspect = _inspect()
    from convneur_mm.models.layers.memory_ops import MemoryWeights
    from convneur_mm.models.layers.memory_ops.kernels.tiles import forced_tiles
    from convneur_mm.models.layers.memory_ops.read.triton import launch_read_backward
    heads, batch, chunks, length, d = 1, 4, 4, 196, repro.D
    empty = lambda *shape: torch.empty(*shape, device='meta')  # noqa: E731
    states = MemoryWeights(empty(heads, batch, chunks, d, 4 * d),
                           empty(heads, batch, chunks, 4 * d, d), empty(heads, batch, chunks, d))
    merged = lambda: empty(batch, chunks * length, heads * d).view(  # noqa: E731
        batch, -1, heads, d).permute(2, 0, 1, 3)
    with forced_tiles('read_backward_rows', num_warps=warps), \
            inspect.recording_launches(90) as launches:
        launch_read_backward(states, merged(), merged(), merged(), length, torch.bfloat16,
                             None, None, rows, None)
    launch = next(x for x in launches if x.kernel.__name__ == 'read_backward_rows_kernel'
                  and x.kwargs['BM'] == rows)
    assert launch.kwargs['num_warps'] == warps and launch.kwargs['BH'] == repro.BLOCK_HIDDEN
    return inspect.products(90, launch.kernel, *inspect.launch_specialization(launch, 90))


def _layouts(products):
    return sorted({(p.rows, p.cols, p.version, p.warps, p.instr) for p in products})


@pytest.mark.parametrize('warps', [8, 4])
def test_the_repro_compiles_to_the_passs_products_for_sm_90(warps):
    """At 64 rows both take Hopper's wgmma with the same layouts. At 8 warps
    the two chained products put every warp along the rows, 8 x 16 rows over
    a 64-row tile: each of their elements is computed twice."""
    mine = repro.products(repro.Variant(64, warps, 2))
    assert _layouts(mine) == _layouts(_pass_products(64, warps))
    assert all(p.version == 3 for p in mine)
    assert sorted(p.copies for p in mine) == ([1, 1, 1] if warps == 4 else [1, 2, 2])


def test_at_32_rows_the_repro_leaves_wgmma_as_the_pass_does():
    assert {p.version for p in repro.products(repro.Variant(32, 8, 2))} == {2}


def _done(stdout='', stderr='', code=0):
    return subprocess.CompletedProcess([], code, stdout, stderr)


def test_faults_hangs_and_wrong_results_are_findings_and_a_variant_that_cannot_run_fails(
        monkeypatch, capsys):
    outputs = iter([
        _done(stderr='RuntimeError: CUDA error: an illegal memory access was encountered',
              code=1),
        _done('[repro] 64 rows, 8 warps, 1 stages: error 8.900e-01\n'),
        subprocess.TimeoutExpired(['child'], 25),
        _done('[repro] 32 rows, 8 warps, 2 stages: error 3.000e-03\n'),
        _done(stderr='triton.compiler.errors.CompilationError: at 12:4', code=1)])
    calls, written = [], []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        out = next(outputs)
        if isinstance(out, Exception):
            raise out
        return out

    monkeypatch.setattr(repro.subprocess, 'run', fake_run)
    entries = repro.run_all(repro.VARIANTS, dry_run=True,
                            on_entry=lambda done: written.append(len(done)))
    assert [e['verdict'] for e in entries] == ['fault', 'wrong', 'hang', 'agrees', 'failed']
    assert written == [1, 2, 3, 4, 5]  # the record, after every variant
    # each variant in a child of its own, with its options
    assert calls[0][calls[0].index('--rows') + 1:] == [
        '64', '--warps', '8', '--stages', '2', '--dry-run']
    assert len(calls) == len(repro.VARIANTS)
    assert '64 rows, 8 warps, 2 stages: fault' in capsys.readouterr().out
    # a child killed by a signal (SIGSEGV, SIGABRT) faulted, whatever it printed
    assert repro.verdict(dict(agrees=None, exit_status=-11, output='')) == 'fault'
    assert repro.verdict(dict(agrees=None, exit_status=1, output='NameError')) == 'failed'


def test_a_wrong_pre_in_one_tile_fails_where_rounding_does_not():
    """The inputs put GELU's argument where its derivative varies, and the
    error is the worst row's: one 64-row tile whose ``x w1`` is off by a few
    percent shows, 16-bit rounding of d_pre does not."""
    x, dy, w1, w2 = (t.double() for t in repro.inputs(512, repro.HIDDEN, torch.float32))
    want = repro.reference(x, dy, w1, w2)
    pre = x @ w1

    def gx_of(pre, round_d_pre=False):
        phi = torch.exp(-0.5 * pre * pre) / (2 * torch.pi) ** 0.5
        d_pre = (dy @ w2.T) * (0.5 * (1 + torch.erf(pre / 2 ** 0.5)) + pre * phi)
        if round_d_pre:
            d_pre = d_pre.to(torch.bfloat16).double()
        return d_pre @ w1.T

    assert repro.row_error(gx_of(pre, round_d_pre=True), want) < repro.TOLERANCE / 2
    off = pre.clone()
    off[:64] *= 1.05
    assert repro.row_error(gx_of(off), want) > repro.TOLERANCE
    gx = want.clone()
    gx[70, 3] = float('nan')
    assert repro.row_error(gx, want) != repro.row_error(gx, want)  # NaN


def test_the_options_go_together_and_a_real_run_needs_a_gpu(capsys, monkeypatch):
    from benchmarks.run import main
    with pytest.raises(SystemExit) as exit_info:
        main(['repro', '--rows', '64'])
    assert exit_info.value.code == 2
    assert '--rows, --warps and --stages go together' in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(['repro'])
    assert exit_info.value.code == 2
    assert 'runs on a CUDA GPU' in capsys.readouterr().err
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(['repro', '--dry-run'])
    assert exit_info.value.code == 2
    assert 'start it with TRITON_INTERPRET=1' in capsys.readouterr().err
