"""The projections (norms, projections, pool and gates folded into one product):
their closed form, their Triton kernels and their column blocks."""
from typing import List, Optional

import pytest
import torch

from convneur_mm.models.layers.memory_ops import kernels
from convneur_mm.models.layers.memory_ops.kernels import tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.project import (Projected, ProjectionWeights, project,
                                                          project_closed_form, project_torch,
                                                          projection_shapes)
from convneur_mm.testing.errors import worst

from .memory_cases import (BF16_TOL, DTYPES, EXACT_QUERY_CASES, F16_TOL, F32_TOL,
                           PROJECTION_BACKWARD_CASES, PROJECTION_BACKWARD_SPLITS,
                           PROJECTION_CASES, PROJECTION_OUTPUT_BLOCKS, PROJECTION_SPLITS,
                           _project_case, _projection_blocks, _rel_err, _run_interpreted)


@pytest.mark.parametrize('case', list(PROJECTION_CASES))
def test_triton_projections_match_the_layers_in_float64(forward_runs, case):
    """One kernel for the RMSNorm, every projection, the per-head norms, the
    step sizes and the chunk summaries, against each layer in turn."""
    for tag, tol in (('f32', F32_TOL), ('f16', F16_TOL)):
        result = forward_runs[f'project_{tag}_{case}']
        assert result['shapes'] == result['want']
        assert result['exact'] < tol, (tag, result)
        if case in PROJECTION_SPLITS:  # the split cases held their rows in two blocks
            assert result['tiles'] == [list(PROJECTION_SPLITS[case])], result
        else:
            assert all(be == bhe == 0 for _, be, _, bhe in result['tiles']), result


@pytest.mark.parametrize('case', EXACT_QUERY_CASES)
def test_triton_projections_with_exact_queries(forward_runs, case):
    """float16 operands but float32 queries (a decomposed read's): the
    queries at float32's accuracy, in steps of 16 features (32 where a row
    is split), where float16 operands round them 100 times further; the
    others at float16's."""
    result = forward_runs[f'project_exact_queries_{case}']
    assert result['queries'] < F32_TOL, result
    assert result['others'] < F16_TOL, result
    assert forward_runs[f'project_f16_{case}']['queries'] > 100 * result['queries']
    assert result['query_steps'] == [32 if case.endswith('split') else 16], result


def test_exact_queries_take_their_own_rows_and_feature_steps(monkeypatch):
    """``EXACT_QUERY_TILES``: 16-feature steps at C_m 128's 32 rows, and
    32 in 16-row tiles at M4's split 160 (the others' whole rows and
    32-feature steps kept); a forced BM comes first, a tuned entry (timed
    without them) does not apply."""
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles

    def tiles(d, exact=True, arch=None, **force):
        with kernel_tiles.forced_tiles('project', **force):
            config = projection_tiles(d, 1, 1024, None, None, torch.bfloat16,
                                      arch=arch, exact_queries=exact)
        return config['BM'], config['BK'], config['QBK']

    assert tiles(128) == (32, 128, 16) and tiles(128, False) == (32, 128, 128)
    assert tiles(160) == (16, 32, 32) and tiles(160, False) == (32, 32, 32)
    assert tiles(128, BM=16) == (16, 128, 16)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (
        TunedTile('project', 90, 'bfloat16', 128, False, 64, 16, 8, 2), ))
    assert tiles(128, False, 90)[0] == 64 and tiles(128, True, 90)[0] == 32


def test_exact_queries_leave_the_backward_kernel_as_it_was(backward_runs):
    """Its products stay in the operand dtype: the same gradients bit for
    bit, from queries that differ."""
    result = backward_runs['project_exact_queries_backward']
    assert result['grads_apart'] == 0 and result['queries_apart'] > 1e-5, result


