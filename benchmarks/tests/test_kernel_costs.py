"""The memory kernels' roofline costs (``benchmarks.kernels.profile.kernel_costs``): FLOPs over the
rows each launch serves, each tensor's bytes once per kernel, whatever the
tiles; launches recorded on meta tensors (the GPU code path's arguments,
nothing runs) or observed around a real call."""

import pytest
import torch

from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
from benchmarks.kernels import profile as costs
from convneur_mm.models.layers.memory_ops.kernels import launcher, tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.memory_ops.read.triton import launch_read_backward

D, L, BATCH, TOKENS = 32, 40, 2, 3 * 40 + 5  # three written chunks, a partial fourth
PER_ROW = 2 * D * 4 * D  # one product's FLOPs per row


@pytest.fixture(autouse=True)
def _compiled_triton():
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')


def _memory_costs(dtype: str = 'bfloat16', launched: list = None, **tiles):
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(D, chunk_size=L, implementation='triton', operand_dtype=dtype).eval()
    with torch.no_grad(), launcher.recording_launches(90) as launches:
        for kernel, options in tiles.items():
            kernel_tiles._forced.append((kernel, options))
        try:
            memory.to('meta')(torch.empty(BATCH, TOKENS, D, device='meta'))
        finally:
            del kernel_tiles._forced[len(kernel_tiles._forced) - len(tiles):]
    if launched is not None:
        launched += launches
    return costs.kernel_costs(launches)


def test_inference_kernels_cost_their_products_over_the_rows_they_serve():
    got = _memory_costs()
    written, read = BATCH * 3 * L, BATCH * TOKENS
    assert got['grads_rows_kernel'].flops == 2 * PER_ROW * written
    assert got['grads_cols_kernel'].flops == 4 * PER_ROW * written
    assert got['read_kernel'].flops == 2 * PER_ROW * read  # the partial chunk's rows only
    for name in ('grads_rows_kernel', 'grads_cols_kernel', 'read_kernel', 'project_kernel'):
        assert got[name].half_flops == got[name].flops > 0, name
        assert got[name].bytes > 0
    assert got['scan_kernel'].flops == 0 and got['scan_kernel'].bytes > 0
    float32 = _memory_costs('float32')
    assert float32['read_kernel'].flops == got['read_kernel'].flops
    assert float32['read_kernel'].half_flops == 0


def test_one_program_per_chunk_costs_both_passes_products_and_fewer_bytes():
    """The chunk gradients as one program per chunk: the rows and columns
    passes' six products per written row; its scratch (Dh, 16-bit keys)
    counted once where the two passes count it in each, and one d_g per
    chunk in place of per-block shares."""
    two = _memory_costs()
    one = _memory_costs(grads_chunk={})
    assert 'grads_rows_kernel' not in one and 'grads_cols_kernel' not in one
    merged = one['grads_chunk_kernel']
    assert merged.flops == merged.half_flops == (two['grads_rows_kernel'].flops +
                                                 two['grads_cols_kernel'].flops)
    assert merged.bytes < two['grads_rows_kernel'].bytes + two['grads_cols_kernel'].bytes


def test_a_chunk_read_costs_the_tokens_it_has_whatever_its_states():
    from convneur_mm.models.layers.memory_ops import chunk_read_triton
    meta = lambda *shape: torch.empty(shape, device='meta')  # noqa: E731
    states = MemoryWeights(meta(1, 2, 5, D, 4 * D), meta(1, 2, 5, 4 * D, D), meta(1, 2, 5, D))
    with torch.no_grad(), launcher.recording_launches(90) as launches:
        chunk_read_triton(states, meta(1, 2, 2 * L + 5, D), L, torch.bfloat16)  # 5 states, 3 used
    assert costs.kernel_costs(launches)['read_kernel'].flops == 2 * PER_ROW * 2 * (2 * L + 5)


def test_costs_do_not_depend_on_the_tiles_but_for_per_block_shares():
    """A chunk's 40 rows as a 32-row block and a 16-row tail (two launches
    of one kernel) or as 16-row blocks (one launch, persistent programs): the
    same rows, the same tensors. Only the rows pass's per-block shares of d_g
    grow with its blocks."""
    launched = []
    # and persistent programs: fewer programs, each serving several tiles
    small = _memory_costs(read=dict(BM=16, programs_per_sm=2), grads_rows=dict(BM=16),
                          grads_cols=dict(BH=64, programs_per_sm=2))
    large = _memory_costs(launched=launched, read=dict(BM=32), grads_rows=dict(BM=32),
                          grads_cols=dict(BH=16))
    assert sum(costs.kernel_name(l) == 'read_kernel' for l in launched) == 2
    assert {k: v.flops for k, v in small.items()} == {k: v.flops for k, v in large.items()}
    assert small['read_kernel'] == large['read_kernel']
    assert small['grads_cols_kernel'] == large['grads_cols_kernel']
    assert small['grads_rows_kernel'].bytes > large['grads_rows_kernel'].bytes


