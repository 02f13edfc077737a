"""The kernels' tile policy (``kernels.tiles``): defaults, tuned and forced
tiles, column blocks and persistent programs."""

import pytest
import torch

from convneur_mm.models.layers.memory_ops import dispatch
from convneur_mm.models.layers.memory_ops.kernels import launcher, tiles as kernel_tiles, tuned
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.memory_ops.kernels.tiles import check_tuned_tiles
from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile
from convneur_mm.testing.errors import worst

from .memory_cases import BF16, _TWO_PASSES, _projection_blocks, _run_interpreted, _write_inputs


def _entry(**changes) -> TunedTile:
    fields = dict(kernel='grads_cols', arch=90, operand_dtype='bfloat16', block_d=128,
                  decomposed=False, BM=128, BH=64, num_warps=8, num_stages=3)
    fields.update(changes)
    return TunedTile(**fields)


def test_the_shipped_tables_are_valid():
    check_tuned_tiles(tuned.TUNED_TILES)
    dispatch.check_measured_paths(tuned.MEASURED_PATHS)
    entry = tuned.MEASURED_PATHS[0]
    with pytest.raises(ValueError, match='two measured paths'):
        dispatch.check_measured_paths([entry, entry._replace(triton_ms=1.0)])
    with pytest.raises(ValueError, match='must be positive'):
        dispatch.check_measured_paths([entry._replace(torch_ms=0.0)])
    with pytest.raises(ValueError, match='operand_dtype must be one of'):
        dispatch.check_measured_paths([entry._replace(operand_dtype='bf16')])


def test_a_tuned_entry_applies_to_its_kernel_gpu_dtype_and_width_only(monkeypatch):
    default = kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(), ))
    chosen = kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
    assert chosen == dict(default, BM=128, BH=64, num_warps=8, num_stages=3)
    # another kernel, GPU, dtype, width or read kind; the interpreter (no arch)
    assert kernel_tiles.tile_config('grads_rows', 128, 196, None, None, BF16, arch=90) != chosen
    for other in (dict(kernel='grads_backward_cols'), dict(arch=80),
                  dict(operand_dtype=torch.float16), dict(d=80 * 2 + 1)):
        args = dict(kernel='grads_cols', d=128, operand_dtype=BF16, arch=90)
        args.update({k: v for k, v in other.items()})
        config = kernel_tiles.tile_config(args['kernel'], args['d'], 196, None, None,
                                    args['operand_dtype'], arch=args['arch'])
        assert (config['BM'], config['num_stages']) != (128, 3), other
    assert kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16)['num_stages'] == 2
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='read', decomposed=True), ))
    assert kernel_tiles.tile_config('read', 128, 196, None, None, BF16, arch=90)['BM'] == 64
    assert kernel_tiles.tile_config('read', 128, 196, None, None, BF16, True, arch=90)['BM'] == 128


def test_the_reads_backward_rows_stay_within_their_limit_on_sm_90(monkeypatch):
    """64-row tiles of the read's backward rows pass computed wrong query
    gradients or faulted on an H200: with 16-bit operands on sm_90 its
    defaults and a tuned entry take 32 rows; a forced run may take more (to
    reproduce it), and float32 operands, sm_80 and other kernels keep theirs."""
    def rows(kernel='read_backward_rows', dtype=BF16, arch=90):
        return kernel_tiles.tile_config(kernel, 128, 196, None, None, dtype, arch=arch)['BM']

    assert (rows(), rows(dtype=torch.float16), rows(arch=80)) == (32, 32, 64)
    assert rows(dtype=torch.float32) == 16 and rows('read') == 64 and rows(arch=None) == 64
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='read_backward_rows', BM=128), ))
    assert rows() == 32
    with kernel_tiles.forced_tiles('read_backward_rows', BM=64):
        assert rows() == 64
    assert kernel_tiles.row_limit('read_backward_rows', BF16, 90) == 32
    assert kernel_tiles.row_limit('read_backward_rows', torch.float32, 90) is None


@pytest.mark.parametrize('arch', [100, 120])
def test_the_sm_90_row_limit_holds_on_newer_gpus(arch, monkeypatch):
    """Nobody has checked 64-row tiles of the read's backward rows pass past
    sm_90: the 32-row guard applies there too, to the defaults and a tuned entry."""
    assert kernel_tiles.row_limit('read_backward_rows', BF16, arch) == 32
    assert kernel_tiles.tile_config('read_backward_rows', 128, 196, None, None, BF16,
                                    arch=arch)['BM'] == 32
    monkeypatch.setattr(tuned, 'TUNED_TILES', (
        _entry(kernel='read_backward_rows', arch=arch, BM=128), ))
    assert kernel_tiles.tile_config('read_backward_rows', 128, 196, None, None, BF16,
                                    arch=arch)['BM'] == 32


