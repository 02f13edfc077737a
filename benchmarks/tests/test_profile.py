"""The kernel profile's summary, its costs and rooflines, and its cases (CPU)."""
import json
import math

import pytest
import torch

from benchmarks import run
from benchmarks.kernels import profile as kp
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested

# a made-up card whose ceilings make both bounds easy to tell apart
PEAK = kp.DevicePeak('test card', bandwidth=1e9, half_flops=4e9, float_flops=1e9)


def _matmuls(a, b):
    return lambda: (a @ b).relu()


def test_cost_counter_counts_products_flops_and_their_operand_width():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    costs = kp.count_costs(_matmuls(a, b))
    mm = costs['aten::mm']
    assert mm.flops == 2 * 8 * 16 * 4 and mm.half_flops == 0
    assert mm.bytes == (a.numel() + b.numel() + 8 * 4) * 4  # each tensor once
    assert costs['aten::relu'].flops == 0 and costs['aten::relu'].bytes > 0
    half = kp.count_costs(_matmuls(a.bfloat16(), b.bfloat16()))['aten::mm']
    assert half.half_flops == half.flops == mm.flops


def test_cost_counter_counts_a_16_bit_product_into_float32():
    """bmm.dtype, which the memory's products run on CUDA in inference: its
    output dtype is no argument of torch's FLOP formula."""
    a, b = (torch.empty(3, 8, 16, device='meta', dtype=torch.bfloat16),
            torch.empty(3, 16, 4, device='meta', dtype=torch.bfloat16))
    costs = kp.count_costs(lambda: torch.ops.aten.bmm.dtype(a, b, torch.float32))
    assert costs['aten::bmm'].flops == costs['aten::bmm'].half_flops == 2 * 3 * 8 * 16 * 4
    assert costs['aten::bmm'].bytes == (a.numel() + b.numel()) * 2 + 3 * 8 * 4 * 4


def test_roofline_takes_the_slower_of_bytes_and_products():
    bytes_bound = kp.OpCost(bytes=10**9, flops=10**6, half_flops=0)
    assert bytes_bound.roofline_s(PEAK) == pytest.approx(1.0)
    mixed = kp.OpCost(bytes=1, flops=3 * 10**9, half_flops=2 * 10**9)
    assert mixed.roofline_s(PEAK) == pytest.approx(2e9 / 4e9 + 1e9 / 1e9)


def test_device_peak_reads_the_card_name(monkeypatch):
    for name, expected in (('NVIDIA H200', 'H200'), ('NVIDIA H100 80GB HBM3', 'H100 SXM'),
                           ('NVIDIA H100 PCIe', None), ('NVIDIA H200 NVL', None),
                           ('NVIDIA GeForce RTX 3090', None)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device, name=name: name)
        peak = kp.device_peak('cuda')
        assert (peak.name if peak else None) == expected
    assert kp.device_peak('cpu') is None


def test_profile_summary_adds_up_and_prices_the_named_ops(tmp_path):
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    fn = _matmuls(a, b)
    costs = kp.count_costs(fn)
    trace = tmp_path / 'trace.json'
    summary = kp.profile_kernels(fn, device='cpu', warmup=1, top=2, repeats=2, costs=costs,
                                 peak=PEAK, trace_path=str(trace))
    assert summary['activity'] == 'cpu' and len(summary['kernels']) == 2
    assert 0 < summary['listed_ms'] <= summary['total_ms'] + 1e-9
    assert summary['listed_ms'] == pytest.approx(sum(r['ms'] for r in summary['kernels']))
    assert [r['ms'] for r in summary['kernels']] == sorted(
        (r['ms'] for r in summary['kernels']), reverse=True)
    assert all(0 <= r['share'] <= 1 for r in summary['kernels'])
    priced = {r['name']: r['roofline_ms'] for r in summary['ops']}
    assert priced['aten::mm'] == pytest.approx(costs['aten::mm'].roofline_s(PEAK) * 1e3)
    call = summary['call']
    assert call['flops'] == sum(c.flops for c in costs.values())
    assert call['roofline_ms'] == pytest.approx(kp.total_cost(costs).roofline_s(PEAK) * 1e3)
    assert call['over_roofline'] == pytest.approx(summary['total_ms'] / call['roofline_ms'])
    assert json.loads(trace.read_text())  # a Chrome trace
    json.dumps(summary)  # JSON-able for the GPU script
    table = kp.format_table(summary)
    assert '| aten::' in table and 'roofline' in table


