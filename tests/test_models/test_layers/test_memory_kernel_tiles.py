"""How the memory's kernels get their launch options: the defaults, a tuned
entry for the GPU compiled for, a tuning run's forced options, the caller's
tile sizes (``kernels.launch.tile_config``, ``kernels.tuned``)."""
import os

import pytest
import torch

from convneur_mm.models.layers.memory_ops import dispatch
from convneur_mm.models.layers.memory_ops.kernels import launcher, tuned
from convneur_mm.models.layers.memory_ops.kernels import tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.kernels.tiles import check_tuned_tiles
from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile

from .test_memory_kernels import _inspect, _run_interpreted

BF16 = torch.bfloat16
# the kernels a call launches unless a kernel that replaces some is chosen
_TWO_PASSES = [k for k in kernel_tiles.KERNEL_NAMES if k not in kernel_tiles.REPLACES]


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


def test_precedence_caller_then_forced_then_tuned_and_no_block_past_the_rows(monkeypatch):
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(), ))
    with kernel_tiles.forced_tiles('grads_cols', BM=32, num_warps=2):
        config = kernel_tiles.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
        # the options not forced come from the tuned entry
        assert (config['BM'], config['num_warps'], config['BH'], config['num_stages']) == (
            32, 2, 64, 3)
        # only the kernel named
        assert kernel_tiles.tile_config('grads_rows', 128, 196, None, None, BF16, arch=90)['BM'] == 64
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


@pytest.mark.parametrize('arch, dtype, training, path, words', [
    (None, 'bfloat16', False, 'torch', "off NVIDIA's CUDA GPUs"),
    (None, 'float32', True, 'torch', 'trains on the PyTorch path'),
    (90, 'bfloat16', False, 'triton', '10.28 ms through the kernels against 20.43 ms'),
    (90, 'float32', False, 'torch', '54.48 ms through the kernels against 28.31 ms'),
    (90, 'float16', False, 'torch', 'no GPU has timed'),
    (80, 'bfloat16', False, 'torch', 'on sm_80 with bfloat16 operands'),
    (90, 'bfloat16', True, 'torch', '77.73 ms through the kernels against 69 ms'),
    (90, 'float16', True, 'torch', 'trains on the PyTorch path: no GPU has timed'),
])
def test_auto_takes_the_kernels_only_where_a_gpu_measured_them_faster(arch, dtype, training,
                                                                      path, words):
    got, why = dispatch.auto_path(arch, dtype, training, 128)
    assert got == path and words in why, why


def test_a_measurement_speaks_for_the_head_widths_tiled_as_it_was():
    """M3's measurement (C_m 128) serves M1's and M2's 80 and 96, which the
    kernels tile as 128 too, and not M4's 160, tiled as 256."""
    for head_dim in (80, 96, 128):
        assert dispatch.auto_path(90, 'bfloat16', False, head_dim)[0] == 'triton'
    path, why = dispatch.auto_path(90, 'bfloat16', False, 160)
    assert path == 'torch' and 'no GPU has timed' in why and 'tiled as 256' in why
    with pytest.raises(ValueError, match='block_d must be a power of two'):
        dispatch.check_measured_paths([tuned.MEASURED_PATHS[0]._replace(block_d=160)])
    # one entry per width: M4's may sit beside M3's
    dispatch.check_measured_paths([*tuned.MEASURED_PATHS,
                                tuned.MEASURED_PATHS[0]._replace(block_d=256)])


def test_a_new_measurement_decides_auto_for_its_gpu_and_mode(monkeypatch):
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', tuned.MEASURED_PATHS + (
        tuned.MeasuredPath(80, 'bfloat16', True, 9.0, 10.0, 'a test'), ))
    assert dispatch.auto_path(80, 'bfloat16', True, 128)[0] == 'triton'
    assert dispatch.auto_path(80, 'bfloat16', False, 128)[0] == 'torch'