def test_the_projection_kernels_serve_kernels_triton():
    """implementation='triton' projects with its kernel up to width 256 in
    inference and in training up to 128 and at M4's 160 (its backward's
    widths), and scans with
    its kernel in inference and training; 'auto' (untimed) and wider
    memories project in PyTorch, and a hook on a layer calls the layers."""
    from convneur_mm.models.layers import NeuralMemory
    x = torch.empty(2, 20, 16, device='meta')

    def projections(memory, x=x, grad=False):
        with torch.set_grad_enabled(grad), kernels.without_launches():
            return memory.plan(x).projections

    memory = NeuralMemory(16, chunk_size=8, implementation='triton').to('meta')
    assert projections(memory) == 'triton'
    assert projections(memory, grad=True) == 'triton'
    m4 = NeuralMemory(160, chunk_size=8, implementation='triton').to('meta')
    x160 = torch.empty(2, 20, 160, device='meta')
    assert projections(m4, x160) == 'triton'
    assert projections(m4, x160, grad=True) == 'triton'
    for d in (144, 192):
        wider = NeuralMemory(d, chunk_size=8, implementation='triton').to('meta')
        x_wider = torch.empty(2, 20, d, device='meta')
        assert (projections(wider, x_wider), projections(wider, x_wider, grad=True)) == (
            'triton', 'torch')
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).scan == 'triton'
    with kernels.without_launches():  # training: the scan kernel has a backward
        assert memory.plan(x).scan == 'triton'
    memory.implementation = 'auto'
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).scan == 'torch'  # untimed: 'auto' scans by products
    assert projections(memory) == 'torch'
    wide = NeuralMemory(512, heads=2, chunk_size=8, implementation='triton').to('meta')
    assert projections(wide, torch.empty(2, 20, 512, device='meta')) == 'torch'
    memory.implementation = 'triton'
    memory.to_values.register_forward_hook(lambda *args: None)
    assert projections(memory) == 'layers'


@pytest.mark.gpu
@pytest.mark.parametrize('d,heads', [(80, 1), (128, 1), (128, 4), (160, 1)])
def test_triton_projections_on_cuda(d, heads):
    """The compiled projection kernel at M1, M3 and M4 widths, 3136 tokens in
    chunks of 196, every operand dtype, against each layer in float64."""
    from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, project_naive,
                                                              project_triton, projection_shapes)
    gen = torch.Generator().manual_seed(d)
    weights = ProjectionWeights(*(torch.randn(*shape, generator=gen) * 0.5
                                  for shape in projection_shapes(d, heads)))
    x = torch.randn(2, 3136, d, generator=gen)
    ref = project_naive(x.double(), ProjectionWeights(*(t.double() for t in weights)), 15, 196,
                        1.0)
    on_cuda = ProjectionWeights(*(t.cuda() for t in weights))
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    with torch.no_grad():
        for dtype, tol in tolerances.items():
            got = project_triton(x.cuda(), on_cuda, 15, 196, 1.0, dtype)
            for name, a, b in zip(got._fields, got, ref):
                assert _rel_err(a.cpu(), b) < tol, (dtype, name)


@pytest.mark.slow
def test_projections_at_m4s_width_in_the_interpreter():
    """M4's 160 columns through the projection kernels at their default
    tiles, every gradient against float64 (about 25 s)."""
    results = _run_interpreted('m4_projection_results')
    for tag, tol, forward_split in (('f32', F32_TOL, 0), ('f16', F16_TOL, 32)):
        result = results[tag]
        assert worst(result['grads'].values()) < tol, (tag, result['grads'])
        assert result['launched'] == [['project_backward_kernel', 32, 32],
                                      ['project_kernel', forward_split, forward_split]]


@pytest.mark.parametrize('tag', DTYPES)
def test_projection_backward_gives_every_parameter_a_gradient(backward_runs, tag):
    """Every parameter is checked where it has a gradient (writes: all, and
    the queries' too without), and the logits' bias, whose gradient is
    zero, gets rounding noise only."""
    for name in PROJECTION_BACKWARD_CASES:
        result = backward_runs[f'project_{tag}_{name}']
        assert len(result['grads']) == (4 if name == 'no_writes' else 11), result['grads']
        assert result['logits_bias'] < (1e-5 if tag == 'f32' else 1e-2)
        blocks = list(PROJECTION_BACKWARD_SPLITS.get(name, (0, 0)))  # both kernels split alike
        assert result['launched'] == [[kernel, *blocks] for kernel in (
            'project_backward_kernel', 'project_kernel')], result['launched']


@pytest.mark.parametrize('rows', ['', '_rows16'])
@pytest.mark.parametrize('tag', DTYPES)
def test_projections_split_a_chunks_rows_over_programs(backward_runs, tag, rows):
    """Where an image's chunks are too few programs, each chunk's rows go to
    several: 6 (image, chunk) pairs of 40 rows in 3 groups of 16 rows (the
    float16 forward's 32-row blocks in 2), each group pooling its own rows,
    merged by their log-sum-exps; the backward's groups are independent.
    Forward and backward against float64."""
    result = backward_runs[f'project_groups_{tag}{rows}']
    forward_groups = 2 if tag == 'f16' and not rows else 3
    # the groups' pooled rows merged by one launch per (image, written chunk)
    assert result['launched'] == [['project_kernel', 6 * forward_groups],
                                  ['pool_merge_kernel', 2 * 2],
                                  ['project_backward_kernel', 6 * 3]]
    assert len(result['grads']) == 11
    assert worst(result['grads'].values()) < (1e-5 if tag == 'f32' else F16_TOL), result
    assert result['logits_bias'] < (1e-5 if tag == 'f32' else 1e-2)
    # the merged summaries among the results
    assert set(result['outputs']) == {'queries', 'keys', 'values', 'token_lr', 'summary'}
    assert worst(result['outputs'].values()) < (1e-5 if tag == 'f32' else F16_TOL), result