def test_profile_refuses_bad_counts():
    with pytest.raises(ValueError, match='at least 1'):
        kp.profile_kernels(lambda: None, device='cpu', top=0)


@pytest.mark.parametrize('case', ['torch', 'training'])
def test_branch_cases_profile_on_the_cpu(case):
    summary = kp.profile_case(case, device='cpu', batch=1, size=64, warmup=0, top=25)
    assert summary['case'] == case and 'M3' in summary['note']
    assert len(summary['kernels']) <= 25
    assert summary['listed_ms'] <= summary['total_ms'] + 1e-9
    assert summary['call']['flops'] > 0 and summary['call']['roofline_ms'] is None  # no peak
    assert math.isfinite(summary['total_ms']) and summary['total_ms'] > 0
    if case == 'training':  # the backward's ops are in the profile
        assert any('backward' in row['name'].lower() for row in summary['kernels'] +
                   summary['ops'])


def test_branch_inputs_follow_the_stages():
    branches = kp.global_branches('cpu')
    assert [stage for stage, _ in branches] == [0, 1, 2, 3]
    inputs = kp.branch_inputs(branches, batch=2, size=224)
    assert [tuple(x.shape[2:]) for x in inputs] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [x.shape[1] for x in inputs] == [b.proj_in.in_channels for _, b in branches]


def test_triton_case_needs_cuda_and_unknown_cases_are_refused():
    for case in ('triton', 'training_triton', 'triton_m4', 'triton_m4_one_block'):
        with pytest.raises(ValueError, match='CUDA'):
            kp.profile_case(case, device='cpu', batch=1)
    with pytest.raises(ValueError, match='case must be one of'):
        kp.profile_case('fused', device='cpu', batch=1)