def test_each_tensor_counts_once_and_a_broadcast_dim_once():
    w = torch.empty(4, D, 4 * D, device='meta')
    assert costs._distinct_bytes(w) == w.numel() * 4
    assert costs._distinct_bytes(w[:1].expand(4, D, 4 * D)) == w.numel()  # one head's, once
    keys = torch.empty(1, 3, L, D, device='meta')
    weights = MemoryWeights(torch.empty(1, D, 4 * D, device='meta'),
                            torch.empty(1, 4 * D, D, device='meta'),
                            torch.empty(1, D, device='meta'))
    with torch.no_grad(), launcher.recording_launches(90) as launches:
        chunk_grads_triton(weights, keys, keys, keys[..., 0], torch.float32)
    # keys and values are one tensor here: read once
    rows = launches[0]
    expected = sum(costs._distinct_bytes(t) for t in
                   {id(t): t for t in rows.args if isinstance(t, torch.Tensor)}.values())
    assert costs.kernel_costs(launches[:1])['grads_rows_kernel'].bytes == expected
    assert expected < sum(costs._distinct_bytes(t) for t in rows.args
                          if isinstance(t, torch.Tensor))


def _backward_costs(decomposed: bool = False):
    from convneur_mm.models.layers.memory_ops.chunk_grads import triton as grads_triton
    meta = lambda *shape: torch.empty(shape, device='meta')  # noqa: E731
    weights = [meta(1, D, 4 * D), meta(1, 4 * D, D), meta(1, D)]
    keys = meta(1, 6, L, D)
    states = MemoryWeights(meta(1, 2, 4, D, 4 * D), meta(1, 2, 4, 4 * D, D), meta(1, 2, 4, D))
    x = meta(1, 2, TOKENS, D)
    base = MemoryWeights(meta(1, D, 4 * D), meta(1, 4 * D, D), None) if decomposed else None
    with torch.no_grad(), launcher.recording_launches(90) as launches:
        if not decomposed:
            grads_triton._chunk_grads_backward(*weights, keys, keys, keys[..., 0],
                                               *(torch.empty_like(w) for w in weights[:2]),
                                               meta(1, 6, D), torch.bfloat16, None, None)
        launch_read_backward(states, x, x, torch.empty_like(x), L, torch.bfloat16, base,
                             meta(1, 2, 4) if decomposed else None, None, None)
    return costs.kernel_costs(launches)


def test_backward_kernels_cost_the_products_their_code_runs():
    got = _backward_costs()
    written, read = 6 * L, 2 * TOKENS
    assert got['grads_backward_rows_kernel'].flops == 14 * PER_ROW * written
    assert got['grads_backward_cols_kernel'].flops == 8 * PER_ROW * written
    assert got['read_backward_rows_kernel'].flops == 5 * PER_ROW * read
    assert got['read_backward_cols_kernel'].flops == 4 * PER_ROW * read
    assert all(cost.half_flops == cost.flops for cost in got.values())


def test_one_program_per_chunk_backward_costs_both_passes_products_and_fewer_bytes():
    two = _backward_costs()
    with kernel_tiles.forced_tiles('grads_backward_chunk'):
        one = _backward_costs()
    merged = one['grads_backward_chunk_kernel']
    assert 'grads_backward_rows_kernel' not in one and 'grads_backward_cols_kernel' not in one
    assert merged.flops == merged.half_flops == 22 * PER_ROW * 6 * L
    assert merged.bytes < (two['grads_backward_rows_kernel'].bytes +
                           two['grads_backward_cols_kernel'].bytes)


@pytest.mark.parametrize('decomposed', [False, True])
def test_the_reads_backward_as_one_program_costs_both_passes_and_fewer_bytes(decomposed):
    two = _backward_costs(decomposed)
    with kernel_tiles.forced_tiles('read_backward_chunk'):
        one = _backward_costs(decomposed)
    merged = one['read_backward_chunk_kernel']
    assert 'read_backward_rows_kernel' not in one and 'read_backward_cols_kernel' not in one
    replaced = ('read_backward_rows_kernel', 'read_backward_cols_kernel')
    assert merged.flops == sum(two[k].flops for k in replaced)
    assert merged.half_flops == sum(two[k].half_flops for k in replaced)
    assert merged.bytes < sum(two[k].bytes for k in replaced)