def test_projection_row_groups_keep_the_gpu_busy():
    from convneur_mm.models.layers.memory_ops.project.triton import projection_row_groups
    # COCO at 2 images (17 chunks of 4096 rows, 256 blocks of 16) on 132 multiprocessors
    assert projection_row_groups(34, 256, 132) == (16, 16)
    assert projection_row_groups(2048, 7, 132) == (1, 7)  # ImageNet's batch of 128
    assert projection_row_groups(1, 3, 132) == (3, 1)  # never an empty group
    assert projection_row_groups(3, 5, 1) == (2, 3)  # 3 + 2 row blocks


@pytest.mark.parametrize('tag', DTYPES)
def test_projection_backward_runs_in_blocks_of_output_features(backward_runs, tag):
    """By default the backward's products take 32 output features at a
    time (a 16- or 20-column row: one block of its width); each case also
    ran forced to whole rows and to blocks of 16, split as by default (the
    float64 tests bound every run's errors)."""
    from convneur_mm.models.layers.memory_ops.project.triton import (
        PROJECTION_BACKWARD_OUTPUT_BLOCK)
    assert PROJECTION_BACKWARD_OUTPUT_BLOCK == 32
    for name, case in PROJECTION_BACKWARD_CASES.items():
        width = kernel_tiles.block_width(case[2])
        assert backward_runs[f'project_{tag}_{name}']['output_blocks'] == [min(32, width)]
        for block in PROJECTION_OUTPUT_BLOCKS:
            result = backward_runs[f'project_{tag}_{name}_BO{block}']
            assert result['output_blocks'] == [block], (name, result)
            assert result['launched'] == backward_runs[f'project_{tag}_{name}']['launched']


@pytest.mark.gpu
@pytest.mark.parametrize('forced', [{}, dict(BO=0), dict(BO=64, num_stages=3)],
                         ids=['default', 'whole_rows', 'BO64_stages3'])
@pytest.mark.parametrize('d,heads', [(80, 1), (128, 1), (128, 4), (160, 1)])
def test_projection_backward_on_cuda_at_model_widths(d, heads, forced):
    """The compiled projection backward at M1's, M3's and M4's widths (M4's
    160 as 128 + 32), 3136 tokens in chunks of 196, every operand dtype,
    against float64 layer by layer: in blocks of output features (the
    default, whose pool terms cross threads through memory and barriers),
    in whole rows (BO 0), and in blocks of 64 pipelined over three stages,
    which the tuner may choose."""
    tolerances = {torch.float32: F32_TOL, torch.float16: F16_TOL, torch.bfloat16: BF16_TOL}
    for dtype, tol in tolerances.items():
        with kernel_tiles.forced_tiles('project_backward', **forced):
            result = _project_case(torch.Generator().manual_seed(d), dtype, 2, 3136, d, heads,
                                   196, 15, None, device='cuda')
        assert worst(result['grads'].values()) < tol, (dtype, result['grads'])


def test_the_projection_backward_serves_up_to_128_columns_and_m4s_160():
    """Its rows of at most ``MAX_PROJECTION_BACKWARD_BLOCK`` (128) columns, the
    boundary included, and the split widths (M4's 160); no width beside them."""
    from convneur_mm.models.layers.memory_ops.project import projection_backward_serves
    from convneur_mm.models.layers.memory_ops.project.triton import (
        MAX_PROJECTION_BACKWARD_BLOCK, PROJECTION_BACKWARD_SPLIT_WIDTHS)
    assert (MAX_PROJECTION_BACKWARD_BLOCK, PROJECTION_BACKWARD_SPLIT_WIDTHS) == (128, (160, ))
    served = {d: projection_backward_serves(d) for d in (16, 127, 128, 129, 144, 159, 160, 161)}
    assert served == {16: True, 127: True, 128: True, 129: False, 144: False, 159: False,
                      160: True, 161: False}
