"""Every op's Triton kernels together: against float64 and the PyTorch path in
Triton's interpreter (forward and backward), their argument checks, what they
allocate and save, and on a CUDA GPU at the models' widths."""
import contextlib
import itertools
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_torch,
                                                  chunk_grads_triton, chunk_read_triton, kernels,
                                                  read_torch, read_triton)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads_triton_staged
from convneur_mm.models.layers.memory_ops.kernels import ops as kernel_ops
from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, project_triton,
                                                          projection_shapes)
from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.testing.dispatch_probes import LiveTensorBytes
from convneur_mm.testing.errors import least, worst

from ...paths import REPO
from .memory_cases import (BF16_TOL, CASES, DTYPES, F16_EMULATED_TOL, F16_TOL, F32_TOL, LAYOUTS,
                           _chunk_grads_case, _chunk_read_case, _decomposed_results, _grads64,
                           _half, _norm_err, _one_program_per_chunk, _rel_err, _run_interpreted,
                           _write_inputs)


def _identity(t):
    return t


@pytest.mark.slow
def test_triton_kernels_at_model_widths_in_the_interpreter():
    for case, errors in _run_interpreted('model_width_results').items():
        tol = F32_TOL if case.startswith('f32') else F16_TOL
        assert errors['exact'] < tol and errors['read'] < tol, (case, errors)
        if case.startswith('f16'):  # more float16 rounding-boundary flips in longer sums
            assert errors['emulated'] < 2 * F16_EMULATED_TOL, (case, errors)


def test_interpreter_refuses_bfloat16(forward_runs):
    # it would multiply bfloat16 bit patterns: a clear refusal, not garbage
    assert 'bfloat16' in forward_runs['interpreter_bf16']['reason']
    assert forward_runs['interpreter_bf16']['float32_reason'] is None


@pytest.fixture(scope='module')
def interpreted_modules(forward_runs):
    return forward_runs['modules']


@pytest.mark.parametrize('case', ['two_heads', 'one_chunk', 'sequential'])
def test_memory_with_triton_kernels_matches_the_pytorch_path(interpreted_modules, case):
    # implementation='triton' runs them in the interpreter on a CPU: the whole
    # module, written chunks, merged heads and the single-chunk read
    errors = interpreted_modules[case]
    assert errors['vs_torch'] < F32_TOL and errors['exact'] < F32_TOL, errors


def test_memory_with_triton_kernels_in_float16_decomposed(interpreted_modules):
    # max_lr 1e-3 and float16 operands: the decomposed read; the update is a
    # small part of the output, whose error is then mostly float32's (1e-6)
    errors = interpreted_modules['decomposed_f16']
    assert errors['vs_torch'] < 1e-4 and errors['exact'] < 1e-4, errors


def test_memory_with_triton_kernels_in_float16_writes_16_bit_chunk_gradients(
        interpreted_modules):
    # in inference the kernels hand the scan w1's and w2's gradients in float16, as
    # it writes their states: within float16's tolerance of the float32 gradients
    errors = interpreted_modules['plain_f16']
    assert errors['vs_torch'] < F16_TOL and errors['exact'] < F16_TOL, errors


@pytest.mark.parametrize('max_lr, operand_dtype, want, want_training', [
    (1.0, 'bfloat16', torch.bfloat16, torch.bfloat16),
    (1.0, 'float16', torch.float16, torch.float32),
    (1e-3, 'bfloat16', torch.bfloat16, torch.bfloat16),
    (1e-3, 'float16', torch.float32, torch.float32),
    (1.0, 'float32', torch.float32, torch.float32)])