def test_the_decomposed_reads_base_products_count_as_six_16_bit_ones():
    """Each product with the whole state a_t W_0 + dW in float32 replaces a
    16-bit one."""
    plain, decomposed = _backward_costs(), _backward_costs(decomposed=True)
    for name in ('read_backward_rows_kernel', 'read_backward_cols_kernel'):
        base = costs.BASE_PRODUCTS[name] * PER_ROW * 2 * TOKENS
        assert decomposed[name].flops == plain[name].flops + 5 * base
        assert decomposed[name].half_flops == plain[name].half_flops + 5 * base
        # all at the 16-bit rate: a roofline's compute time is never negative
        assert decomposed[name].half_flops == decomposed[name].flops


# whole rows; blocks of output features, the head in one column block; and in two
# (40 columns as 32 + 16), whose products the backward computes twice
@pytest.mark.parametrize('output_block,d,split', [(0, D, 0), (16, D, 0), (16, 40, 1)])
def test_the_projections_backward_recomputes_every_product_but_the_values(output_block, d,
                                                                           split):
    from convneur_mm.models.layers.memory_ops.project import triton as project_triton
    meta = lambda *shape: torch.empty(shape, device='meta')  # noqa: E731
    images, heads, written = 2, 1, 3 * L
    x, weight = meta(images, TOKENS, d), meta(4 * d + heads, d)
    gamma, bias = meta(2 * heads, d), meta(d + heads)
    with torch.no_grad(), launcher.recording_launches(90) as launches, \
            kernel_tiles.forced_tiles('project', split=split), \
            kernel_tiles.forced_tiles('project_backward', BO=output_block, split=split):
        pooled, lse = project_triton._project(x, weight, bias, gamma, 3, L, 1.0,
                                              torch.bfloat16, False, None, None)[4:]
        project_triton._project_backward(
            x, weight, bias, gamma, pooled, lse, meta(heads, images, TOKENS, d),
            meta(heads, images, written, d), meta(heads, images, written, d),
            meta(heads, images, written), meta(images, 3, d), 3, L, 1.0, torch.bfloat16, None)
    got = costs.kernel_costs(launches)
    # forward: every row's queries, the written rows' keys, values, logits, step sizes
    forward = 2 * d * images * (TOKENS * d + written * (3 * d + heads))
    assert got['project_kernel'].flops == forward
    # backward: those products again but the values', and the gradient times the weight;
    # a head in two column blocks, in blocks of output features: the queries' and keys'
    # a third time
    heads_again = 2 * d * images * (TOKENS * d + written * d) if output_block and split else 0
    assert got['project_backward_kernel'].flops == (
        forward - 2 * d * images * written * d + forward + heads_again)


def test_observed_launches_run_and_are_recorded(monkeypatch):
    ran = []

    class FakeKernel:
        __name__ = 'read_kernel'

        def __getitem__(self, grid):
            return lambda *args, **kwargs: ran.append((grid, args, kwargs))

    class FakeModule:
        read_kernel = FakeKernel()

    monkeypatch.setattr(launcher, 'load_kernels', lambda op: (FakeModule(), None, True))
    with launcher.observing_launches() as launches:
        kernels, _ = launcher.launch_config('read', torch.float16, torch.device('cpu'))
        kernels.read_kernel[(3, )](1, 2, BM=16)
    assert ran == [((3, ), (1, 2), dict(BM=16))]
    assert [(l.grid, l.args, l.kwargs) for l in launches] == [((3, ), (1, 2), dict(BM=16))]
    kernels, _ = launcher.launch_config('read', torch.float16, torch.device('cpu'))
    assert kernels is FakeModule or isinstance(kernels, FakeModule)  # none observing: as is


def test_exact_queries_count_at_the_decomposed_reads_base_rate():
    """float32 queries beside bf16 others (tf32x3 on sm_90): every row's
    queries count six 16-bit products, the rest as before."""
    from convneur_mm.models.layers.memory_ops.project import triton as project_triton
    meta = lambda *shape: torch.empty(shape, device='meta')  # noqa: E731
    images = 2
    x, weight, gamma, bias = meta(images, TOKENS, D), meta(4 * D + 1, D), meta(2, D), meta(D + 1)
    got = {}
    for exact in (False, True):
        with torch.no_grad(), launcher.recording_launches(90) as launches:
            project_triton._project(x, weight, bias, gamma, 3, L, 1.0, torch.bfloat16, exact,
                                    None, None)
        got[exact] = costs.kernel_costs(launches)['project_kernel']
    queries = 2 * D * images * TOKENS * D
    assert got[True].flops == got[False].flops + 5 * queries
    assert got[True].half_flops == got[True].flops
    assert got[False].half_flops == got[False].flops
    # a GPU without TF32: the queries' products in IEEE float32, off the 16-bit rate
    with torch.no_grad(), launcher.recording_launches(75) as launches:
        project_triton._project(x, weight, bias, gamma, 3, L, 1.0, torch.bfloat16, True,
                                None, None)
    ieee = costs.kernel_costs(launches)['project_kernel']
    assert ieee.flops == got[False].flops and ieee.half_flops == ieee.flops - queries