def test_m4_projections_split_by_default_where_the_table_says():
    """160 columns with 16-bit operands as 128 + 32 (a head of 160 too,
    heads of 32 in one block) at ``PROJECTION_SPLIT``'s rows and feature
    steps; float32 operands, M3's and M2's widths in one block; the
    backward splits every row wider than 128, which it cannot hold in one
    block; ``forced_tiles('project', split=...)`` decides instead."""
    from convneur_mm.models.layers.memory_ops.project.triton import PROJECTION_SPLIT
    assert _projection_blocks(tiles=True) == (128, 32, 128, 32, *PROJECTION_SPLIT[(128, 32)])
    assert _projection_blocks(heads=5) == (128, 32, 32, 0)
    assert _projection_blocks(features=16, tiles=True)[-1] == 16  # a caller's steps first
    assert _projection_blocks(dtype=torch.float32, tiles=True) == (256, 0, 256, 0, 16, 32)
    # the backward: whole rows of at most 128 columns per block, so wider ones split
    assert _projection_blocks(backward=True, tiles=True) == (128, 32, 128, 32, 16, 128)
    assert _projection_blocks(d=128, backward=True) == (128, 0, 128, 0)
    assert _projection_blocks(d=96, backward=True) == (128, 0, 128, 0)
    with kernel_tiles.forced_tiles('project_backward', split=1):
        assert _projection_blocks(d=96, backward=True) == (64, 32, 64, 32)
    with kernel_tiles.forced_tiles('project_backward', split=0), \
            pytest.raises(ValueError, match='at most 128 columns per block'):
        _projection_blocks(backward=True)
    with pytest.raises(ValueError, match='at most 128 columns per block'):
        _projection_blocks(d=200, backward=True)  # one block of 256
    assert _projection_blocks(d=128, tiles=True) == (128, 0, 128, 0, 32, 128)
    assert _projection_blocks(d=96) == (128, 0, 128, 0)
    with kernel_tiles.forced_tiles('project', split=0):
        assert _projection_blocks(tiles=True) == (256, 0, 256, 0, 16, 32)
    with kernel_tiles.forced_tiles('project', split=1):
        assert _projection_blocks(d=96, tiles=True) == (64, 32, 64, 32, 32, 64)
        assert _projection_blocks(d=128) == (128, 0, 128, 0)  # nothing to split
        assert _projection_blocks(dtype=torch.float32)[:2] == (128, 32)
    with pytest.raises(ValueError, match='split must be 0 or 1'):
        with kernel_tiles.forced_tiles('project', split=2):
            pass


@pytest.mark.parametrize('kernel', ['project', 'project_backward'])
def test_forced_tiles_set_the_projections_rows_warps_and_stages(kernel):
    """As for the other kernels (how ``aot --force`` compiles a variant): the
    rows, warps and stages of the innermost ``forced_tiles``, a caller's
    rows first, no more rows than a chunk has; hidden units and persistent
    programs, which the projections have none of, are refused."""
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles
    backward = kernel == 'project_backward'

    def launch(rows=196, block_rows=None):
        config = projection_tiles(160, 1, rows, block_rows, None, torch.bfloat16, backward)
        return config['BM'], config['num_warps'], config['num_stages'], config['BE']

    default = launch()
    assert default == ((16, 8, 1, 32) if backward else (32, 8, 2, 32))
    with kernel_tiles.forced_tiles(kernel, BM=64, num_warps=4, num_stages=3):
        assert launch() == (64, 4, 3, 32)
        assert launch(block_rows=16)[0] == 16 and launch(rows=20)[0] == 32
        with kernel_tiles.forced_tiles(kernel, num_warps=2):  # the innermost alone
            assert launch() == (default[0], 2, default[2], 32)
    with kernel_tiles.forced_tiles(kernel, split=1), kernel_tiles.forced_tiles(kernel, BM=64):
        assert launch()[0] == 64  # nothing of the outer block, as for the other kernels
    other = 'project' if backward else 'project_backward'
    with kernel_tiles.forced_tiles(other, BM=64, num_warps=4, num_stages=3):
        assert launch() == default
    for option in ('BH', 'programs_per_sm') + (() if backward else ('BO', )):
        with pytest.raises(ValueError, match=f"forced_tiles of '{kernel}' takes"):
            with kernel_tiles.forced_tiles(kernel, **{option: 16}):
                pass


def test_the_projections_backward_takes_its_output_block_from_forced_and_tuned_tiles(
        monkeypatch):
    """BO, the backward's output features per product: 32 by default, no
    more than the row's padded width; ``forced_tiles`` and a tuned entry set
    it (0: whole rows); anything but 0 or a power of two >= 16 is refused."""
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles

    def block(d=160, arch=None):
        return projection_tiles(d, 1, 196, None, None, torch.bfloat16, True, arch)['BO']

    assert (block(), block(128), block(20), block(16)) == (32, 32, 32, 16)
    assert 'BO' not in projection_tiles(160, 1, 196, None, None, torch.bfloat16)
    with kernel_tiles.forced_tiles('project_backward', BO=0):
        assert block() == 0
    with kernel_tiles.forced_tiles('project_backward', BO=64):
        assert (block(), block(20)) == (64, 32)
    for bad in (8, 48, None, True, 32.0):
        with pytest.raises(ValueError, match='BO must be'):
            with kernel_tiles.forced_tiles('project_backward', BO=bad):
                pass
    entry = TunedTile('project_backward', 90, 'bfloat16', 256, False, 16, 16, 8, 1, BO=0)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (entry, ))
    assert entry.options() == dict(BM=16, num_warps=8, num_stages=1, BO=0)
    assert (block(arch=90), block(arch=80)) == (0, 32)
    assert 'BO' not in entry._replace(BO=None).options()  # the default decides
    kernel_tiles.check_tuned_tiles((entry, ))
    for bad, message in ((entry._replace(BO=24), 'BO must be a power of two'),
                         (entry._replace(kernel='project'), "the projections' backward's")):
        with pytest.raises(ValueError, match=message):
            kernel_tiles.check_tuned_tiles((bad, ))