def test_precedence_caller_then_forced_then_tuned_and_no_block_past_the_rows(monkeypatch):
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(), ))
    with kernel_tiles.forced_tiles('grads_cols', BM=32, num_warps=2):
        config = kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
        # the options not forced come from the tuned entry
        assert (config['BM'], config['num_warps'], config['BH'], config['num_stages']) == (
            32, 2, 64, 3)
        # only the kernel named
        tiles = kernel_tiles.tile_config('grads_rows', 128, 196, None, None, BF16, arch=90)
        assert tiles['BM'] == 64
        with kernel_tiles.forced_tiles('grads_cols', BM=16):  # the innermost wins
            assert kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16)['BM'] == 16
        caller = kernel_tiles.tile_config('grads_cols', 128, 196, 16, 128, BF16, arch=90)
        assert (caller['BM'], caller['BH']) == (16, 128)
    assert kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)['BM'] == 128
    # a chunk of 20 rows takes 32-row blocks, whatever the table says
    assert kernel_tiles.tile_config('grads_cols', 128, 20, None, None, BF16, arch=90)['BM'] == 32


@pytest.mark.parametrize('kernel, options, match', [
    ('grads', {}, 'kernel must be one of'),
    ('read', dict(BK=32), 'forced_tiles takes'),
    ('read', dict(BM=48), 'BM must be a power of two'),
])
def test_forced_tiles_refuses_what_no_launch_takes(kernel, options, match):
    with pytest.raises(ValueError, match=match):
        with kernel_tiles.forced_tiles(kernel, **options):
            pass


@pytest.mark.parametrize('changes, match', [
    (dict(kernel='grads'), 'kernel must be one of'),
    (dict(operand_dtype='half'), 'operand_dtype must be one of'),
    (dict(BH=96), 'BH must be a power of two'),
    (dict(block_d=8), 'block_d must be a power of two >= 16'),
    (dict(num_warps=3), 'num_warps must be a power of two'),
])
def test_a_bad_tuned_entry_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        check_tuned_tiles([_entry(**changes)])
    with pytest.raises(ValueError, match='two entries for'):
        check_tuned_tiles([_entry(), _entry(BM=16)])


def test_a_plain_and_a_decomposed_entry_of_one_kernel_are_both_valid(monkeypatch):
    """The read's plain and decomposed kinds tile apart: an entry each for
    the same kernel, GPU, dtype and width is no duplicate, and each applies to its kind."""
    plain, decomposed = _entry(kernel='read', BM=32), _entry(kernel='read', decomposed=True, BM=16)
    check_tuned_tiles([plain, decomposed])
    monkeypatch.setattr(tuned, 'TUNED_TILES', (plain, decomposed))
    rows = [kernel_tiles.tile_config('read', 128, 196, None, None, BF16, kind, arch=90)['BM']
            for kind in (False, True)]
    assert rows == [32, 16]


def test_the_weights_pass_launches_by_its_own_tiles():
    """The chunk gradients' weights pass with hidden blocks of its own (16
    or 64 units while the rows pass takes 32): its grid counts its own
    blocks, and every block of every chunk is computed (interpreter)."""
    errors = _run_interpreted('own_tiles_results')
    assert worst(errors.values()) < 1e-6, errors


def _check_persistent_runs(result: dict) -> None:
    """``persistent_results``: each persistent run computes what a program per tile
    computes, bit for bit and finite, in every kernel; and each kernel ran with more
    programs than tiles per program and with fewer, so that a loop striding by the
    wrong one of them leaves tiles unwritten (NaN) or reads past its tensors."""
    two_passes, one_program = result['two_passes'], result['one_program']
    expected = {'two_passes': {f'{k}_kernel' for k in _TWO_PASSES},
                'one_program': {f'{k}_kernel' for k in (*kernel_tiles.REPLACES, 'read')}}
    for layout, case in (('two_passes', two_passes), ('one_program', one_program)):
        assert case['finite'], layout
        layouts = {}
        for per_sm in result['programs']:
            assert case[f'max_diff_{per_sm}'] == 0.0, (layout, per_sm, case)
            for name, tiles, grid, iters in case[f'launches_{per_sm}']:
                assert grid * iters == tiles and grid <= per_sm, (name, tiles, grid, iters)
                layouts.setdefault(name, set()).add((grid, iters))
        assert set(layouts) == expected[layout], layouts
        for name, seen in layouts.items():
            assert any(grid > iters > 1 for grid, iters in seen), (name, seen)
            assert any(iters > grid > 1 for grid, iters in seen), (name, seen)