def test_the_memory_hands_the_scan_16_bit_chunk_gradients(
        monkeypatch, max_lr, operand_dtype, want, want_training):
    """Through the kernels: w1's and w2's chunk gradients in their states'
    dtype, but float32 for float16 at a decomposed read's small max_lr
    (subnormal updates); in training bfloat16's only."""
    from convneur_mm.models.layers import neural_memory
    from convneur_mm.models.layers.memory_ops.chunk_grads import (chunk_grads,
                                                                  chunk_grads_triton_staged)
    seen = []

    def recorded(*args, **kwargs):
        return recorded_grads(chunk_grads(*args, **kwargs))

    def recorded_staged(*args, **kwargs):  # inference: the two passes in two calls
        weights_pass = chunk_grads_triton_staged(*args, **kwargs)
        return lambda: recorded_grads(weights_pass())

    def recorded_grads(grads):
        seen.append(grads.w1.dtype)
        return grads

    monkeypatch.setattr(neural_memory, 'chunk_grads', recorded)
    monkeypatch.setattr(neural_memory, 'chunk_grads_triton_staged', recorded_staged)
    memory = NeuralMemory(16, chunk_size=8, max_lr=max_lr, operand_dtype=operand_dtype,
                          implementation='triton').to('meta')
    x = torch.randn(2, 20, 16, device='meta')
    with kernels.without_launches():
        with torch.no_grad():
            memory.eval()(x)
        memory.train()(x.requires_grad_())
    assert seen == [want, want_training]


def test_16_bit_chunk_gradients_in_the_operand_dtype_only():
    """Written in the operand dtype (w1's and w2's; g's stays float32),
    in inference and where autograd records; refused in another dtype."""
    w, keys, values, token_lr = _meta_projections()
    with torch.no_grad(), kernels.without_launches():
        grads = chunk_grads_triton(w, keys, values, token_lr, torch.float16,
                                   grads_dtype=torch.float16)
        assert [t.dtype for t in grads] == [torch.float16, torch.float16, torch.float32]
        with pytest.raises(ValueError, match='grads_dtype must be float32 or the operand'):
            chunk_grads_triton(w, keys, values, token_lr, torch.float16,
                               grads_dtype=torch.bfloat16)
    with kernels.without_launches():
        grads = chunk_grads_triton(w._replace(w1=w.w1.requires_grad_()), keys, values,
                                   token_lr, torch.float16, grads_dtype=torch.float16)
        assert [t.dtype for t in grads] == [torch.float16, torch.float16, torch.float32]


def test_staged_chunk_grads_let_the_caller_free_keys_values_and_step_sizes():
    """In two calls, the weights' pass holds none of the rows pass's inputs
    (with 16-bit operands): the caller's last reference frees them before
    w1's and w2's gradients are allocated. Refused where autograd records
    and under torch.compile."""
    w = _meta_projections()[0]
    groups, images, chunks, length, d = 2, 3, 2, 24, 16
    proj_bytes = images * chunks * length * groups * (2 * d + 1) * 4
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        proj = torch.empty(images, chunks * length, groups, 2 * d + 1, device='meta')
        written = proj.permute(2, 0, 1, 3).unflatten(2, (chunks, length))
        weights_pass = chunk_grads_triton_staged(w, written[..., :d], written[..., d:2 * d],
                                                 written[..., 2 * d], torch.float16,
                                                 grads_dtype=torch.float16)
        held = live.live
        del proj, written
        assert live.live == held - proj_bytes
        grads = weights_pass()
        assert [t.dtype for t in grads] == [torch.float16, torch.float16, torch.float32]
        assert [list(t.shape) for t in grads] == [[groups, images * chunks, d, 4 * d],
                                                  [groups, images * chunks, 4 * d, d],
                                                  [groups, images * chunks, d]]
    keys, values, token_lr = _meta_projections()[1:]
    with kernels.without_launches(), pytest.raises(RuntimeError, match='serves inference'):
        chunk_grads_triton_staged(w._replace(g=w.g.requires_grad_()), keys, values, token_lr)
    with torch.no_grad(), kernels.without_launches(), pytest.raises(RuntimeError,
                                                                   match='torch.compile'):
        with mock.patch.object(torch.compiler, 'is_compiling', lambda: True):
            chunk_grads_triton_staged(w, keys, values, token_lr)