def test_a_tuned_entry_sets_the_projections_launch_on_its_gpu_only(monkeypatch):
    """A ``TUNED_TILES`` entry of a projection kernel sets its rows, warps,
    stages and split for its GPU and operand dtype; ``forced_tiles`` comes
    first; the table refuses what the projections cannot launch."""
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles
    entry = TunedTile('project_backward', 90, 'bfloat16', 256, False, 32, 16, 4, 2, split=1)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (entry, ))

    def launch(arch, dtype=torch.bfloat16):
        config = projection_tiles(160, 1, 196, None, None, dtype, True, arch)
        return config['BM'], config['num_warps'], config['num_stages']

    assert entry.options() == dict(BM=32, num_warps=4, num_stages=2, split=1)
    assert launch(90) == (32, 4, 2)
    assert launch(80) == launch(None) == launch(90, torch.float16) == (16, 8, 1)
    with kernel_tiles.forced_tiles('project_backward', num_warps=8):
        assert launch(90) == (32, 8, 2)
    kernel_tiles.check_tuned_tiles((entry, ))
    for bad, message in ((entry._replace(split=0), 'in two blocks only'),
                         (entry._replace(programs_per_sm=2), 'no decomposed or persistent'),
                         (entry._replace(decomposed=True), 'no decomposed or persistent'),
                         (entry._replace(kernel='projection'), 'kernel must be one of')):
        with pytest.raises(ValueError, match=message):
            kernel_tiles.check_tuned_tiles((bad, ))


# (batch, tokens, width, heads, written chunks, chunk): rows past the written
# chunks, every row written, one chunk, one head
SHAPES = [(2, 10, 8, 2, 2, 4), (2, 12, 8, 2, 3, 4), (3, 9, 16, 1, 1, 9), (1, 7, 12, 3, 2, 3)]