def test_persistent_programs_compute_what_a_program_per_tile_computes():
    """Programs that serve several tiles each (one multiprocessor in Triton's
    interpreter, which checks the arithmetic, not the occupancy) against one
    program per tile, float16 operands: the same results and gradients, bit
    for bit, from every product kernel, with unwritten tiles NaN."""
    _check_persistent_runs(_run_interpreted('persistent_results'))


@pytest.mark.slow
def test_persistent_programs_with_float32_operands():
    """As above with float32 operands, whose tiles differ (a minute)."""
    _check_persistent_runs(_run_interpreted('persistent_float32_results'))


def test_tiles_per_program_divide_the_tiles_among_the_persistent_programs():
    assert kernel_tiles.tiles_per_program(100, 0, 132) == 1  # not persistent
    assert kernel_tiles.tiles_per_program(100, 2, 132) == 1  # fewer tiles than programs
    assert kernel_tiles.tiles_per_program(30720, 2, 132) == 120  # 256 programs of 120 tiles
    assert kernel_tiles.tiles_per_program(12, 2, 1) == 6
    assert kernel_tiles.tiles_per_program(7919, 2, 132) == 1  # a prime: no even split
    with pytest.raises(ValueError, match='programs_per_sm must be an int >= 0'):
        with kernel_tiles.forced_tiles('read', programs_per_sm=-1):
            pass


def test_one_program_per_chunk_replaces_both_passes_where_chosen(monkeypatch):
    """The chunk gradients' one program per chunk, forward and backward, runs
    inside its ``forced_tiles``, or where a tuned entry names it for the GPU
    and its chunks are at least the GPU's multiprocessors (132 on the sm_90
    recorded here), in place of the rows and columns passes; elsewhere the
    two passes run (recorded on meta tensors, a training step)."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('recording compiles no kernel, but needs triton outside its interpreter')
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    meta = dict(device='meta')
    weights = MemoryWeights(torch.empty(1, 128, 512, **meta), torch.empty(1, 512, 128, **meta),
                            torch.empty(1, 128, **meta))

    def launched(arch: int = 90, chunks: int = 132):
        keys = torch.empty(1, chunks, 196, 128, **meta)
        lr = torch.empty(1, chunks, 196, **meta)
        leaves = [t.requires_grad_() for t in (*weights, keys)]
        with launcher.recording_launches(arch) as launches:
            out = chunk_grads_triton(MemoryWeights(*leaves[:3]), leaves[3], keys, lr, BF16)
            torch.autograd.grad(out, leaves, [torch.ones_like(t) for t in out])
        assert [tuple(t.shape) for t in out] == [(1, chunks, 128, 512), (1, chunks, 512, 128),
                                                 (1, chunks, 128)]
        return [(x.kernel.__name__, x.grid, x.kwargs['BM'], x.kwargs['num_warps'])
                for x in launches]

    two_passes = ['grads_rows_kernel', 'grads_cols_kernel', 'grads_backward_rows_kernel',
                  'grads_backward_cols_kernel']
    assert [name for name, *_ in launched()] == two_passes
    with kernel_tiles.forced_tiles('grads_chunk'):
        assert launched(chunks=6)[0] == ('grads_chunk_kernel', (6, ), 32, 8)
    with kernel_tiles.forced_tiles('grads_backward_chunk'):
        assert launched(chunks=6)[2:] == [('grads_backward_chunk_kernel', (6, ), 16, 8)]
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='grads_chunk', BM=64), ))
    assert launched()[0] == ('grads_chunk_kernel', (132, ), 64, 8)
    assert [name for name, *_ in launched(chunks=131)] == two_passes  # 131 programs
    assert [name for name, *_ in launched(80)] == two_passes
    with kernel_tiles.forced_tiles('grads_cols'):  # a tuning run timing a replaced kernel
        assert [name for name, *_ in launched()] == two_passes
    with pytest.raises(ValueError, match='kernel must be one of'):
        kernel_tiles.chosen_kernel('grads_rows', 128, BF16, 90)


def test_the_reads_backward_runs_as_one_program_per_state_where_chosen(monkeypatch):
    """The read's backward takes one program per state inside its
    ``forced_tiles``, or where a tuned entry names it for the GPU and its
    states are at least the GPU's multiprocessors (132 on the sm_90 recorded
    here): a head's single state read by 8192 tokens in two pseudo-chunks
    keeps the two passes (recorded on meta tensors)."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('recording compiles no kernel, but needs triton outside its interpreter')
    from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_read_triton,
                                                      read_triton)
    meta = dict(device='meta')

    def launched(chunked: bool = True, arch: int = 90):
        lead = (1, 12, 12) if chunked else (1, )  # 144 states, or 1
        tokens = (12, 12 * 196) if chunked else (1, 8192)
        leaves = [torch.empty(*lead, 128, 512, **meta), torch.empty(*lead, 512, 128, **meta),
                  torch.empty(*lead, 128, **meta), torch.empty(1, *tokens, 128, **meta)]
        leaves = [t.requires_grad_() for t in leaves]
        with launcher.recording_launches(arch) as launches:
            if chunked:
                out = chunk_read_triton(MemoryWeights(*leaves[:3]), leaves[3], 196, BF16)
            else:
                out = read_triton(MemoryWeights(*leaves[:3]), leaves[3][0], BF16)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [(x.kernel.__name__, x.grid, x.kwargs['BM']) for x in launches
                if 'backward' in x.kernel.__name__]

    two_passes = ['read_backward_rows_kernel', 'read_backward_rows_kernel',
                  'read_backward_cols_kernel']  # 196 rows: 32-row blocks and a tail
    assert [name for name, *_ in launched()] == two_passes
    with kernel_tiles.forced_tiles('read_backward_chunk'):
        assert launched() == [('read_backward_chunk_kernel', (144, ), 32)]
        assert launched(chunked=False) == [('read_backward_chunk_kernel', (2, ), 32)]
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='read_backward_chunk', BM=16), ))
    assert launched() == [('read_backward_chunk_kernel', (144, ), 16)]
    assert [name for name, *_ in launched(chunked=False)] == [
        'read_backward_rows_kernel', 'read_backward_cols_kernel']
    assert [name for name, *_ in launched(arch=80)] == two_passes