@pytest.mark.parametrize('operand_dtype', ['bfloat16', 'float32'])
def test_the_memory_frees_its_projections_before_its_weights_gradients(monkeypatch,
                                                                      operand_dtype):
    """In inference through the kernels the memory drops the keys, values
    and step sizes between the two passes (float32 keys stay: the weights'
    pass reads them)."""
    from convneur_mm.models.layers import neural_memory
    inputs, alive = [], []

    def staged(weights, keys, values, token_lr, *args, **kwargs):
        inputs.extend(live.key(t) for t in (keys, values, token_lr))
        weights_pass = chunk_grads_triton_staged(weights, keys, values, token_lr, *args,
                                                 **kwargs)

        def later():
            alive.extend(live.holds(key) for key in inputs)
            return weights_pass()
        return later

    monkeypatch.setattr(neural_memory, 'chunk_grads_triton_staged', staged)
    memory = NeuralMemory(16, chunk_size=8, operand_dtype=operand_dtype,
                          implementation='triton').to('meta').eval()
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        memory(torch.randn(2, 20, 16, device='meta'))
    assert all(live.holds(key) is False for key in inputs)
    assert alive == [operand_dtype == 'float32', False, False]


def test_float16_emulation_tells_operand_rounding_apart():
    # the emulated check is only worth its tolerance if float16 rounding moves
    # the result far more than it: exact and emulated references must differ
    w, keys, values, token_lr = _write_inputs(2, 3, 24, 24, 1.0, seed=24)
    exact = _grads64(w, keys, values, token_lr, _identity)
    half = _grads64(w, keys, values, token_lr, _half)
    assert least(_norm_err(a, b) for a, b in zip(half[:2], exact[:2])) > 5 * F16_EMULATED_TOL
    ref = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                       token_lr.double())
    for a, b in zip(exact, ref):  # the emulation's maths is memory_grads'
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _meta_projections(groups=2, images=3, chunks=2, length=24, d=16):
    """Keys, values and step sizes as views of one (B, N, groups, 2d + 1)
    projection of B images, cut to their U written chunks, on tensors
    without data; and weights."""
    n = chunks * length + 5
    proj = torch.empty(images, n, groups, 2 * d + 1, device='meta')
    written = proj[:, :chunks * length].permute(2, 0, 1, 3).unflatten(2, (chunks, length))
    w = MemoryWeights(torch.empty(groups, d, 4 * d, device='meta'),
                      torch.empty(groups, 4 * d, d, device='meta'),
                      torch.empty(groups, d, device='meta'))
    return w, written[..., :d], written[..., d:2 * d], written[..., 2 * d]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_triton_implementations_allocate_their_results_and_scratch_only():
    """The wrappers read their arguments where they lie: what they allocate
    (counted on meta tensors, launches skipped) is their results, the
    gradients' documented scratch (the (tokens, d) gradient at the MLP's
    output and, with 16-bit operands, the keys, both in the operand dtype;
    the per-row-block shares of d_g are summed and gone before w1's and w2's
    gradients exist) and one cast of the weights to 16-bit operands
    (broadcast states cast once); a copy of an argument would add its bytes."""
    w, keys, values, token_lr = _meta_projections()
    groups, images, chunks, length, d = keys.shape
    cast = (w.w1.numel() + w.w2.numel()) * 2
    with torch.no_grad(), kernels.without_launches():
        with LiveTensorBytes() as live:
            grads = chunk_grads_triton(w, keys, values, token_lr, torch.float16)
        # the gradient at the MLP's output and the keys in the operand dtype
        scratch = groups * images * chunks * length * 2 * 2 * d
        assert [list(t.shape) for t in grads] == [[groups, images * chunks, d, 4 * d],
                                                  [groups, images * chunks, 4 * d, d],
                                                  [groups, images * chunks, d]]
        assert live.peak == _nbytes(*grads) + scratch + cast

        states = MemoryWeights(*(t[:, None, None].expand(groups, images, chunks, *t.shape[1:])
                                 for t in w))
        queries = keys.flatten(2, 3)[:, :, :chunks * length - 3]  # a partial last chunk
        with LiveTensorBytes() as live:
            out = chunk_read_triton(states, queries, length, torch.float16)
        assert live.peak == _nbytes(out) + cast
        with LiveTensorBytes() as live:
            out = read_triton(w, keys[:, 0, 0], torch.float16)
        assert live.peak == _nbytes(out) + cast
        with LiveTensorBytes() as live:  # float32 operands: nothing to cast
            out = read_triton(w, keys[:, 0, 0], torch.float32)
        assert live.peak == _nbytes(out)