def _inputs(b: int, n: int, d: int, heads: int, dtype=torch.float64,
            seed: int = 0) -> List[torch.Tensor]:
    """x, then the ``ProjectionWeights`` in order, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, n, d, generator=gen)] + [
        torch.randn(*size, generator=gen) * 0.5 for size in projection_shapes(d, heads)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def _project(fn, u: int, L: int, mm: Optional[torch.dtype] = None, max_lr: float = 0.7):
    return lambda x, *w: tuple(fn(x, ProjectionWeights(*w), u, L, max_lr, mm))


def _projected_and_grads(fn, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    outputs = fn(*inputs)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return list(outputs) + list(torch.autograd.grad(outputs, inputs, cotangents))


def _projection_errors(ours: List[torch.Tensor], reference: List[torch.Tensor]) -> List[float]:
    """Each tensor's error relative to its norm, or to 1 below it: the pool's
    logits bias has a zero gradient (a softmax does not see a shift), which
    both compute as rounding noise."""
    return [((a - b).norm() / max(b.norm(), 1.0)).item() for a, b in zip(ours, reference)]


@pytest.mark.parametrize('shape', SHAPES)
def test_projections_pass_gradcheck(shape):
    b, n, d, heads, u, L = shape
    assert torch.autograd.gradcheck(_project(project_closed_form, u, L),
                                    _inputs(b, n, d, heads), fast_mode=True)


@pytest.mark.parametrize('output', range(5))
def test_gradcheck_with_one_output_alone(output):
    """Every other output unused: its cotangent comes as None."""
    fn = _project(project_closed_form, 2, 4)
    assert torch.autograd.gradcheck(lambda *t: fn(*t)[output], _inputs(2, 10, 8, 2),
                                    fast_mode=True)


def test_gradcheck_of_a_subset_of_inputs():
    inputs = _inputs(2, 10, 8, 2)
    for t in inputs[::2]:
        t.requires_grad_(False)
    assert torch.autograd.gradcheck(_project(project_closed_form, 2, 4), inputs,
                                    fast_mode=True)


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('shape', SHAPES)
def test_projections_match_autograd_of_the_pytorch_ops(shape, dtype, tol):
    b, n, d, heads, u, L = shape
    inputs = _inputs(b, n, d, heads, dtype)
    ours = _projected_and_grads(_project(project_closed_form, u, L), inputs)
    reference = _projected_and_grads(_project(project_torch, u, L), inputs)
    assert worst(_projection_errors(ours, reference)) < tol


@pytest.mark.parametrize('mm', [None, torch.bfloat16])
def test_a_permuted_map_projects_as_a_contiguous_one(mm):
    """x as a global branch whose projections are not plain layers (a hook on
    them) hands it over: (B, C, H, W) viewed as (B, N, C), rows not contiguous."""
    b, n, d, heads, u, L = SHAPES[0]
    inputs = _inputs(b, n, d, heads)
    permuted = inputs[0].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not permuted.is_contiguous()
    ours = _projected_and_grads(_project(project_closed_form, u, L, mm), [permuted] + inputs[1:])
    reference = _projected_and_grads(_project(project_closed_form, u, L, mm), inputs)
    assert worst(_projection_errors(ours, reference)) == 0


def test_bfloat16_operands_round_as_the_pytorch_ops():
    """The same products with the same operands: the two agree far closer
    (measured <= 8e-6) than either does with float32 operands (>= 1e-3)."""
    inputs = _inputs(3, 12, 16, 1, torch.float32)
    ours = _projected_and_grads(_project(project_closed_form, 3, 4, torch.bfloat16), inputs)
    reference = _projected_and_grads(_project(project_torch, 3, 4, torch.bfloat16), inputs)
    exact = _projected_and_grads(_project(project_torch, 3, 4), inputs)
    assert worst(_projection_errors(ours, reference)) < 1e-4
    assert worst(_projection_errors(ours, exact)) > 1e-3


def _traced(fn):
    """``fn`` traced by torch.compile (its compile-time branches taken) and
    run by AOTAutograd's eager backend: no kernel compiler, float64 exact."""
    torch._dynamo.reset()
    return torch.compile(fn, backend='aot_eager', fullgraph=True)


# the second shape is a `slow` case: one more compilation of the same graph
@pytest.mark.parametrize('shape', [SHAPES[0], pytest.param(SHAPES[1], marks=pytest.mark.slow)])
def test_under_torch_compile_the_gradient_is_joined_from_its_column_groups(shape):
    """Traced, the product's gradient is a cat of its column groups, not
    writes into slices of one buffer: the same gradients, with every output
    used and with each one alone (the others' groups zeros)."""
    b, n, d, heads, u, L = shape
    inputs = _inputs(b, n, d, heads)
    fn = _project(project_closed_form, u, L)
    for output in (None, *range(5)):
        pick = fn if output is None else (lambda *t, i=output: fn(*t)[i:i + 1])
        ours = _projected_and_grads(_traced(pick), inputs)
        reference = _projected_and_grads(pick, inputs)
        assert worst(_projection_errors(ours, reference)) < 1e-12, output