def test_the_memory_asks_auto_path_for_its_gpu(monkeypatch):
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, matmul_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 80)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 16))
    assert plan.implementation == 'torch' and 'sm_80 with bfloat16' in plan.reason


def test_the_triton_kernels_refuse_to_train_through_a_kernel_that_faults(monkeypatch):
    """A backward kernel listed in ``CUDA_FAULTS``: kernels='triton' says so
    before a training step instead of killing the process; inference keeps
    the kernels, and 'auto' trains on the PyTorch path."""
    from convneur_mm.models.layers import NeuralMemory
    from convneur_mm.models.layers.memory_ops.kernels import availability
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    x = torch.randn(1, 20, 16)
    memory = NeuralMemory(16, chunk_size=8, matmul_dtype='bfloat16', kernels='triton')
    assert memory.plan(x).implementation == 'triton'  # none listed: it trains
    monkeypatch.setattr(availability, 'CUDA_FAULTS', {'read_backward_rows': 'seen somewhere'})
    with pytest.raises(RuntimeError, match='read_backward_rows kernel faults on CUDA GPUs'):
        memory.plan(x)
    with torch.no_grad():
        assert memory.plan(x).implementation == 'triton'
    memory.kernels = 'auto'
    assert memory.plan(x).implementation == 'torch'
    # a forward kernel that faulted would refuse inference too
    monkeypatch.setattr(availability, 'CUDA_FAULTS', {'read': 'seen somewhere'})
    memory.kernels = 'triton'
    with torch.no_grad(), pytest.raises(RuntimeError, match=r'read kernel faults.*seen somewhere'):
        memory.plan(x)


def test_a_plan_that_auto_takes_the_kernels_by_quotes_the_measurement(monkeypatch):
    """On a CPU in Triton's interpreter, as if it were an sm_90 GPU."""
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=8, matmul_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 128))
    assert plan.implementation == 'triton' and '10.28 ms through the kernels' in plan.reason
    # that measurement timed every kernel: the projections and the scan too
    assert 'every Triton kernel' in plan.reason
    assert (plan.projections, plan.scan) == ('triton', 'triton')


def test_auto_keeps_the_projections_and_scan_on_pytorch_where_only_the_write_and_read_were_timed(
        monkeypatch):
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=8, matmul_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', (
        tuned.MeasuredPath(90, 'bfloat16', False, 9.0, 10.0, 'a tuning run'), ))
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 128))
    assert plan.implementation == 'triton' and 'the Triton write and read' in plan.reason
    assert (plan.projections, plan.scan) == ('torch', 'torch')


def own_tiles_results() -> dict:
    """(Interpreter) the chunk gradients with the weights' pass at 16 and 64
    hidden units per block, against its default of 32 (the rows pass's):
    the max-relative error of each."""
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    gen = torch.Generator().manual_seed(0)
    d, L = 16, 20
    weights = MemoryWeights(torch.randn(1, d, 4 * d, generator=gen) / 4,
                            torch.randn(1, 4 * d, d, generator=gen) / 8,
                            torch.randn(1, d, generator=gen) / 10)
    keys = torch.randn(1, 3, L, d, generator=gen)
    values = torch.randn(1, 3, L, d, generator=gen)
    lr = torch.rand(1, 3, L, generator=gen)
    with torch.no_grad():
        base = chunk_grads_triton(weights, keys, values, lr, torch.float16)
        errors = {}
        for bh in (16, 64):
            with kernel_tiles.forced_tiles('grads_cols', BH=bh):
                got = chunk_grads_triton(weights, keys, values, lr, torch.float16)
            errors[bh] = max(((a - b).abs().max() / b.abs().max()).item()
                             for a, b in zip(got, base))
    return errors


def test_the_weights_pass_launches_by_its_own_tiles():
    """The chunk gradients' weights pass with hidden blocks of its own (16
    or 64 units while the rows pass takes 32): its grid counts its own
    blocks, and every block of every chunk is computed (interpreter)."""
    errors = _run_interpreted('own_tiles_results', 'test_memory_kernel_tiles')
    assert max(errors.values()) < 1e-6, errors


