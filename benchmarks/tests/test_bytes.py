"""benchmarks/memory/bytes.py: the ATen ops, bytes and working set of a
global branch or a backbone; the bytes of the memory's training step, autograd
against the closed form and the Triton operators; and Inductor's own byte
count of compiled code."""
import pytest
import torch

from benchmarks.memory.bytes import (OWN_MODULES, PATHS, TRITON, InductorByteCounter, MemoryShape,
                                     _gpu_launches, as_installed, count_branch_step_bytes,
                                     count_compiled_branch_step_bytes, count_ops,
                                     count_projection_bytes, count_step_bytes, format_op_counts,
                                     kernel_cuts)
from convneur_mm.analysis.isolated import run_isolated
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.testing.dispatch_probes import AtenOpCounter
from tests.markdown import table_rows
from tests.paths import REPO


# ------------------------------------------------------------ op counts
def test_meta_tensors_count_what_the_cpu_counts():
    """``device='meta'`` (no data: a batch of 128 in seconds) dispatches the
    same ops with the same shapes as the CPU."""
    on_cpu, on_meta = (count_ops('m1', 0, 64, 2, device) for device in ('cpu', 'meta'))
    assert on_meta == on_cpu
    inference = on_meta['inference']
    assert inference['bytes'] == sum(inference['bytes_by_op'].values()) > 0
    assert set(inference['bytes_by_op']) <= set(inference['by_op'])


def test_an_older_backbone_gets_the_memory_keys_former_names():
    """``--before`` a checkout whose backbone takes ``matmul_dtype`` and
    ``kernels``: the counted memory_cfg reaches it under those names."""
    cfg = dict(operand_dtype='bfloat16', implementation='triton', recompute=True)
    older = ['matmul_dtype', 'kernels', 'recompute']
    assert as_installed(cfg, older) == dict(matmul_dtype='bfloat16', kernels='triton',
                                            recompute=True)
    assert as_installed(cfg, older + ['operand_dtype', 'implementation']) == cfg
    assert as_installed(cfg, None) == cfg
    # a backbone that takes neither name refuses the key by its new name
    assert as_installed(cfg, ['recompute']) == cfg


def test_the_fused_kernels_allocations_on_meta_tensors():
    """``implementation='triton'`` on meta: the wrappers allocate, nothing launches;
    the fused path holds less than the PyTorch path and has no autograd."""
    cfg = dict(operand_dtype='bfloat16')
    fused = count_ops('m1', 0, 64, 2, 'meta', dict(cfg, implementation='triton'))
    eager = count_ops('m1', 0, 64, 2, 'meta', dict(cfg, implementation='torch'))
    assert set(fused) == {'inference'}
    assert 0 < fused['inference']['peak_live_bytes'] < eager['inference']['peak_live_bytes']
    assert fused['inference']['kernels'] < eager['inference']['kernels']


def test_the_fused_path_counts_what_a_gpu_launches():
    """Recorded for an sm_90 GPU at batch 1: the projections' weights folded
    by one launch, their row groups merged by one, the gates one launch, and
    none of the PyTorch ops they replace (but W_0's casts)."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    cfg = dict(operand_dtype='bfloat16', implementation='triton')
    inference = count_ops('m1', 0, 64, 1, 'meta', cfg)['inference']
    aten, triton = inference['gpu_launches']
    assert triton == {'fold_kernel': 1, 'project_kernel': 1, 'pool_merge_kernel': 1,
                      'gates_kernel': 1, 'grads_rows_kernel': 1, 'grads_cols_kernel': 1,
                      'scan_kernel': 3, 'read_kernel': 2}
    assert aten == inference['kernels']
    assert not {'cat', 'add', 'logsumexp', 'exp', 'addmm', 'neg', 'log_sigmoid_forward',
                'sigmoid', 'clone'} & set(inference['by_op'])
    assert inference['by_op']['_to_copy'] == 2  # W_0's w1 and w2
    assert f'| {aten} + 11 = {aten + 11} |' in format_op_counts({'this tree': dict(
        inference=inference)})
    # a branch that reads W_0 only: no pooled rows, so their store-norm product
    # launches nothing (an empty result), and neither do the chunk gradients
    read_only = count_ops('m1', 3, 64, 1, 'meta', cfg)['inference']
    assert 'mul' not in read_only['by_op']
    assert set(read_only['gpu_launches'][1]) == {'fold_kernel', 'project_kernel', 'read_kernel'}


def test_an_empty_grid_counts_as_no_launch():
    """Triton's launcher skips a grid without programs, and so does the count."""
    pytest.importorskip('triton')
    if interpreter_requested():
        pytest.skip('this process runs Triton in its interpreter: launches are not recorded')
    from convneur_mm.models.layers.memory_ops.kernels.launcher import launch_config

    def call():
        kernels, _ = launch_config('scan', torch.float32, torch.device('meta'))
        kernels.scan_kernel[(0, )]()  # recorded, not run: no arguments needed
        kernels.scan_kernel[(2, )]()

    assert _gpu_launches(call) == (0, {'scan_kernel': 1})


def test_the_backbone_with_and_without_global_branches():
    backbone, local = (count_ops('m1', 0, 64, 2, 'meta', part=part)['inference']
                       for part in ('backbone', 'local-only'))
    branch = count_ops('m1', 0, 64, 2, 'meta')['inference']
    assert local['peak_live_bytes'] < backbone['peak_live_bytes']
    assert local['kernels'] + branch['kernels'] < backbone['kernels']


