"""The kernels compiled ahead of time for sm_80 and sm_90 as their wrappers
launch them (``benchmarks.kernels.inspect``): no spills, matrix instructions, every width."""

import pytest
import torch

from convneur_mm.models.layers.memory_ops import MemoryWeights
from convneur_mm.models.layers.memory_ops.kernels import launcher, tiles as kernel_tiles
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.memory_ops.read.triton import launch_read_backward

from .memory_cases import _TWO_PASSES, _inspect


def _stage_launches(d: int, operand_dtype: torch.dtype, arch: int, batch: int = 128,
                    tokens: int = 3136, max_lr: float = 1.0):
    """The launches a ``NeuralMemory`` of width ``d`` makes at a stage of
    ``tokens`` tokens (M3's stage 1 by default), recorded on meta tensors:
    the GPU code path, which the interpreter never sees, compiled as it
    launches."""
    inspect = _inspect()
    from convneur_mm.models.layers import NeuralMemory
    dtype = str(operand_dtype).split('.')[-1]
    memory = NeuralMemory(d, chunk_size=196, max_lr=max_lr, implementation='triton',
                          operand_dtype=dtype).eval().to('meta')
    with torch.no_grad(), inspect.recording_launches(arch) as launches:
        memory(torch.empty(batch, tokens, d, device='meta'))
    return inspect, launches


def _compile_stage(d: int, operand_dtype: torch.dtype, arch: int, **stage):
    inspect, launches = _stage_launches(d, operand_dtype, arch, **stage)
    reports = inspect.launch_reports(launches, arch)
    for report in reports:
        # an A100's limit per block (an H100 allows 227 KiB)
        assert report.shared <= 163 * 1024, report
    return reports


# the kernels launched once each (the products', the gates' and the fold's); the
# scan's runs once per weight tensor
KERNEL_NAMES = ['grads_rows_kernel', 'grads_cols_kernel', 'read_kernel', 'project_kernel',
                'gates_kernel', 'fold_kernel']
SCAN_LAUNCHES = ['scan_kernel'] * 3


# float16 on sm_90 is a `slow` case: its tiles are bf16's
@pytest.mark.parametrize('operand_dtype,arch', [
    (torch.bfloat16, 90), pytest.param(torch.float16, 90, marks=pytest.mark.slow),
    (torch.bfloat16, 80)])
def test_kernels_compile_as_launched_at_m3_stage_1(operand_dtype, arch):
    """M3's stage 1 (batch 128, 3136 tokens, C_m 128, chunks of 196) as the
    wrappers launch it: no spills, and Hopper's wgmma on sm_90 (but for the
    projections); 16-bit weights everywhere, the scan writing w1's and w2's
    states in 16 bits for the read."""
    inspect, launches = _stage_launches(128, operand_dtype, arch)
    assert sorted(launch.kernel.__name__ for launch in launches) == sorted(
        KERNEL_NAMES + SCAN_LAUNCHES + ['read_kernel'])
    # 16 chunks of 196 rows: three 64-row blocks each, then 16 rows for their last 4
    reads = [x for x in launches if x.kernel.__name__ == 'read_kernel']
    assert [(x.kwargs['BM'], x.grid) for x in reads] == [(64, (128 * 16 * 3, )),
                                                         (16, (128 * 16, ))]
    half = '*bf16' if operand_dtype == torch.bfloat16 else '*fp16'
    states = []
    for launched in launches:
        signature, constants, attrs, _ = inspect.launch_specialization(launched, arch)
        # the launch's own specialization: divisibility hints, 16-bit weights
        name = launched.kernel.__name__
        assert attrs, name
        if name == 'scan_kernel':
            states.append(signature['out_ptr'])
        elif name == 'gates_kernel':  # float32 summaries and weights
            assert signature['wd_ptr'] == '*fp32'
        elif name == 'fold_kernel':  # the folded weight written in 16 bits: no cast
            assert signature['w_ptr'] == half and signature['q_ptr'] == '*fp32'
        else:
            assert signature['w_ptr' if name == 'project_kernel' else 'w1_ptr'] == half, name
        if name == 'grads_cols_kernel':  # the rows pass's 16-bit copy of the keys
            assert signature['k_ptr'] == half
        if name == 'grads_rows_kernel':  # 46 blocks over each image's 2940 written rows
            assert launched.kwargs['FLAT'] and launched.grid == (128 * 46, )
    assert states == [half, half, '*fp32']  # w1, w2, g
    reports = inspect.launch_reports(launches, arch)
    assert {r.kernel for r in reports} == set(KERNEL_NAMES + SCAN_LAUNCHES)
    for report in reports:
        assert report.shared <= 163 * 1024 and report.spill_stores == 0, report
        if report.kernel in ('scan_kernel', 'read_kernel', 'gates_kernel', 'fold_kernel'):
            continue  # element-wise or float32 (IEEE) products; the reads below
        # the projections' 32-row tiles (64 spill) are below wgmma's least
        wgmma = arch >= 90 and report.kernel != 'project_kernel'
        assert (report.wgmma > 0) == wgmma and report.mma != 'none', report
    # the read's 16-row blocks are below wgmma's least
    assert sorted(r.wgmma > 0 for r in reports if r.kernel == 'read_kernel') == [False,
                                                                                 arch >= 90]