def persistent_results() -> dict:
    """(Interpreter) the chunk gradients and a chunk read, forward and
    backward, with one program per tile and with two programs in all
    (``programs_per_sm=2`` on one multiprocessor): the largest difference,
    and each launch's tiles, grid and tiles per program."""
    from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_triton,
                                                      chunk_read_triton)
    gen = torch.Generator().manual_seed(0)
    d, L = 16, 20

    def rand(*shape, scale=1.0):
        return torch.randn(shape, generator=gen) * scale

    weights = [rand(1, d, 4 * d, scale=0.25), rand(1, 4 * d, d, scale=0.125),
               rand(1, d, scale=0.1)]
    keys, values, lr = rand(1, 4, L, d), rand(1, 4, L, d), torch.rand(1, 4, L, generator=gen)
    states = [rand(1, 2, 3, d, 4 * d, scale=0.25), rand(1, 2, 3, 4 * d, d, scale=0.125),
              rand(1, 2, 3, d, scale=0.1)]
    queries = rand(1, 2, 3 * L - 4, d)
    inputs = weights + [keys, values, lr] + states + [queries]
    cotangents = [rand(1, 4, d, 4 * d), rand(1, 4, 4 * d, d), rand(1, 4, d),
                  rand(2, 3 * L - 4, d)]  # the read merges the heads: (B, N, H d)

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        grads = chunk_grads_triton(MemoryWeights(*leaves[:3]), *leaves[3:6], torch.float16)
        read = chunk_read_triton(MemoryWeights(*leaves[6:9]), leaves[9], L, torch.float16)
        outputs = list(grads) + [read]
        return outputs + list(torch.autograd.grad(outputs, leaves, cotangents))

    def runs(one_program: bool):
        # (results, launches) with a program per tile, then with persistent programs
        kernels = kernel_tiles.KERNEL_NAMES if one_program else _TWO_PASSES
        chosen = list(kernel_tiles.REPLACES) if one_program else []
        out = []
        for per_sm in (0, 2):
            forced = {kernel: dict(programs_per_sm=per_sm)
                      for kernel in (kernels if per_sm else chosen)}
            with kernel_tiles.forced_tiles_of(forced), launcher.observing_launches() as launches:
                out.append((run(), launches))
        return out

    result = {}
    for tag, one_program in (('', False), ('_one_program', True)):
        (base, plain_launches), (persistent, launches) = runs(one_program)
        result['max_diff' + tag] = max((a - b).abs().max().item()
                                       for a, b in zip(base, persistent))
        result['launches' + tag] = [
            [p.kernel.__name__, p.grid[0], l.grid[0], l.kwargs.get('ITERS', 1)]
            for p, l in zip(plain_launches, launches)]
    return result