def test_the_memory_operators_are_priced_by_the_kernels_they_launch():
    """Counted as an operator, a kernel call has bytes but no FLOPs:
    ``with_kernel_costs`` puts each of its kernels in its place, by the name
    the profiler gives it (a compiler's suffix allowed)."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
    meta = lambda *shape: torch.empty(shape, device='meta')  # noqa: E731
    weights = MemoryWeights(meta(1, 32, 128), meta(1, 128, 32), meta(1, 32))
    keys = meta(1, 4, 40, 32)

    def call():
        with torch.no_grad():
            chunk_grads_triton(weights, keys, keys, keys[..., 0], torch.bfloat16)

    costs = kp.count_costs(call)
    operator = costs['convneur_mm::memory_chunk_grads']
    assert operator.bytes > 0 and operator.flops == 0
    priced = kp.with_kernel_costs(call, costs, 'meta')
    assert not any(name.startswith(kp.CUSTOM_OPS_PREFIX) for name in priced)
    assert {'grads_rows_kernel', 'grads_cols_kernel'} <= set(priced)
    assert priced['grads_cols_kernel'].half_flops == 4 * 2 * 32 * 128 * 4 * 40
    assert {k: v for k, v in priced.items() if k.startswith('aten::')} == {
        k: v for k, v in costs.items() if k.startswith('aten::')}
    rows = [dict(name='grads_cols_kernel'), dict(name='grads_rows_kernel_0d1d2d'),
            dict(name='grads_backward_rows_kernel')]
    kp._price(rows, priced, PEAK)
    assert rows[0]['roofline_ms'] == pytest.approx(
        priced['grads_cols_kernel'].roofline_s(PEAK) * 1e3)
    assert rows[1]['roofline_ms'] == pytest.approx(
        priced['grads_rows_kernel'].roofline_s(PEAK) * 1e3)
    assert rows[2]['roofline_ms'] is None  # not the rows kernel's cost


def test_kernel_rooflines_list_each_stages_kernels_without_a_gpu(capsys):
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    rows = run.main(['rooflines', '--batch', '2', '--peak', 'H100 SXM'])['rows']
    by_stage = {}
    for row in rows:
        by_stage.setdefault(row['stage'], set()).add(row['kernel'])
        assert row['roofline_ms'] > 0 and row['bound'] in ('bytes', 'products')
    # stages 1 and 2 write chunks; 3 and 4 (one chunk each) only read W_0; at batch 2
    # a chunk's projections take several programs, whose pooled rows one launch merges;
    # inference folds the projections' weights in one launch
    assert by_stage[1] == by_stage[2] == {'fold_kernel', 'project_kernel', 'pool_merge_kernel',
                                          'gates_kernel', 'grads_rows_kernel',
                                          'grads_cols_kernel', 'scan_kernel', 'read_kernel'}
    assert by_stage[3] == by_stage[4] == {'fold_kernel', 'project_kernel', 'read_kernel'}
    out = capsys.readouterr().out
    assert '| 1 | grads_cols_kernel |' in out and "at H100 SXM's peak" in out
    # a training step records its backward kernels too, on meta tensors
    training = run.main(['rooflines', '--training', '--batch', '2'])['rows']
    stage1 = {r['kernel']: r for r in training if r['stage'] == 1}
    # training differentiates PyTorch's fold
    assert set(stage1) == by_stage[1] - {'fold_kernel'} | {
        'project_backward_kernel', 'grads_backward_rows_kernel', 'grads_backward_cols_kernel',
        'scan_backward_kernel', 'read_backward_rows_kernel', 'read_backward_cols_kernel'}
    # 14 products per written row against the forward's 2
    rows_pass = [r for r in rows if r['stage'] == 1 and r['kernel'] == 'grads_rows_kernel'][0]
    assert stage1['grads_backward_rows_kernel']['gflop'] == pytest.approx(
        7 * rows_pass['gflop'])
    assert stage1['grads_rows_kernel']['gflop'] == rows_pass['gflop']  # recorded once
    # one program per chunk (the chunk gradients', the read's backward): the two passes'
    # FLOPs, fewer bytes
    merged = {r['kernel']: r for r in run.main(['rooflines', '--training', '--one-program',
                                                '--batch', '2'])['rows'] if r['stage'] == 1}
    for kernel, replaced in (('grads_chunk_kernel', ('grads_rows_kernel', 'grads_cols_kernel')),
                             ('grads_backward_chunk_kernel', ('grads_backward_rows_kernel',
                                                              'grads_backward_cols_kernel')),
                             ('read_backward_chunk_kernel', ('read_backward_rows_kernel',
                                                             'read_backward_cols_kernel'))):
        assert not set(replaced) & set(merged)
        assert merged[kernel]['gflop'] == pytest.approx(sum(stage1[k]['gflop'] for k in replaced))
        assert merged[kernel]['gb'] < sum(stage1[k]['gb'] for k in replaced)


def test_kernel_rooflines_take_a_real_configs_shapes(capsys):
    """``--job``: the config's backbone, memory settings, per-GPU batch and
    largest training image (COCO's 800x1333 at chunks of 4096)."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    assert kp.job_shapes('cascade-m3') == dict(
        arch='m3', memory_cfg=dict(chunk_size=4096, max_lr=1e-3), batch=2, size=(800, 1333))
    rows = run.main(['rooflines', '--job', 'fpn-m3', '--batch', '1'])['rows']
    assert 'fpn-m3: ConvNeur-M3, batch 1 at 512x512' in capsys.readouterr().out
    # 128 x 128 tokens at stage 1 in chunks of 1024: 16 chunks, the write's kernels run
    assert {'grads_rows_kernel', 'scan_kernel'} <= {r['kernel'] for r in rows if r['stage'] == 1}