def test_bad_part_or_device_is_an_error():
    with pytest.raises(ValueError, match='part must be one of'):
        count_ops('m1', part='stem')
    with pytest.raises(ValueError, match="device must be 'cpu' or 'meta'"):
        count_ops('m1', device='cuda')


def test_report_and_kernel_cuts():
    new = count_ops('m1', 0, 64, 2, 'meta')
    old = {mode: dict(c, kernels=2 * c['kernels']) for mode, c in new.items()}
    assert kernel_cuts(old, new) == {'inference': 0.5, 'autograd': 0.5}
    rows = table_rows(format_op_counts({'before': old, 'this tree': new}, top=3))
    assert [r[0] for r in rows[1:3]] == ['before', 'this tree']
    assert rows[1][1] == str(old['inference']['kernels'])
    ops = rows[4:]  # after the second table's header
    assert len(ops) == 3 and ops[0][0] == next(iter(new['inference']['bytes_by_op']))


@pytest.mark.slow  # a whole op count in a child; test_isolated checks the isolation
def test_counting_ops_against_this_tree_as_a_checkout_counts_the_same():
    kwargs = dict(arch='m1', size=64, batch=2, device='meta')
    assert run_isolated(count_ops, kwargs, REPO, OWN_MODULES) == count_ops(**kwargs)


# ------------------------------------------------- a training step's bytes
def test_a_training_step_moves_fewer_bytes_with_the_closed_form():
    # M3's stages 1 and 3 at a small batch: writes and reads, and a read alone
    shapes = [MemoryShape(batch=2, tokens=56 * 56, chunk=196, heads=1, head_dim=128),
              MemoryShape(batch=2, tokens=14 * 14, chunk=196, heads=1, head_dim=128)]
    counts = count_step_bytes(shapes)
    assert 0 < sum(counts['closed form']) < sum(counts['autograd'])
    # the Triton operators' arguments and results: no (T, 4d) tensor among them
    assert 0 < sum(counts[TRITON]) < sum(counts['closed form']) / 4
    # 16-bit operands: the closed form casts each operand once, or writes it
    # 16-bit in the kernel that computes it; within 2% of float32's bytes
    float32 = sum(counts['closed form'])
    counts = count_step_bytes(shapes, torch.bfloat16)
    assert 0 < sum(counts['closed form']) < 0.9 * sum(counts['autograd'])  # 0.85 counted
    assert sum(counts['closed form']) < 1.02 * float32
    # the projections' step: the kernels save x only and write no (B, N, 4d + H) product
    counts = count_projection_bytes(shapes, torch.bfloat16)
    assert 0 < counts[TRITON][0] < counts['autograd'][0] / 8
    # whole branches, every stage's: the closed form moves fewer in float32
    steps = {backward: count_branch_step_bytes('m1', 128, 2, dict(operand_dtype='float32',
                                                                   backward=backward))
             for backward in ('autograd', 'closed_form')}
    assert len(steps['autograd']) == 4 and min(steps['autograd']) > 0
    assert sum(steps['closed_form']) < sum(steps['autograd'])
    # the kernels planned on meta tensors: their operators' fakes, autograd included
    kernels = count_branch_step_bytes('m1', 128, 2, dict(operand_dtype='float32',
                                                          implementation='triton'))
    assert 0 < sum(kernels) < sum(steps['autograd']) / 4


@pytest.mark.slow
def test_compiled_branches_move_fewer_bytes_than_eager_ones():
    # Inductor's fused kernels, by its own count, each stage's branch compiled
    for backward in ('autograd', 'closed_form'):
        cfg = dict(operand_dtype='float32', backward=backward)
        compiled = count_compiled_branch_step_bytes('m1', 128, 2, cfg)
        eager = count_branch_step_bytes('m1', 128, 2, cfg)
        assert len(compiled) == 4 and min(compiled) > 0
        assert sum(compiled) < 0.8 * sum(eager), backward


@pytest.mark.parametrize('operand_dtype', [None, torch.bfloat16])
def test_a_training_step_moves_fewer_bytes(operand_dtype):
    """M3's stage 1 at batch 2 (meta count): no zero-padded gradient per
    slice of the product, no concatenation of them."""
    shape = MemoryShape(batch=2, tokens=56 * 56, chunk=196, heads=1, head_dim=128)
    counts = count_projection_bytes([shape], operand_dtype)
    autograd, closed_form = (counts[path][0] for path in PATHS)
    assert 0 < closed_form < 0.7 * autograd


# ------------------------------------------------------ Inductor's count
def _chain(x: torch.Tensor) -> torch.Tensor:
    return (x * 2.0 + 1.0).relu()


def test_a_fused_chain_reads_its_input_and_writes_its_output_once():
    x = torch.randn(4096)
    with AtenOpCounter() as eager:
        _chain(x)
    assert eager.total_bytes == 3 * 2 * x.nbytes  # three kernels, each reads and writes
    for _ in range(2):  # the second compile is counted too (no cached graph)
        with InductorByteCounter() as counter:
            torch.compile(_chain)(x)
        assert counter.total_bytes == 2 * x.nbytes


def test_a_training_step_counts_the_backward_graph_too():
    x = torch.randn(4096, requires_grad=True)
    with InductorByteCounter() as forward:
        torch.compile(torch.sin)(x.detach())
    with InductorByteCounter() as step:
        torch.compile(torch.sin)(x).sum().backward()
    assert step.total_bytes > forward.total_bytes


def test_nothing_compiled_is_an_error_not_zero_bytes():
    with pytest.raises(RuntimeError, match='counted no bytes'):
        with InductorByteCounter():
            _chain(torch.randn(8))