# float16 on sm_80 is a `slow` case: the forward's sm_80 case covers mma.sync
@pytest.mark.parametrize('operand_dtype,arch', [
    (torch.bfloat16, 90), pytest.param(torch.float16, 80, marks=pytest.mark.slow)])
def test_backward_kernels_compile_as_launched_at_m3_stage_1(operand_dtype, arch):
    """The chunk read's, the chunk gradients' and the scan's backward at M3's
    stage 1 (batch 128, 16 chunks of 196 tokens, C_m 128; the keys as the
    projections' per-image views) as their wrappers launch them: no spills,
    tensor-core products, and wgmma for the read's columns pass on sm_90 (the write's rows
    pass takes 16-row tiles, below wgmma's 64, to hold its tiles without
    spilling). The projections' backward too, its products in blocks of 32
    output features (whole rows spilled 320 bytes). w1's and w2's states,
    chunk gradients and their cotangents in the dtype training keeps them in
    (``neural_memory.TRAINING_STATE_DTYPES``: bf16's own, float16's float32)."""
    from convneur_mm.models.layers.memory_ops.chunk_grads.triton import _chunk_grads_backward
    from convneur_mm.models.layers.neural_memory import TRAINING_STATE_DTYPES
    from convneur_mm.models.layers.memory_ops.project.triton import _project_backward
    from convneur_mm.models.layers.memory_ops.scan.triton import _scan_backward
    inspect = _inspect()
    heads, batch, chunks, length, d = 1, 128, 16, 196, 128
    meta = dict(device='meta')
    empty = lambda *shape: torch.empty(*shape, **meta)  # noqa: E731
    state_dtype = operand_dtype if operand_dtype in TRAINING_STATE_DTYPES else torch.float32
    weight = lambda *shape: torch.empty(*shape, **meta, dtype=state_dtype)  # noqa: E731
    states = MemoryWeights(weight(heads, batch, chunks, d, 4 * d),
                           weight(heads, batch, chunks, 4 * d, d), empty(heads, batch, chunks, d))
    merged = lambda: empty(batch, chunks * length, heads * d).view(  # noqa: E731
        batch, -1, heads, d).permute(2, 0, 1, 3)
    proj = empty(batch, chunks * length, heads, 2 * d).permute(2, 0, 1, 3).unflatten(
        2, (chunks, length))
    token_lr = empty(batch, chunks * length, heads).permute(2, 0, 1).unflatten(2, (chunks, length))
    per_chunk = (heads, batch * chunks)
    with inspect.recording_launches(arch) as launches:
        launch_read_backward(states, merged(), merged(), merged(), length, operand_dtype,
                             None, None, None, None)
        _chunk_grads_backward(empty(heads, d, 4 * d), empty(heads, 4 * d, d), empty(heads, d),
                              proj[..., :d], proj[..., d:], token_lr,
                              weight(*per_chunk, d, 4 * d), weight(*per_chunk, 4 * d, d),
                              empty(*per_chunk, d), operand_dtype, None, None)
        # w1's scan: (H B, U, d 4d) gradients, U + 1 states
        rows, size = heads * batch, d * 4 * d
        _scan_backward(weight(rows, chunks - 1, size), empty(rows, chunks - 1),
                       empty(rows, chunks - 1), empty(rows, chunks - 1), empty(rows, size),
                       weight(rows, chunks, size), weight(rows, chunks, size))
        # the projections of 15 written chunks of the 16, cotangents as autograd gives them
        tokens, updates = (chunks - 1) * length, chunks - 1
        _project_backward(empty(batch, chunks * length, d), empty(4 * d + heads, d),
                          empty(d + heads), empty(2 * heads, d // heads),
                          empty(batch, updates, d), empty(batch, updates, d), merged(),
                          empty(heads, batch, tokens, d), empty(heads, batch, tokens, d),
                          empty(heads, batch, tokens), empty(batch, updates, d),
                          updates, length, 1.0, operand_dtype, None)
    cols = next(x for x in launches if x.kernel.__name__ == 'grads_backward_cols_kernel')
    half = '*bf16' if operand_dtype == torch.bfloat16 else '*fp16'
    # the rows pass's 16-bit copy of the keys; the states' cotangents as trained
    signature = inspect.launch_specialization(cols, arch)[0]
    assert signature['k_ptr'] == half
    assert signature['bw1_ptr'] == ('*bf16' if state_dtype == torch.bfloat16 else '*fp32')
    # the read's rows pass: 64-row blocks (32 on sm_90, ``kernel_tiles.row_limit``),
    # then 16 rows for each chunk's last 4
    block = 32 if arch >= 90 else 64
    rows = [x for x in launches if x.kernel.__name__ == 'read_backward_rows_kernel']
    assert [(x.kwargs['BM'], x.grid) for x in rows] == [(block, (128 * 16 * (192 // block), )),
                                                        (16, (128 * 16, ))]
    reports = inspect.launch_reports(launches, arch)
    assert sorted(r.kernel for r in reports) == [
        'grads_backward_cols_kernel', 'grads_backward_rows_kernel', 'project_backward_kernel',
        'read_backward_cols_kernel', 'read_backward_rows_kernel', 'read_backward_rows_kernel',
        'scan_backward_kernel']
    for report in reports:
        assert report.shared <= 163 * 1024 and report.spill_stores == 0, report
        if report.kernel != 'scan_backward_kernel':  # element-wise
            assert report.mma != 'none', report
        if report.kernel == 'read_backward_cols_kernel':
            assert (report.wgmma > 0) == (arch >= 90), report
    # its 16- and 32-row blocks are below wgmma's least
    assert not any(r.wgmma for r in reports if r.kernel == 'read_backward_rows_kernel')


@pytest.mark.slow  # a flag's variant of the kernels the tests above compile
def test_the_tanh_form_of_gelu_compiles_as_launched_for_a_training_step():
    """``gelu_approximate='tanh'``: a training step of M3's stage-1 memory
    (forward and backward, bf16, sm_90) launches every GELU kernel with the
    tanh form, and each compiles without spills, on tensor cores."""
    inspect = _inspect()
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=196, implementation='triton', operand_dtype='bfloat16',
                          gelu_approximate='tanh').train().to('meta')
    with inspect.recording_launches(90) as launches:
        memory(torch.empty(128, 3136, 128, device='meta', requires_grad=True)).sum().backward()
    gelu_kernels = ['grads_backward_cols_kernel', 'grads_backward_rows_kernel',
                    'grads_cols_kernel', 'grads_rows_kernel', 'read_backward_cols_kernel',
                    'read_backward_rows_kernel', 'read_kernel']
    gelu = [x for x in launches if x.kernel.__name__ in gelu_kernels]
    assert sorted({x.kernel.__name__ for x in gelu}) == gelu_kernels
    assert all(x.kwargs.get('GELU_TANH') is True for x in gelu)  # every launch of each
    assert not any('GELU_TANH' in x.kwargs for x in launches if x not in gelu)
    for report in inspect.launch_reports(gelu, 90):
        assert report.shared <= 163 * 1024 and report.spill_stores == 0, report
        assert report.mma != 'none', report


def test_compile_reports_tell_specializations_apart():
    """A kernel compiled without its launch's hints differs from the launch's:
    the report sees what a hand-written signature would miss."""
    inspect, launches = _stage_launches(128, torch.bfloat16, 90)
    launch = next(x for x in launches if x.kernel.__name__ == 'grads_rows_kernel')
    signature, constants, attrs, options = inspect.launch_specialization(launch, 90)
    launched = inspect.compile_for(90, launch.kernel, signature, constants, attrs, options)
    plain = inspect.compile_for(90, launch.kernel, signature, constants, None, options)
    assert (launched.registers, launched.spill_stores) != (plain.registers, plain.spill_stores)


@pytest.mark.slow
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('d', [80, 160])
@pytest.mark.parametrize('operand_dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_compile_for_every_width_and_dtype(arch, d, operand_dtype):
    reports = _compile_stage(d, operand_dtype, arch, batch=2, tokens=784)
    # at 2 images a chunk's projections take several programs, merged in one launch
    assert {r.kernel for r in reports} == set(KERNEL_NAMES + SCAN_LAUNCHES + ['pool_merge_kernel'])
    if operand_dtype != torch.float32:  # max_lr 1e-3: the decomposed read
        reports = _compile_stage(d, operand_dtype, arch, batch=2, tokens=784, max_lr=1e-3)
        assert 'read_kernel' in [r.kernel for r in reports]


def _stage1_memory(d: int, train: bool):
    """A bf16 memory of width ``d`` through the kernels on meta tensors, and
    an input at stage 1 (batch 128, 3136 tokens)."""
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(d, chunk_size=196, implementation='triton',
                          operand_dtype='bfloat16').to('meta').train(train)
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
    and its backward in two column blocks, products of 32 output features,
    both without spills."""
    from convneur_mm.models.layers.memory_ops.project.triton import PROJECTION_SPLIT
    launches, reports = _m4_stage1_launches(arch, train, chosen)
    tiles = ('BD', 'BE', 'BHD', 'BHE', 'BM', 'BK')
    projections = [tuple(x.kwargs.get(k) for k in tiles) for x in launches
                   if x.kernel.__name__.startswith('project')]
    rows, features = PROJECTION_SPLIT[(128, 32)]
    assert projections == [(128, 32, 128, 32, rows, features)] + (
        [(128, 32, 128, 32, 16, None)] if train else [])
    table = kernel_tiles.SPLIT_TILES[(128, 32)][arch]
    tiled = [x for x in launches
             if x.kernel.__name__[:-len('_kernel')] in kernel_tiles.KERNEL_NAMES]
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
        # the one-program kernels are chosen only where a GPU timed them faster
        bound = {('grads_backward_chunk_kernel', 90): 16, ('grads_backward_chunk_kernel', 80): 24,
                 ('read_backward_chunk_kernel', 80): 32,
                 ('read_backward_cols_kernel', 80): 112}.get((report.kernel, arch), 0)
        assert report.spill_stores <= bound and report.shared <= 163 * 1024, report
        if arch >= 90 and report.kernel in ('read_kernel', 'grads_rows_kernel',
                                            'grads_cols_kernel') and report.wgmma == 0:
            # only the read's tail launch (16-row blocks) is below wgmma's least
            assert report.kernel == 'read_kernel', report


@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
def test_m4_inference_kernels_compile_in_two_column_blocks_on_sm_90():
    """M4's 160 columns as 128 + 32: the read and the chunk gradients' two
    passes take 64-row tiles on wgmma without spills, where one block of
    256 columns took 16-row tiles on mma.sync; the projections 32-row tiles
    (16 in one block)."""
    _check_split_compiles(90, train=False)


@pytest.mark.slow
@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('one_program', [False, True])
def test_m4_training_kernels_compile_at_their_split_tiles(arch, one_program):
    _check_split_compiles(arch, train=True,
                          chosen=tuple(kernel_tiles.REPLACES) if one_program else ())


@pytest.mark.slow
@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
def test_one_program_per_chunk_compiles_without_spills_at_its_default_tiles(arch):
    """The chunk gradients' one program per chunk, forward and backward, and
    the read's backward as one program per state, in a bf16 training step at
    M3's stage 1, compiled as launched."""
    _, reports = _stage1_reports(arch, 0, chosen=tuple(kernel_tiles.REPLACES))
    merged = {kernel: report for (kernel, _), report in reports.items()
              if kernel.endswith('chunk_kernel')}
    assert set(merged) == {'grads_chunk_kernel', 'grads_backward_chunk_kernel',
                           'read_backward_chunk_kernel'}
    for kernel, (registers, spills, shared) in merged.items():
        assert spills == 0 and shared <= 163 * 1024, (kernel, registers, spills, shared)


@pytest.mark.slow
@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
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


@pytest.mark.slow
@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('d', [128, 160])
def test_exact_queries_compile_without_spills(arch, d):
    """A decomposed read's projections (float32 queries beside bf16 others)
    at the COCO and ADE20K configs' chunks, as launched: ``EXACT_QUERY_TILES``."""
    inspect = _inspect()
    from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights,
                                                              project_triton, projection_shapes)
    weights = ProjectionWeights(*(torch.empty(shape, device='meta')
                                  for shape in projection_shapes(d, 1)))
    x = torch.empty(2, 4096, d, device='meta')
    with torch.no_grad(), inspect.recording_launches(arch) as launches:
        project_triton(x, weights, 4, 1024, 1e-3, torch.bfloat16, exact_queries=True)
    # the weights folded in one launch (exact queries: float32); a chunk's rows in
    # several programs at 2 images, their pooled rows merged in one launch
    assert [x.kernel.__name__ for x in launches] == ['fold_kernel', 'project_kernel',
                                                     'pool_merge_kernel']
    launches = launches[1:2]
    assert [(x.kwargs['BM'], x.kwargs['QBK']) for x in launches] == [
        (16, 32) if d == 160 else (32, 16)]
    report, = inspect.launch_reports(launches, arch)
    assert report.spill_stores == 0 and report.shared <= 163 * 1024, report


# a decomposed read's spill stores per thread, as COCO's and ADE20K's bf16 training
# steps launch it, where not 0: its backward's columns pass on sm_80 (M4's in one
# padded block of 256 with two products per weight spilled 6520 B)
DECOMPOSED_SPILLS = {(160, 80): {'read_backward_cols_kernel': 276},
                     (128, 80): {'read_backward_cols_kernel': 24}}


@pytest.mark.slow
@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('d', [128, 160])
def test_a_decomposed_read_compiles_as_launched(arch, d):
    """The Semantic FPN M3's and UperNet M4's bf16 training step (max_lr 0.2:
    a decomposed read, its whole states formed in float32 registers), M4's
    rows in two column blocks: no spills but the recorded ones."""
    inspect = _inspect()
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(d, chunk_size=1024, max_lr=0.2, implementation='triton',
                          operand_dtype='bfloat16').train().to('meta')
    x = torch.empty(2, 4096, d, device='meta', requires_grad=True)
    with inspect.recording_launches(arch) as launches:
        out = memory(x)
        out.backward(torch.empty_like(out))
    reads = [x for x in launches if x.kernel.__name__.startswith('read')]
    assert {(x.kernel.__name__, x.kwargs['BE'], x.kwargs['BM']) for x in reads} == {
        (name, 32 if d == 160 else 0, 16) for name in (
            'read_kernel', 'read_backward_rows_kernel', 'read_backward_cols_kernel')}
    for report in inspect.launch_reports(reads, arch):
        bound = DECOMPOSED_SPILLS.get((d, arch), {}).get(report.kernel, 0)
        assert report.spill_stores <= bound and report.shared <= 163 * 1024, report
