"""The read ``f_W(x)``: its Triton kernels, closed-form backward and precision."""
import json
import os
import subprocess
import sys
from typing import List

import pytest
import torch

from convneur_mm.models.layers.memory_ops import read_closed_form, read_torch
from convneur_mm.testing.errors import worst

from ...paths import REPO
from . import memory_cases
from .memory_cases import (BF16_TOL, F16_EMULATED_TOL, F16_TOL, F32_TOL, READ_BACKWARD_VARIANTS,
                           READ_BF16_AGREEMENT, _check_bfloat16, _gradcheck, _outputs_and_grads,
                           _read, _read_inputs, _relative_errors, _run_interpreted)


@pytest.mark.parametrize('rows', ['', '_rows32'])
def test_triton_forward(forward_runs, rows):
    assert forward_runs[f'forward_f32_d24{rows}']['exact'] < F32_TOL
    assert forward_runs[f'forward_f32_d24{rows}']['shapes'] == [[2, 40, 24]]
    assert forward_runs[f'forward_f16_d24{rows}']['emulated'] < F16_EMULATED_TOL
    assert forward_runs[f'forward_f16_d24{rows}']['exact'] < F16_TOL


def test_read_past_4096_rows_reads_every_row(forward_runs):
    result = forward_runs['read_past_4096_rows']
    assert result['finite'] and result['exact'] < F32_TOL, result


def test_triton_decomposed_read_keeps_small_updates(forward_runs):
    # W_t = a_t W_0 + dW_t with dW 0.2% of the state: 16-bit operands on the
    # whole state lose ~10% of the update's contribution; a_t (x @ W_0) at
    # float32 accuracy plus x @ dW in 16 bits keeps it
    assert forward_runs['decomposed_f32']['exact'] < F32_TOL
    assert forward_runs['decomposed_read_chunks_f32']['exact'] < F32_TOL
    f16 = forward_runs['decomposed_f16']
    assert f16['update'] < 1e-2 < f16['naive_update']


# where 64-row tiles of that pass miscompute (elsewhere 'rows64' is its default launch)
_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_read_backward_past_4096_rows_sums_the_pseudo_chunks(backward_runs):
    result = backward_runs['read_past_4096_rows']
    assert worst(result['grads'].values()) < F32_TOL, result['grads']


def _read_backward_child(variant: str) -> subprocess.CompletedProcess:
    """``memory_cases.read_backward_on_cuda_results`` at ``variant`` in a
    process of its own (a CUDA fault ends it alone), launches synchronous."""
    env = dict(os.environ, CONVNEUR_READ_VARIANT=variant, CUDA_LAUNCH_BLOCKING='1',
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, '-m', memory_cases.__name__,
                           'read_backward_on_cuda_results'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize('variant', [
    pytest.param(variant, marks=pytest.mark.xfail(
        _SM90, strict=True, raises=AssertionError,
        reason='64-row tiles compute wrong query gradients or fault on '
        'sm_90 (triton 3.6): once this passes, lift kernel_tiles.SM90_ROW_LIMITS'))
    if variant == 'rows64' else variant for variant in READ_BACKWARD_VARIANTS])
def test_the_read_backward_on_cuda_at_m3_width(variant):
    """Each launch variant of the read's backward rows pass in a process of
    its own (a CUDA fault ends its process): which ones compute the float64
    gradients within bfloat16's tolerance, synchronously launched so that a
    fault names its kernel. On sm_90 the default is ``kernel_tiles.row_limit``'s."""
    done = _read_backward_child(variant)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert worst(result['grads'].values()) < BF16_TOL, result


@pytest.mark.skipif(torch.cuda.is_available(), reason='the GPU test runs the child itself')
def test_the_read_backward_childs_case_runs_and_asks_for_cuda():
    """The GPU test's child runs its case (a child that ran nothing would
    exit 0 with no result): without a GPU it stops at its first CUDA tensor."""
    done = _read_backward_child('float32')
    # a frame inside the case: not a child that failed to find it
    assert done.returncode != 0 and 'in _chunk_read_case' in done.stderr, done.stderr[-3000:]


@pytest.mark.slow  # about 3 minutes: 784 tokens of 128 channels in the interpreter, twice
def test_the_read_backward_at_64_row_tiles_is_exact_in_the_interpreter_at_m3_width():
    """The kernel's indexing at the GPU's failing tiles and sizes: every
    gradient as close to float64 as at 32 rows, no access out of bounds, no
    tile left unwritten. What faults on sm_90 is then the compiled kernel
    (its code at 64 rows, or an ordering only hardware shows), not its logic."""
    result = _run_interpreted('read_backward_rows64_interpreted_results')
    rows64, rows32 = result['rows64'], result['rows32']
    assert rows64['forward'] < F16_TOL and worst(rows64['grads'].values()) < F16_TOL, result
    for name, error in rows64['grads'].items():
        assert abs(error - rows32['grads'][name]) < 1e-6, (name, result)


@pytest.mark.parametrize('heads', [None, 1, 2])
@pytest.mark.parametrize('groups,tokens,d', [(2, 3, 4), (4, 1, 2)])
def test_read_passes_gradcheck(groups, tokens, d, heads):
    assert _gradcheck(_read(read_closed_form), _read_inputs(groups, tokens, d, heads))


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('heads', [None, 2])
def test_read_matches_autograd_of_the_pytorch_ops(heads, dtype, tol):
    inputs = _read_inputs(4, 9, 16, heads, dtype=dtype)
    ours = _outputs_and_grads(_read(read_closed_form), inputs)
    reference = _outputs_and_grads(_read(read_torch), inputs)
    assert worst(_relative_errors(ours, reference)) < tol


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('heads', [None, 2])
def test_read_with_bfloat16_operands_rounds_as_the_pytorch_ops(heads, dtype):
    _check_bfloat16(_read, read_closed_form, read_torch,
                    _read_inputs(4, 16, 16, heads, dtype=dtype), READ_BF16_AGREEMENT)


@pytest.mark.parametrize('heads', [None, 2])
def test_the_read_saves_its_product_operands_in_their_dtype(heads):
    """With 16-bit operands the read saves the states and x (x in float32 for
    the decomposed read, whose W_0 products take it so) cast once, not the
    float32 tensors: the backward casts them no more, and they hold half."""
    w1, w2, g, x, *decomposed = _read_inputs(4, 16, 16, heads, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _read(read_closed_form, torch.bfloat16)(w1, w2, g, x, *decomposed)
    def dtypes(like: torch.Tensor) -> List[torch.dtype]:
        return sorted(str(t.dtype) for t in saved if t.shape == like.shape)

    assert dtypes(w1) == dtypes(w2) == ['torch.bfloat16']
    # x and H (G, M, d), H in float32
    x_dtype = 'torch.bfloat16' if heads is None else 'torch.float32'
    assert dtypes(x) == sorted([x_dtype, 'torch.float32'])
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (w1, w2, g, x))