@pytest.mark.parametrize('fn', [project_torch, project_closed_form])
@pytest.mark.parametrize('shape', SHAPES[:2] + [(2, 6, 8, 2, 0, 8)])
def test_exact_queries_keep_only_the_queries_at_full_precision(fn, shape):
    """A decomposed read's projections: the queries as with full-precision
    operands, every other output as with the 16-bit ones (float64 inputs:
    ``product`` rounds the operands as a GPU does)."""
    b, n, d, heads, u, L = shape
    inputs = _inputs(b, n, d, heads)
    exact = _project(fn, u, L)(*inputs)
    rounded = _project(fn, u, L, torch.bfloat16)(*inputs)
    mixed = tuple(fn(inputs[0], ProjectionWeights(*inputs[1:]), u, L, 0.7, torch.bfloat16,
                     exact_queries=True))
    torch.testing.assert_close(mixed[0], exact[0], rtol=0, atol=1e-12)
    assert (mixed[0] - rounded[0]).abs().max() > 1e-3  # bf16 rounding is what they avoid
    for name, got, want in zip(Projected._fields[1:], mixed[1:], rounded[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


def test_exact_queries_train_as_the_pytorch_ops():
    """The closed form's backward keeps 16-bit products (the gradients'
    accuracy of 16-bit training): within bf16's rounding of autograd through
    project_torch's two products (float32 queries), and no closer to it
    than the plain bf16 projections' gradients are."""
    inputs = _inputs(*SHAPES[1][:4], torch.float32)
    u, L = SHAPES[1][4:]

    def grads(fn, exact_queries):
        return _projected_and_grads(lambda x, *w: tuple(fn(
            x, ProjectionWeights(*w), u, L, 0.7, torch.bfloat16,
            exact_queries=exact_queries)), inputs)

    ours, reference = grads(project_closed_form, True), grads(project_torch, True)
    assert worst(_projection_errors(ours[:5], reference[:5])) < 1e-6
    assert worst(_projection_errors(ours[5:], reference[5:])) < 2e-2
    plain = grads(project_closed_form, False)
    assert _projection_errors(ours[:1], plain[:1])[0] > 1e-3  # the queries differ


def test_without_writes_it_is_the_pytorch_ops():
    inputs = _inputs(2, 6, 8, 2)
    ours = _project(project_closed_form, 0, 8)(*inputs)
    reference = _project(project_torch, 0, 8)(*inputs)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_dispatcher_trains_through_it_when_asked():
    x, *w = _inputs(2, 10, 8, 2)

    def keys_grad_fn(backward: str) -> str:
        keys = project(x, ProjectionWeights(*w), 2, 4, 0.7, backward=backward).keys
        return keys.grad_fn.next_functions[0][0].name()

    assert '_Project' in keys_grad_fn('closed_form')
    assert '_Project' not in keys_grad_fn('autograd')


def test_create_graph_gets_a_clear_error():
    inputs = _inputs(2, 10, 8, 2)
    loss = sum(o.pow(2).sum() for o in _project(project_closed_form, 2, 4)(*inputs))
    with pytest.raises(RuntimeError, match='first order only'):
        torch.autograd.grad(loss, inputs, create_graph=True)


def test_bad_inputs_get_clear_errors():
    x, *w = _inputs(2, 10, 8, 2)
    with pytest.raises(ValueError, match='x must be'):
        project_closed_form(x[0], ProjectionWeights(*w), 2, 4, 0.7)
    with pytest.raises(ValueError, match='need that many'):
        project_closed_form(x, ProjectionWeights(*w), 3, 4, 0.7)


def _projection_weights(d: int, heads: int, gen: torch.Generator, dtype=torch.float64):
    from convneur_mm.models.layers.memory_ops.project import ProjectionWeights, projection_shapes
    return ProjectionWeights(*(torch.randn(*s, generator=gen, dtype=dtype) * 0.5
                               for s in projection_shapes(d, heads)))


@pytest.mark.parametrize('tokens,chunk,heads,updates', [(20, 8, 2, 2), (24, 8, 1, 2),
                                                        (6, 8, 1, 0), (17, 4, 4, 4)])
def test_folded_projections_match_the_layers(tokens, chunk, heads, updates):
    """One product with the norms' weights folded in, against each norm and
    layer applied in turn (float64), and differentiable in every parameter."""
    from convneur_mm.models.layers.memory_ops.project import project, project_naive
    gen = torch.Generator().manual_seed(tokens)
    weights = _projection_weights(16, heads, gen)
    x = torch.randn(2, tokens, 16, generator=gen, dtype=torch.float64)
    got = project(x, weights, updates, chunk, 0.5)
    ref = project_naive(x, weights, updates, chunk, 0.5)
    for name, a, b in zip(got._fields, got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    if updates:
        leaves = [t.clone().requires_grad_() for t in weights]
        assert torch.autograd.gradcheck(
            lambda *w: project(x[:1, :updates * chunk], type(weights)(*w), updates, chunk, 0.5),
            leaves)


def test_projections_refuse_bad_arguments():
    from convneur_mm.models.layers.memory_ops.project import project, project_triton
    gen = torch.Generator().manual_seed(0)
    weights = _projection_weights(16, 2, gen)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match='written chunks'):
        project(x, weights, 3, 8, 1.0)  # 24 written tokens of 20
    with pytest.raises(ValueError, match=r'weights.keys must be \(16, 16\)'):
        project(x, weights._replace(keys=weights.keys[:8]), 2, 8, 1.0)
    with pytest.raises(ValueError, match='implementations'):
        project(x, weights, 2, 8, 1.0, implementation='cuda')
    for fn in (project, project_torch, project_closed_form, project_triton):
        with pytest.raises(TypeError, match='positional'):  # exact_queries by name only
            fn(x, weights, 2, 8, 1.0, torch.bfloat16, 16)
    with pytest.raises(TypeError, match='float32'):
        project_triton(x, weights, 2, 8, 1.0)
    wide = _projection_weights(320, 2, gen, torch.float32)
    with pytest.raises(ValueError, match='widths up to 256'):
        project_triton(torch.randn(1, 20, 320), wide, 1, 8, 1.0)
    with pytest.raises(ValueError, match='block_features must be a power of two'):
        project_triton(x.float(), type(weights)(*(t.float() for t in weights)), 2, 8, 1.0,
                       block_features=24)
    for d in (144, 192):  # past 128, only M4's 160 compiled with bounded spills
        wider = _projection_weights(d, 1, gen, torch.float32)
        with pytest.raises(ValueError, match=r'differentiates widths up to 128 and \(160,\)'):
            project_triton(torch.randn(1, 20, d, requires_grad=True), wider, 1, 8, 1.0)


def test_triton_projections_allocate_their_results_only():
    """What the kernel's wrapper allocates in inference (meta tensors,
    launches skipped): its results, the pool's log-sum-exp and the
    summaries' pooled rows, the folded weight written in 16 bits (no
    float32 fold beside it), the bias and gains; no copy of x (a strided
    view) and no (B, N, 4d + H) product."""
    from convneur_mm.models.layers.memory_ops import kernels
    from convneur_mm.models.layers.memory_ops.project import project_triton
    from convneur_mm.testing.dispatch_probes import LiveTensorBytes
    b, n, d, heads, chunk, updates = 4, 3136, 128, 1, 196, 15
    weights = _projection_weights(d, heads, torch.Generator().manual_seed(0), torch.float32)
    weights = type(weights)(*(t.to('meta') for t in weights))
    x = torch.empty(b, d, n, device='meta').transpose(1, 2)
    tokens = updates * chunk
    folded = (4 * d + heads) * d * 2 + (d + heads) * 4 + 2 * d * 4
    results = 4 * (b * n * d + 2 * b * tokens * d + b * tokens * heads + 3 * b * updates * d)
    with torch.no_grad(), kernels.without_launches(), LiveTensorBytes() as live:
        out = project_triton(x, weights, updates, chunk, 1.0, torch.bfloat16)
    assert [list(t.shape) for t in out] == [[heads, b, n, d], [heads, b, tokens, d],
                                           [heads, b, tokens, d], [heads, b, tokens],
                                           [b, updates, d]]
    assert live.peak <= results + folded, (live.peak, results, folded)
    assert live.peak >= results


@pytest.mark.parametrize('d', [16, 40, 160])
@pytest.mark.parametrize('tag', ['f32', 'f16'])
def test_the_fold_kernel_gives_folds_results_bit_for_bit(forward_runs, tag, d):
    """Inference's fold in one launch: the weight in the dtype asked for, as
    ``fold`` and a cast give it, the bias and gains float32, bit for bit."""
    result = forward_runs[f'fold_{tag}_d{d}']
    assert result['dtypes'] == [str(torch.float16 if tag == 'f16' else torch.float32),
                                str(torch.float32), str(torch.float32)]
    assert result['equal'] == [True, True, True]


def test_the_fold_kernel_refuses_bad_arguments():
    from convneur_mm.models.layers.memory_ops.project.triton import fold_triton
    weights = ProjectionWeights(*(torch.zeros(shape, requires_grad=True)
                                  for shape in projection_shapes(16, 1)))
    with pytest.raises(ValueError, match='fold_triton has no backward: differentiate fold'):
        fold_triton(weights)
    weights = ProjectionWeights(*(t.detach() for t in weights))
    with pytest.raises(ValueError, match=r'weights.values must be \(16, 16\)'):
        fold_triton(weights._replace(values=torch.zeros(16, 8)))
    with pytest.raises(TypeError, match='weights.logits_bias is torch.float16'):
        fold_triton(weights._replace(logits_bias=weights.logits_bias.half()))


def test_the_projections_give_the_same_results_with_either_fold(forward_runs):
    """In inference the fold kernel's weight, with autograd PyTorch's fold
    and its cast: the projection kernel's results bit for bit, float16
    operands with and without exact queries."""
    assert forward_runs['fold_either_way'] == {'f16': True, 'f16_exact_queries': True}


@pytest.mark.gpu
@pytest.mark.parametrize('d,heads', [(128, 1), (160, 4)])
def test_the_fold_kernel_on_cuda(d, heads):
    """The compiled fold at M3's and M4's widths, in every operand dtype,
    the keys and the store norm as strided views: ``fold`` and its cast,
    bit for bit."""
    from convneur_mm.models.layers.memory_ops.project import fold, fold_triton
    gen = torch.Generator().manual_seed(d)
    weights = ProjectionWeights(*(torch.randn(*shape, generator=gen).cuda()
                                  for shape in projection_shapes(d, heads)))
    weights = weights._replace(keys=weights.keys.t().contiguous().t(),
                               store_norm=weights.store_norm.repeat(2)[::2])
    want = fold(weights)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = fold_triton(weights, dtype)
        assert torch.equal(got.weight, want.weight.to(dtype)), dtype
        assert torch.equal(got.bias, want.bias) and torch.equal(got.gamma, want.gamma)