def test_persistent_programs_compute_what_a_program_per_tile_computes():
    """Programs that serve several tiles each (two per multiprocessor; one
    multiprocessor in Triton's interpreter, which checks the arithmetic, not
    the occupancy) against one program per tile: the same results and
    gradients, bit for bit, from every product kernel."""
    result = _run_interpreted('persistent_results', 'test_memory_kernel_tiles')
    assert result['max_diff'] == result['max_diff_one_program'] == 0.0
    launched, one_program = result['launches'], result['launches_one_program']
    assert {name for name, *_ in launched} == {f'{k}_kernel' for k in kernel_tiles.KERNEL_NAMES
                                               if k not in kernel_tiles.REPLACES}
    # one program per chunk in place of the rows and columns passes, forward and backward
    replaced = {f'{k}_kernel' for kernels in kernel_tiles.REPLACES.values() for k in kernels}
    assert {name for name, *_ in one_program} == {name for name, *_ in launched} - replaced | {
        f'{k}_kernel' for k in kernel_tiles.REPLACES}
    for name, tiles, grid, iters in launched + one_program:
        assert grid * iters == tiles and grid <= max(2, tiles // 2 + 1), (name, tiles, grid)
    assert sum(iters > 1 for *_, iters in launched) >= 6
    assert [iters for name, *_, iters in one_program if name.endswith('chunk_kernel')] == [2, 2]


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
    inside its ``forced_tiles`` or where a tuned entry names it for the GPU,
    in place of the rows and columns passes; elsewhere the two passes run
    (recorded on meta tensors for sm_90, a training step)."""
    pytest.importorskip('triton')
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        pytest.skip('recording compiles no kernel, but needs triton outside its interpreter')
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    meta = dict(device='meta')
    weights = MemoryWeights(torch.empty(1, 128, 512, **meta), torch.empty(1, 512, 128, **meta),
                            torch.empty(1, 128, **meta))
    keys = torch.empty(1, 6, 196, 128, **meta)
    lr = torch.empty(1, 6, 196, **meta)

    def launched(arch: int = 90):
        leaves = [t.requires_grad_() for t in (*weights, keys)]
        with launcher.recording_launches(arch) as launches:
            out = chunk_grads_triton(MemoryWeights(*leaves[:3]), leaves[3], keys, lr, BF16)
            torch.autograd.grad(out, leaves, [torch.ones_like(t) for t in out])
        assert [tuple(t.shape) for t in out] == [(1, 6, 128, 512), (1, 6, 512, 128), (1, 6, 128)]
        return [(x.kernel.__name__, x.grid, x.kwargs['BM'], x.kwargs['num_warps'])
                for x in launches]

    two_passes = ['grads_rows_kernel', 'grads_cols_kernel', 'grads_backward_rows_kernel',
                  'grads_backward_cols_kernel']
    assert [name for name, *_ in launched()] == two_passes
    with kernel_tiles.forced_tiles('grads_chunk'):
        assert launched()[0] == ('grads_chunk_kernel', (6, ), 32, 8)
    with kernel_tiles.forced_tiles('grads_backward_chunk'):
        assert launched()[2:] == [('grads_backward_chunk_kernel', (6, ), 16, 8)]
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='grads_chunk', BM=64), ))
    assert launched()[0] == ('grads_chunk_kernel', (6, ), 64, 8)
    assert [name for name, *_ in launched(80)] == two_passes
    with kernel_tiles.forced_tiles('grads_cols'):  # a tuning run timing a replaced kernel
        assert [name for name, *_ in launched()] == two_passes
    with pytest.raises(ValueError, match='kernel must be one of'):
        kernel_tiles.chosen_kernel('grads_rows', 128, BF16, 90)


def _stage1_memory(d: int, train: bool):
    """A bf16 memory of width ``d`` through the kernels on meta tensors, and
    an input at stage 1 (batch 128, 3136 tokens)."""
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(d, chunk_size=196, kernels='triton',
                          matmul_dtype='bfloat16').to('meta').train(train)
    return memory, torch.empty(128, 3136, d, device='meta', requires_grad=train)


def _stage1_reports(arch: int, per_sm: int, chosen: tuple = ()) -> dict:
    """Registers, spills and shared memory of every kernel a bf16 training
    step of C_m 128 at M3's stage 1 (batch 128) launches, compiled as
    launched (ptxas)."""
    inspect = _inspect()
    memory, x = _stage1_memory(128, train=True)
    forced = {kernel: dict(programs_per_sm=per_sm) for kernel in chosen or _TWO_PASSES}
    with kernel_tiles.forced_tiles_of(forced), launcher.recording_launches(arch) as launches:
        memory(x).sum().backward()
    iters = {}  # the most tiles per program of each kernel's launches (132 multiprocessors)
    for l in launches:
        name = l.kernel.__name__
        iters[name] = max(iters.get(name, 1), l.kwargs.get('ITERS', 1))
    return iters, {(r.kernel, r.num_warps): (r.registers, r.spill_stores, r.shared)
                   for r in inspect.launch_reports(launches, arch)}


def _m4_stage1_launches(arch: int, train: bool, chosen: tuple = ()):
    """The launches of a bf16 call (``train``: training step) of C_m 160 at
    M4's stage 1 (batch 128, 3136 tokens), and their compile reports."""
    inspect = _inspect()
    memory, x = _stage1_memory(160, train)
    with kernel_tiles.forced_tiles_of({kernel: {} for kernel in chosen}), \
            launcher.recording_launches(arch) as launches, torch.set_grad_enabled(train):
        out = memory(x)
        if train:
            out.sum().backward()
    return launches, inspect.launch_reports(launches, arch)


def _check_split_compiles(arch: int, train: bool, chosen: tuple = ()) -> None:
    """Every tiled kernel launches as ``SPLIT_TILES`` says (two column blocks
    where it has an entry), each compiled without spills (but the two the
    table names, each within its bytes), and the products of 64-row tiles
    on wgmma on sm_90; the projection kernel as ``PROJECTION_SPLIT`` says,
    without spills, and its backward in two blocks of whole rows, within
    its bound."""
    from convneur_mm.models.layers.memory_ops.project.triton import PROJECTION_SPLIT
    launches, reports = _m4_stage1_launches(arch, train, chosen)
    tiles = ('BD', 'BE', 'BHD', 'BHE', 'BM', 'BK')
    projections = [tuple(x.kwargs.get(k) for k in tiles) for x in launches
                   if x.kernel.__name__.startswith('project')]
    rows, features = PROJECTION_SPLIT[(128, 32)]
    assert projections == [(128, 32, 128, 32, rows, features)] + (
        [(128, 32, 128, 32, 16, None)] if train else [])
    table = kernel_tiles.SPLIT_TILES[(128, 32)][arch]
    tiled = [x for x in launches if x.kernel.__name__[:-len('_kernel')] in kernel_tiles.KERNEL_NAMES]
    assert tiled
    for x in tiled:
        kernel = x.kernel.__name__[:-len('_kernel')]
        split = table.get(kernel)
        assert (x.kwargs['BD'], x.kwargs['BE']) == ((128, 32) if split else (256, 0)), kernel
        if split:  # a chunk's rows past the whole blocks: a 16-row tail launch
            assert x.kwargs['BM'] in (split[0], 16) and x.kwargs['BH'] == split[1], x.kwargs
    names = {x.kernel.__name__ for x in tiled} | {'project_kernel', 'project_backward_kernel'}
    for report in reports:
        if report.kernel not in names:
            continue  # the scan: tested at M3's width
        bound = {('grads_backward_chunk_kernel', 90): 8, ('grads_backward_chunk_kernel', 80): 24,
                 ('read_backward_cols_kernel', 80): 112, ('project_backward_kernel', 90): 864,
                 ('project_backward_kernel', 80): 940}.get((report.kernel, arch), 0)
        assert report.spill_stores <= bound and report.shared <= 163 * 1024, report
        if arch >= 90 and report.kernel in ('read_kernel', 'grads_rows_kernel',
                                            'grads_cols_kernel') and report.wgmma == 0:
            # only the read's tail launch (16-row blocks) is below wgmma's least
            assert report.kernel == 'read_kernel', report


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
def test_m4_inference_kernels_compile_in_two_column_blocks_on_sm_90():
    """M4's 160 columns as 128 + 32: the read and the chunk gradients' two
    passes take 64-row tiles on wgmma without spills, where one block of
    256 columns took 16-row tiles on mma.sync; the projections 32-row tiles
    (16 in one block)."""
    _check_split_compiles(90, train=False)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('one_program', [False, True])
def test_m4_training_kernels_compile_at_their_split_tiles(arch, one_program):
    _check_split_compiles(arch, train=True,
                          chosen=tuple(kernel_tiles.REPLACES) if one_program else ())


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
    # float32 operands, a decomposed read, M2's width: one padded block
    assert blocks('read', dtype=torch.float32)[:2] == (256, 0)
    assert blocks('read', decomposed=True)[:2] == (256, 0)
    assert blocks('read', d=96)[:2] == (128, 0)  # M2: one block of 128
    with kernel_tiles.forced_tiles('read', split=0):
        assert blocks('read') == (256, 0, 16, 32)
    with kernel_tiles.forced_tiles('read', split=1, BM=32):
        assert blocks('read', d=96)[:3] == (64, 32, 32)
    for bad in (2, True):
        with pytest.raises(ValueError, match='split must be 0 or 1'):
            with kernel_tiles.forced_tiles('read', split=bad):
                pass


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
def test_one_program_per_chunk_compiles_without_spills_at_its_default_tiles(arch):
    """The chunk gradients' one program per chunk, forward and backward, in
    a bf16 training step at M3's stage 1, compiled as launched."""
    _, reports = _stage1_reports(arch, 0, chosen=tuple(kernel_tiles.REPLACES))
    merged = {kernel: report for (kernel, _), report in reports.items()
              if kernel.endswith('chunk_kernel')}
    assert set(merged) == {'grads_chunk_kernel', 'grads_backward_chunk_kernel'}
    for kernel, (registers, spills, shared) in merged.items():
        assert spills == 0 and shared <= 163 * 1024, (kernel, registers, spills, shared)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='this process runs Triton in its interpreter')