def test_column_blocks_split_a_width_where_two_blocks_hold_fewer_columns():
    blocks = {d: kernel_tiles.column_blocks(d) for d in (8, 16, 24, 40, 80, 96, 128, 160, 192, 200)}
    assert blocks == {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 80: (64, 16),
                      96: (64, 32), 128: (128, 0), 160: (128, 32), 192: (128, 64),
                      200: (256, 0)}


def test_a_tuned_entry_decides_the_split(monkeypatch):
    """Its ``split`` before the defaults (M2's 96 columns in two blocks, M4's
    160 in one), a forced ``split`` before it; the other options as tuned."""
    monkeypatch.setattr(tuned, 'TUNED_TILES', (
        _entry(kernel='read', split=1, BM=32),
        _entry(kernel='read', block_d=256, split=0, BM=16, BH=32, num_warps=8)))
    config = kernel_tiles.tile_config('read', 96, 196, None, None, BF16, arch=90)
    assert (config['BD'], config['BE'], config['BM'], config['BH']) == (64, 32, 32, 64)
    config = kernel_tiles.tile_config('read', 160, 196, None, None, BF16, arch=90)
    assert (config['BD'], config['BE'], config['BM']) == (256, 0, 16)
    with kernel_tiles.forced_tiles('read', split=1):
        assert kernel_tiles.tile_config('read', 160, 196, None, None, BF16, arch=90)['BE'] == 32
    assert kernel_tiles.tile_config('read', 160, 196, None, None, BF16, arch=80)['BE'] == 32
    with pytest.raises(ValueError, match='split must be None, 0 or 1'):
        check_tuned_tiles([_entry(split=2)])


