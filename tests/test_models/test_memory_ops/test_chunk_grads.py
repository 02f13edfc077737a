"""The chunk gradients (every chunk's write gradient): their Triton kernels,
closed-form backward and precision."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops import (chunk_grads_closed_form, chunk_grads_naive,
                                                  chunk_grads_torch)
from convneur_mm.models.layers.memory_ops.chunk_grads import chunk_grads
from convneur_mm.testing.errors import worst

from .memory_cases import (F16_EMULATED_TOL, F16_TOL, F32_TOL, GRADS_BF16_AGREEMENT, LAYOUTS,
                           _check_bfloat16, _gradcheck, _op_weights, _outputs_and_grads,
                           _relative_errors, _write, _write_inputs64)


# L 24 in 16-row blocks: over each image's rows, blocks meeting two chunks;
# L 8: a block per chunk (16 rows, the least, are more than a chunk)
GRAD_CASES = ['d24_L24_blocks16', 'd16_L8_default_blocks', 'd20_L24_small_lr',
              'd16_L40_blocks32', 'per_image_rows']


@pytest.mark.parametrize('layout', [name for name, _ in LAYOUTS])
@pytest.mark.parametrize('case', GRAD_CASES)
def test_triton_grads_float32_match_float64(forward_runs, case, layout):
    assert forward_runs[f'grads{layout}_f32_{case}']['exact'] < F32_TOL


def test_one_program_per_chunk_ran_in_its_cases(forward_runs):
    for case in GRAD_CASES[:4]:
        assert forward_runs[f'grads_f16_{case}']['kernels'] == ['grads_rows_kernel',
                                                               'grads_cols_kernel']
        assert forward_runs[f'grads_one_program_f16_{case}']['kernels'] == ['grads_chunk_kernel']


@pytest.mark.parametrize('layout', [name for name, _ in LAYOUTS])
@pytest.mark.parametrize('case', GRAD_CASES)
def test_triton_grads_float16_operands(forward_runs, case, layout):
    errors = forward_runs[f'grads{layout}_f16_{case}']
    assert errors['emulated'] < F16_EMULATED_TOL
    assert errors['exact'] < F16_TOL


@pytest.mark.parametrize('tag, dtype', [('f32', 'torch.float32'), ('f16', 'torch.float16')])
def test_staged_chunk_grads_equal_the_operators(forward_runs, tag, dtype):
    """Inference's two calls (``chunk_grads_triton_staged``) give the
    operator's gradients exactly, w1's and w2's in ``grads_dtype``."""
    run = forward_runs[f'grads_staged_{tag}']
    assert run == dict(equal=[True] * 3, dtypes=[dtype, dtype, 'torch.float32'])


def test_the_rows_pass_walks_each_images_rows():
    """Blocks over each image's U L rows where a block meets at most two
    chunks: M3's stage 1 takes 46 blocks of 64 rows per image (2944 rows for
    2940), where a block per chunk takes 60 (3840); a block wider than a
    chunk, or an image whose rows pass the int32 tile offsets, goes per chunk."""
    from convneur_mm.models.layers.memory_ops.chunk_grads.triton import _row_blocks
    meta = dict(device='meta')
    proj = torch.empty(128, 15 * 196, 1, 257, **meta).permute(2, 0, 1, 3).unflatten(2, (15, 196))
    keys, values, token_lr = proj[..., :128], proj[..., 128:256], proj[..., 256]
    rows = _row_blocks(keys, values, token_lr, 64)
    assert rows == (True, 46, 128 * 46, 5)
    assert _row_blocks(keys, values, token_lr, 256) == (False, 1, 128 * 15, 1)
    wide = torch.empty(1, 15, 196, 128, **meta).as_strided((1, 15, 196, 128),
                                                           (0, 2**28, 128, 1))
    flat_lr = torch.empty(1, 15, 196, **meta)
    assert not _row_blocks(wide, wide, flat_lr, 64).flat


def test_triton_grads_read_per_image_chunk_views_without_a_copy(forward_runs):
    result = forward_runs['grads_per_image_views']
    assert result['difference'] == 0
    assert result['shapes'] == [[2, 6, 16, 64], [2, 6, 64, 16], [2, 6, 16]]


def test_one_program_per_chunk_runs_in_place_of_both_passes(backward_runs):
    launched = backward_runs['chunk_grads_one_program_f32_d16_L40_blocks32']['launched']
    assert launched == [['grads_backward_chunk_kernel', 0], ['grads_chunk_kernel', 0]]


def test_chunk_grads_backward_sums_chunks_in_one_program(backward_runs):
    """The columns pass sums several chunks' shares of the weights'
    gradients per program: 3 chunks at 2 per program as 2 + 1 (the last
    block short), the shares' blocks summed to float64's gradients."""
    result = backward_runs['chunk_grads_cols_chunks2']
    hidden_blocks = 96 // 16  # d 24: 96 hidden units in blocks of 16
    assert result['launched'] == [[2 * 2 * hidden_blocks, 2, 2, 2]]  # two groups
    assert max(result['grads'].values()) < F32_TOL, result['grads']