def test_persistent_programs_compile_within_the_shared_memory_and_a_spill_bound():
    """The loop over a program's tiles costs registers: at the default tiles
    some kernels spill (up to 204 B on an sm_90 of 132 multiprocessors),
    which only timing can weigh against the fewer programs; the shared
    memory stays the same."""
    _, plain = _stage1_reports(90, 0)
    iters, persistent = _stage1_reports(90, 2)
    assert all(iters[f'{kernel}_kernel'] > 1 for kernel in _TWO_PASSES), iters
    assert persistent.keys() == plain.keys()
    for key, (registers, spills, shared) in persistent.items():
        assert shared == plain[key][2] and spills <= max(plain[key][1], 256), (
            key, persistent[key], plain[key])


@pytest.mark.gpu
def test_persistent_programs_on_cuda_compute_what_a_program_per_tile_computes():
    """On the GPU, with several tiles per program (600 chunks, two programs
    per multiprocessor): the chunk gradients and their gradients, bf16
    operands, through the two passes and through one program per chunk,
    whose programs read back their own stores past a barrier, each against
    the two passes with a program per tile."""
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    from .test_memory_kernels import _write_inputs
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


def _projection_blocks(d=160, heads=1, dtype=BF16, features=None, backward=False, tiles=False):
    from convneur_mm.models.layers.memory_ops.project.triton import projection_tiles
    config = projection_tiles(d, heads, 196, None, features, dtype, backward)
    return tuple(config[k] for k in ('BD', 'BE', 'BHD', 'BHE') + (('BM', 'BK') if tiles else ()))


def test_m4_projections_split_by_default_where_the_table_says():
    """160 columns with 16-bit operands as 128 + 32 (a head of 160 too,
    heads of 32 in one block) at ``PROJECTION_SPLIT``'s rows and feature
    steps; float32 operands, M3's and M2's widths in one block; the
    backward splits every row wider than 128, which it cannot hold in one
    block; ``forced_tiles('project', split=...)`` decides instead, and
    takes nothing else."""
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
    with pytest.raises(ValueError, match='takes only split'):
        with kernel_tiles.forced_tiles('project', split=1, BM=16):
            pass
    with pytest.raises(ValueError, match='split must be 0 or 1'):
        with kernel_tiles.forced_tiles('project', split=2):
            pass


if __name__ == '__main__':  # the interpreter subprocess of ``_run_interpreted``
    import json
    import sys
    print(json.dumps(globals()[sys.argv[1]]()))