def test_kernels_check_their_inputs():
    w, keys, values, token_lr = _write_inputs(1, 2, 8, 16, 1.0, seed=0)
    got = chunk_grads_triton
    with pytest.raises(ValueError, match='values has size 7'):
        got(w, keys, values[:, :, :7], token_lr)
    with pytest.raises(ValueError, match='weights.w2'):
        got(w._replace(w2=w.w2[:, :32]), keys, values, token_lr)
    with pytest.raises(TypeError, match='float32 tensors; keys is torch.float64'):
        got(w, keys.double(), values, token_lr)
    with pytest.raises(ValueError, match='operand_dtype'):
        got(w, keys, values, token_lr, torch.float64)
    with pytest.raises(ValueError, match='power of two'):
        read_triton(w, keys[:, 0], block_rows=24)
    with pytest.raises(ValueError, match='both base and carry'):
        read_triton(w, keys[:, 0], base=w)
    states = w.map(lambda t: t[None, :, None])  # (H=1, B=1, C=1, ...)
    with pytest.raises(ValueError, match='need 2 chunk states'):
        chunk_read_triton(states, torch.randn(1, 1, 9, 16), 8)
    assert 'range' in kernels.unavailable_reason('cpu', head_dim=512)
    assert not kernels.kernels_available('cpu', head_dim=512)