def test_backward_columns_take_chunks_per_program_by_the_gpus_programs():
    from convneur_mm.models.layers.memory_ops.chunk_grads.triton import backward_cols_chunks
    # M3's stage 1 at batch 128 (1920 chunks, 16 hidden blocks) on 132 multiprocessors
    assert backward_cols_chunks(1920 * 16, 1920, 132) == 16
    assert backward_cols_chunks(384 * 16, 384, 132) == 11  # its stage 2
    assert backward_cols_chunks(16 * 16, 16, 132) == 1  # batch 1: a program per chunk
    assert backward_cols_chunks(12 * 2, 3, 1) == 3  # never past a group's chunks


@pytest.mark.parametrize('layout', ['', '_one_program'])
def test_chunk_grads_train_with_16_bit_gradients(backward_runs, layout):
    """w1's and w2's gradients in float16 (bfloat16 training's, which the
    interpreter lacks), their cotangents too: within float16's tolerance of
    float64, both passes and one program per chunk."""
    result = backward_runs[f'chunk_grads{layout}_f16_grads']
    assert result['dtypes'] == ['torch.float16', 'torch.float16', 'torch.float32']
    assert result['forward'] < F16_TOL
    assert max(result['grads'].values()) < F16_TOL, result['grads']


def test_chunk_grads_backward_gives_the_inputs_shapes(backward_runs):
    # per-image views (G, B, U, L, d) get gradients of their own shape
    assert backward_runs['chunk_grads_per_image_f32']['shapes'] == [
        [2, 3, 2, 8, 16], [2, 3, 2, 8, 16], [2, 3, 2, 8]]


@pytest.mark.parametrize('shape', [(1, 1, 1, 2), (2, 3, 4, 4), (1, 2, 5, 3), (3, 1, 2, 8)])
def test_chunk_grads_pass_gradcheck(shape):
    assert _gradcheck(_write(chunk_grads_closed_form), _write_inputs64(*shape))


@pytest.mark.parametrize('output', [0, 1, 2])
def test_chunk_grads_pass_gradcheck_with_an_output_alone(output):
    # the other outputs' gradients reach the backward as None
    write = _write(chunk_grads_closed_form)
    assert _gradcheck(lambda *t: write(*t)[output], _write_inputs64(2, 2, 3, 4))


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('shape', [(1, 4, 16, 8), (2, 3, 7, 16)])
def test_chunk_grads_match_autograd_of_the_pytorch_ops(shape, dtype, tol):
    inputs = _write_inputs64(*shape, dtype=dtype)
    ours = _outputs_and_grads(_write(chunk_grads_closed_form), inputs)
    reference = _outputs_and_grads(_write(chunk_grads_torch), inputs)
    assert worst(_relative_errors(ours, reference)) < tol


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chunk_grads_with_bfloat16_operands_round_as_the_pytorch_ops(dtype):
    _check_bfloat16(_write, chunk_grads_closed_form, chunk_grads_torch,
                    _write_inputs64(2, 3, 16, 16, dtype=dtype), GRADS_BF16_AGREEMENT)


def test_closed_form_grads_match_autograd_per_chunk():
    gen = torch.Generator().manual_seed(0)
    groups, chunks, length, d = 2, 3, 5, 6
    w = _op_weights(groups, d, gen)
    keys = torch.randn(groups, chunks, length, d, generator=gen).double()
    values = torch.randn(groups, chunks, length, d, generator=gen).double()
    lr = torch.rand(groups, chunks, length, generator=gen).double()
    fast = chunk_grads_torch(w, keys, values, lr)
    for got, want in zip(fast, chunk_grads_naive(w, keys, values, lr)):
        torch.testing.assert_close(got, want)
    # (G, B, U, L, d): U chunks per image, the same gradients as (G, B * U, L, d)
    per_image = chunk_grads(w, keys.unflatten(1, (1, chunks)), values.unflatten(1, (1, chunks)),
                            lr.unflatten(1, (1, chunks)), implementation='torch')
    for got, want in zip(per_image, fast):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk_grads has the implementations .* got 'cuda'"):
        chunk_grads(w, keys, values, lr, implementation='cuda')


@pytest.mark.torch_pinned
def test_pytorch_layer_norm_still_has_wrong_third_derivatives():
    """Why the write's gradient refuses a second differentiation on every path
    (``chunk_grads.pytorch.output_rows``): ATen differentiates its LayerNorm
    backward a second time as if the statistics were constants
    (pytorch/pytorch#175754). Where this fails, a torch has fixed it and the
    guard can go."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def layer_norm_grad(inputs):
        (g, ) = torch.autograd.grad(torch.nn.functional.layer_norm(inputs, (6, )).pow(3).sum(),
                                    inputs, create_graph=True)
        return g

    assert torch.autograd.gradcheck(layer_norm_grad, (x, ))  # second derivatives: exact
    assert not torch.autograd.gradgradcheck(layer_norm_grad, (x, ), raise_exception=False)


def test_the_write_refuses_a_second_differentiation():
    inputs = _write_inputs64(1, 2, 3, 4)
    write = _write(chunk_grads_torch)
    first = torch.autograd.grad(sum(o.square().sum() for o in write(*inputs)), inputs)
    assert [f.shape for f in first] == [i.shape for i in inputs]  # first order: as before
    with pytest.raises(RuntimeError, match='write has a backward of first order only'):
        torch.autograd.grad(sum(o.square().sum() for o in write(*inputs)), inputs,
                            create_graph=True)