def test_kernel_rooflines_count_a_padded_width_by_its_true_columns():
    """M4's C_m 160 runs in column blocks of 128 + 32 (one of 256 in the
    profile's one-block case); its roofline counts 160, so the profile's M4
    cases against M3's show what the width costs."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    flops = {arch: {r['kernel']: r['gflop'] for r in kp.kernel_rooflines(batch=2, arch=arch)
                    if r['stage'] == 1} for arch in ('m3', 'm4')}
    for kernel in ('grads_rows_kernel', 'grads_cols_kernel', 'read_kernel'):
        # the same tokens at stage 1; 2·d·4d FLOPs per product and row
        assert flops['m4'][kernel] == pytest.approx(flops['m3'][kernel] * (160 / 128)**2)
    assert 'triton_m4' in kp.CASES


def test_a_failure_to_price_the_kernels_leaves_the_profile_running(monkeypatch):
    def broken(call, costs, device):
        raise AttributeError("'JITFunction' object has no attribute 'arg_names'")

    monkeypatch.setattr(kp, 'with_kernel_costs', broken)
    costs = {'aten::mm': kp.OpCost(1, 2, 0)}
    got, note = kp._priced_kernels(lambda: None, costs, 'cuda', 'the case')
    assert got == costs and note.startswith('the case; kernels not priced (AttributeError')


@pytest.mark.parametrize('name, short', [
    ('void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, '
     'float, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, '
     'at::native::BinaryFunctor<float, float, float, at::native::binary_internal::MulFunctor'
     '<float> >, std::array<char*, 3ul>)', 'vectorized: MulFunctor<float>'),
    ('void at::native::unrolled_elementwise_kernel<at::native::GeluBackwardCUDAKernelImpl('
     'at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::'
     '{lambda(c10::BFloat16, c10::BFloat16)#1}, std::array<char*, 3ul>, 4>(int, ...)',
     'unrolled: GeluBackwardCUDAKernelImpl (BFloat16, BFloat16)'),
    ('void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::'
     'direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::'
     '{lambda()#7}::operator()() const::{lambda(float)#1}>(at::TensorIteratorBase&, ...)::'
     '{lambda(int)#1}>(int, ...)', 'elementwise: direct_copy_kernel_cuda (float)'),
    ('void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, at::native::'
     'func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()('
     'at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4> >(...)',
     'reduce: sum_functor<float, float, float> (float, float)'),
    ('void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>'
     '(int, float, float const*)', 'vectorized_layer_norm_kernel<float, float, false>'),
    ('void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float, float, '
     'float, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 2ul> >(int, ...)',
     'vectorized: MulFunctor<float> by a scalar'),
    ('void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::'
     'where_kernel_impl(at::TensorIterator&)::{lambda()#1}::operator()() const::{lambda()#7}::'
     'operator()() const::{lambda(bool, float, float)#1}, std::array<char*, 4ul> >(int, ...)',
     'vectorized: where_kernel_impl (bool, float, float)'),
    ('void gemmSN_TN_kernel<float, 128, 16, 2, 4, 8, 9, false, cublasGemvTensorStridedBatched'
     '<float const> >(cublasGemmSmallNParams<float>)',
     'gemmSN_TN_kernel<float, 128, 16, 2, 4, 8, 9, false, cublasGemvTensorStridedBatched'
     '<float const> >'),
    ('read_kernel', 'read_kernel'),
    ('Memcpy DtoD (Device -> Device)', 'Memcpy DtoD'),
])
def test_kernel_names_are_shortened_to_the_work_they_do(name, short):
    assert kp.short_kernel_name(name) == short