def test_tile_span_check_bounds_the_rows_not_the_outer_dims():
    """Outer dims are addressed by int64 base offsets: a batch of 128 images at
    stage 1 (a group stride of 48M elements) must pass; a chunk whose rows
    alone span 2**31 elements must not. Meta tensors: no memory is allocated."""
    check_span = kernel_ops.check_span

    def meta(shape, strides):
        return torch.empty_strided(shape, strides, device='meta')

    keys = meta((2, 1920, 196, 128), (48168960, 25088, 128, 1))
    check_span('keys', 196, keys)
    check_span('token_lr', 196, meta((2, 1920, 196), (376320, 196, 1)), row_dim=-1)
    check_span('x', 4096, meta((1, 128, 50176, 128), (2**33, 6422528, 128, 1)))
    with pytest.raises(ValueError, match='x: a chunk of 4096 rows .* spans more than 2\\*\\*31'):
        check_span('x', 4096, meta((1, 2, 4096, 8), (2**32, 2**30, 2**19, 1)))
    with pytest.raises(ValueError, match='token_lr'):
        check_span('token_lr', 196, meta((1, 2, 196), (2**40, 2**32, 2**24)), row_dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize('d', [80, 128, 160])
def test_triton_kernels_on_cuda_at_model_widths(d):
    """The compiled kernels at M1..M4 widths, L = 196, every operand dtype,
    the chunk gradients in both layouts."""
    torch.manual_seed(d)
    w, keys, values, token_lr = _write_inputs(2, 3, 196, d, 1.0, seed=d)
    exact_grads = chunk_grads_torch(w.map(torch.Tensor.double), keys.double(), values.double(),
                               token_lr.double())
    x = torch.randn(2, 300, d)
    exact_read = read_torch(w.map(torch.Tensor.double), x.double())
    cuda = torch.device('cuda')
    w_cuda = w.map(lambda t: t.to(cuda))
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    with torch.no_grad():
        for (dtype, tol), (layout, chosen) in itertools.product(tolerances.items(), LAYOUTS):
            with chosen():  # one program per chunk: its own stores read back past a barrier
                grads = chunk_grads_triton(
                    w_cuda, keys.to(cuda), values.to(cuda), token_lr.to(cuda), dtype)
            for a, b in zip(grads, exact_grads):
                assert _rel_err(a.cpu(), b) < tol, (dtype, layout, a.shape)
            read = read_triton(w_cuda, x.to(cuda), dtype)
            assert _rel_err(read.cpu(), exact_read) < tol, dtype
        decomposed = _decomposed_results(torch.Generator().manual_seed(d), 'cuda',
                                         (('f32', torch.float32), ('bf16', torch.bfloat16)))
    assert decomposed['decomposed_f32']['exact'] < F32_TOL
    assert decomposed['decomposed_read_chunks_f32']['exact'] < F32_TOL
    bf16 = decomposed['decomposed_bf16']
    assert bf16['update'] < 2e-2 < bf16['naive_update']


@pytest.mark.gpu(count=2)
def test_the_kernels_launch_on_the_memorys_gpu_not_the_current_one():
    """A memory on cuda:1 while cuda:0 is current (``init_detector(...,
    device='cuda:1')``): Triton launches on the current device unless the
    operators make the tensors' one current."""
    import copy
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    memory = NeuralMemory(128, chunk_size=196, implementation='triton').eval()
    x = torch.randn(2, 784, 128)
    reference = copy.deepcopy(memory).double()
    reference.implementation = 'torch'
    torch.cuda.set_device(0)
    with torch.no_grad():
        out = memory.to('cuda:1')(x.to('cuda:1'))
        want = reference(x.double())
    assert out.device == torch.device('cuda:1')
    assert _rel_err(out.cpu(), want) < F32_TOL


def _case(results: dict, case: str, tag: str) -> dict:
    return results[case.format(tag) if '{}' in case else f'{case}_{tag}']


@pytest.mark.parametrize('case', CASES)
def test_backward_kernels_float32_match_float64(backward_runs, case):
    result = _case(backward_runs, case, 'f32')
    assert result.get('forward', 0.0) < F32_TOL  # the projections' forward: test_memory_kernels
    assert worst(result['grads'].values()) < F32_TOL, result['grads']


@pytest.mark.parametrize('case', CASES)
def test_backward_kernels_float16_operands(backward_runs, case):
    result = _case(backward_runs, case, 'f16')
    assert worst(result['grads'].values()) < F16_TOL, result['grads']
    # the reads' residual and LayerNorm backward stay float32: x's gradient
    # and g's are far more accurate than the products' operands
    for name in ('x', 'queries', 'g'):
        if name in result['grads'] and case in ('read', 'chunk_read'):
            assert result['grads'][name] < 1e-3, (name, result['grads'])


@pytest.mark.parametrize('tag', DTYPES)
def test_split_cases_hold_each_row_in_two_column_blocks(backward_runs, tag):
    """The ``_split`` cases' 40 columns ran as 32 + 16 in every kernel
    (the tests above bound their errors), and nowhere else."""
    def launched(case):
        return {tuple(x) for x in backward_runs[case]['launched']}

    two_passes = launched(f'chunk_grads_{tag}_d40_L24_split')
    assert two_passes == {(f'{k}_kernel', 16) for k in (
        'grads_rows', 'grads_cols', 'grads_backward_rows', 'grads_backward_cols')}
    assert launched(f'chunk_grads_one_program_{tag}_d40_L24_split') == {
        ('grads_chunk_kernel', 16), ('grads_backward_chunk_kernel', 16)}
    reads = {('read_kernel', 16), ('read_backward_rows_kernel', 16),
             ('read_backward_cols_kernel', 16)}
    assert launched(f'read_rows32_{tag}') == launched(f'read_decomposed_split_{tag}') == reads
    assert launched(f'chunk_read_one_program_split_{tag}') == {
        ('read_kernel', 16), ('read_backward_chunk_kernel', 16)}
    for case in ('chunk_read_one_program', 'chunk_read_one_program_decomposed',
                 'chunk_read_one_program_tail'):
        assert launched(f'{case}_{tag}') == {('read_kernel', 0),
                                            ('read_backward_chunk_kernel', 0)}, case
    assert launched('read_decomposed_tanh') == reads
    assert all(be == 0 for _, be in launched(f'chunk_grads_{tag}_d24_L24_blocks16'))


@pytest.mark.parametrize('case', ['chunk_grads_one_program_tanh', 'read_tanh',
                                  'read_decomposed_tanh'])
def test_backward_kernels_take_the_tanh_form_of_gelu(backward_runs, case):
    """Against float64 autograd through the PyTorch ops with the tanh form."""
    result = backward_runs[case]
    assert result['forward'] < F32_TOL
    assert worst(result['grads'].values()) < F32_TOL, result['grads']


@pytest.mark.parametrize('case', ['module_f32', 'module_f16_decomposed', 'module_f32_recompute',
                                  'module_f32_tanh', 'module_f16_states',
                                  'module_f16_states_decomposed'])
def test_memory_trains_with_the_triton_kernels(backward_runs, case):
    """Against the PyTorch path; ``module_f16_states`` lets float16 train on
    16-bit states and chunk gradients, as bfloat16 does: its output within
    float16's tolerance, as in inference (the chunk gradients rounded before
    the scan sums them)."""
    result = backward_runs[case]
    states = case.startswith('module_f16_states')
    if states:  # w1's and w2's 16-bit, g's float32
        assert result['scan_states'] == result['scan_grads'] == ['torch.float16',
                                                                 'torch.float32']
    assert result['plans'] == ['triton', 'torch']
    f32 = case.startswith('module_f32')
    assert result['forward'] < (F32_TOL if f32 else F16_TOL if states else 1e-3)
    assert len(result['grads']) > 15
    assert worst(result['grads'].values()) < (1e-4 if f32 else F16_TOL), result['grads']


def _saved_numel(fn, *inputs) -> int:
    """The elements autograd saves for ``fn(*inputs)``'s backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*inputs)
    torch.autograd.backward(out, [torch.ones_like(t) for t in out])
    return sum(t.numel() for t in saved)


def test_the_kernels_save_only_their_inputs():
    """FlashAttention's way: no (tokens, 4d) intermediate is kept for the
    backward, which recomputes them. On meta tensors the operators run their
    fakes; M3's stage-1 shapes at batch 2 (16 chunks of 196 tokens each)."""
    heads, batch, chunks, length, d = 1, 2, 16, 196, 128
    meta = dict(device='meta')

    def leaves(*shapes):
        return [torch.empty(*shape, **meta).requires_grad_() for shape in shapes]

    states = leaves(*((heads, batch, chunks, *shape) for shape in ((d, 4 * d), (4 * d, d), (d, ))))
    queries = leaves((batch, chunks * length, heads * d))[0]
    read = _saved_numel(lambda *t: [chunk_read_triton(
        MemoryWeights(*t[:3]), t[3].view(batch, -1, heads, d).permute(2, 0, 1, 3), length,
        torch.bfloat16)], *states, queries)
    assert 0 < read <= sum(t.numel() for t in states + [queries])
    rows = (heads, batch, chunks, length)
    write = leaves((heads, d, 4 * d), (heads, 4 * d, d), (heads, d), (*rows, d), (*rows, d), rows)
    grads = _saved_numel(lambda *t: chunk_grads_triton(MemoryWeights(*t[:3]), *t[3:],
                                                       torch.bfloat16), *write)
    assert 0 < grads <= sum(t.numel() for t in write)
    assert [t.grad.shape for t in write] == [t.shape for t in write]
    # the projections: x, weight-sized tensors (the fold's products save their
    # factors) and the pool's (B, U, d) statistics: no other (B, N, .) tensor
    x = leaves((batch, chunks * length, d))[0]
    params = leaves(*projection_shapes(d, heads))
    saved = _saved_numel(lambda x, *p: list(project_triton(
        x, ProjectionWeights(*p), chunks, length, 1.0, torch.bfloat16)), x, *params)
    folded = (4 * d + heads) * d + d + heads + 2 * heads * d
    assert 0 < saved <= x.numel() + 2 * folded + 3 * batch * chunks * d + d


@pytest.mark.gpu
@pytest.mark.parametrize('d', [80, 128, 160])
def test_backward_kernels_on_cuda_at_model_widths(d):
    """The compiled backward kernels at M1..M4 widths, L = 196, every operand
    dtype (bfloat16 only here: the interpreter cannot), against float64; the
    chunk gradients and the chunk read's backward also as one program per
    chunk, whose programs read back their own stores past a barrier."""
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    w, keys, values, token_lr = _write_inputs(2, 3, 196, d, 1.0, seed=d)
    for dtype, tol in tolerances.items():
        for layout in (contextlib.nullcontext, _one_program_per_chunk):
            with layout():
                result = _chunk_grads_case([*w, keys, values, token_lr], dtype, {},
                                           device='cuda')
                read = _chunk_read_case(torch.Generator().manual_seed(d), dtype, False,
                                        sizes=(1, 2, 3, 196, 500, d), device='cuda')
            assert worst(result['grads'].values()) < tol, (dtype, layout, result['grads'])
            assert worst(read['grads'].values()) < tol, (dtype, layout, read['grads'])


@pytest.mark.gpu
@pytest.mark.parametrize('max_lr', [1.0, 1e-3])
def test_a_memory_trains_on_cuda_with_the_kernels_in_bfloat16(max_lr):
    """M3's memory width under bf16 autocast: ``implementation='triton'`` against
    the PyTorch path, every gradient within bfloat16's tolerance; at ``max_lr``
    1e-3 a decomposed read (its whole states and the projections' exact
    queries in ``tf32x3``)."""
    import copy
    torch.manual_seed(0)
    ref = NeuralMemory(128, chunk_size=196, max_lr=max_lr, implementation='torch').cuda().train()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = copy.deepcopy(ref)
    fused.implementation = 'triton'
    x = torch.randn(4, 784, 128, device='cuda')
    grads = []
    for memory in (fused, ref):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            plan = memory.plan(x)
            assert plan.implementation == memory.implementation
            assert plan.decomposed_read == (max_lr < 1)
            memory(x).float().square().mean().backward()
        grads.append({n: p.grad.double().cpu() for n, p in memory.named_parameters()
                      if p.grad is not None and n != 'pool.to_logits.bias'})
    for name, want in grads[1].items():
        assert _rel_err(grads[0][name], want) < BF16_TOL, name


def test_the_package_loads_no_kernels_until_first_use():
    """Each op's kernels (``memory_ops.<op>.kernels``) and their shared device
    functions load on first use, never with the package: a TRITON_INTERPRET
    set before that use still decides how they run."""
    script = ('import json, sys\n'
              'import torch\n'
              'from convneur_mm.models.layers import NeuralMemory\n'
              'memory = NeuralMemory(16, chunk_size=8).eval()\n'
              'with torch.no_grad():\n'
              '    memory(torch.randn(1, 20, 16))\n'
              "ops = 'convneur_mm.models.layers.memory_ops.'\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith(ops) and\n"
              "                        m.rsplit('.', 1)[-1] in ('kernels', 'triton_common')\n"
              "                        and m != ops + 'kernels')))\n")
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_load_kernels_names_the_ops_it_knows():
    from convneur_mm.models.layers.memory_ops.kernels.availability import KERNEL_OPS, load_kernels
    assert KERNEL_OPS == ('read', 'chunk_grads', 'project', 'scan', 'gates')
    with pytest.raises(ValueError, match="op must be one of .*'chunk_read'"):
        load_kernels('chunk_read')  # the chunk read launches the read's kernels