def test_m4_rows_split_by_default_where_the_table_says():
    def blocks(kernel, d=160, dtype=BF16, decomposed=False, arch=90):
        config = kernel_tiles.tile_config(kernel, d, 196, None, None, dtype, decomposed, arch)
        return config['BD'], config['BE'], config['BM'], config['BH']

    assert blocks('read') == (128, 32, 64, 32)
    assert blocks('grads_cols') == (128, 32, 64, 16)
    assert blocks('grads_rows', arch=80) == (128, 32, 16, 32)
    assert blocks('grads_rows', arch=None) == (128, 32, 16, 32)  # sm_80's where unknown
    # a decomposed read in two blocks too, at its own small tiles, on either GPU
    for kernel in ('read', 'read_backward_rows', 'read_backward_cols'):
        for arch in (80, 90, None):
            assert blocks(kernel, decomposed=True, arch=arch) == (128, 32, 16, 16)
    # float32 operands, M2's width: one padded block
    assert blocks('read', dtype=torch.float32)[:2] == (256, 0)
    assert blocks('read', dtype=torch.float32, decomposed=True)[:2] == (256, 0)
    assert blocks('read', d=96)[:2] == (128, 0)  # M2: one block of 128
    assert blocks('read', d=96, decomposed=True)[:2] == (128, 0)
    with kernel_tiles.forced_tiles('read', split=0):
        assert blocks('read') == (256, 0, 16, 32)
    with kernel_tiles.forced_tiles('read', split=1, BM=32):
        assert blocks('read', d=96)[:3] == (64, 32, 32)
    for bad in (2, True):
        with pytest.raises(ValueError, match='split must be 0 or 1'):
            with kernel_tiles.forced_tiles('read', split=bad):
                pass


@pytest.mark.gpu
def test_persistent_programs_on_cuda_compute_what_a_program_per_tile_computes():
    """On the GPU, with several tiles per program (600 chunks, two programs
    per multiprocessor): the chunk gradients and their gradients, bf16
    operands, through the two passes and through one program per chunk,
    whose programs read back their own stores past a barrier, each against
    the two passes with a program per tile."""
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    weights, keys, values, lr = _write_inputs(2, 300, 196, 128, 1.0, seed=0)
    inputs = [t.cuda() for t in (*weights, keys, values, lr)]
    gen = torch.Generator().manual_seed(1)

    def run(kernels, per_sm):
        leaves = [t.clone().requires_grad_() for t in inputs]
        forced = {kernel: dict(programs_per_sm=per_sm) for kernel in kernels}
        with kernel_tiles.forced_tiles_of(forced), launcher.observing_launches() as launches:
            out = chunk_grads_triton(MemoryWeights(*leaves[:3]), *leaves[3:], BF16)
            bars = [torch.randn(t.shape, generator=gen).cuda() for t in out]
            grads = torch.autograd.grad(out, leaves, bars)
        return [t.float() for t in (*out, *grads)], max(x.kwargs.get('ITERS', 1)
                                                      for x in launches)

    gen.manual_seed(1)
    base, _ = run((), 0)
    # the same tiles agree to float32's summation order; one program per chunk has
    # tiles of its own, whose bf16 d_hidden may round one ulp apart (1.3e-3 of the
    # largest gradient on an H200), where a read before the barrier is off by O(1)
    for kernels, bound in ((_TWO_PASSES, 1e-4), (tuple(kernel_tiles.REPLACES), 1e-2)):
        gen.manual_seed(1)
        got, iters = run(kernels, 2)
        assert iters > 1, kernels
        for a, b in zip(got, base):
            assert ((a - b).abs().max() / b.abs().max()).item() < bound, kernels


def test_forced_column_blocks_hold_the_rows_of_every_two_pass_kernel():
    def blocks(kernel='read', d=160):
        config = kernel_tiles.tile_config(kernel, d, 196, None, None, BF16, arch=90)
        return config['BD'], config['BE']

    with kernel_tiles.forced_column_blocks(0):
        assert blocks() == blocks('grads_backward_cols') == (256, 0)
        # the one-program kernels are not forced, so not chosen
        assert not kernel_tiles.chosen_kernel('grads_chunk', 160, BF16, 90)
    with kernel_tiles.forced_column_blocks(1):
        assert blocks(d=96) == (64, 32)
    with kernel_tiles.forced_column_blocks(None):
        assert blocks() == (128, 32)
    with kernel_tiles.forced_column_blocks(0):  # the projections' too
        assert _projection_blocks() == (256, 0, 256, 0)
    with kernel_tiles.forced_column_blocks(1):
        assert _projection_blocks(d=96) == (64, 32, 64, 32)


def test_each_tuned_entry_computes_at_its_tiles_what_float64_does():
    """Every ``TUNED_TILES`` entry (and stand-ins while it holds none)
    re-checked in the interpreter at its tiles: a GPU's timing chose them,
    only a float64 reference says they compute the memory."""
    from convneur_mm.models.layers.memory_ops.kernels import tuned
    from .memory_cases import STAND_IN_ENTRIES
    errors = _run_interpreted('tuned_entry_results')
    assert len(errors) == len(tuned.TUNED_TILES) + len(STAND_IN_ENTRIES)
    for entry, (over_allowed, at_tiles) in errors.items():
        assert over_allowed <= 1 and at_tiles, (entry, over_allowed, at_tiles)  # NaN fails too
