"""convneur_mm/analysis/op_counts.py: the ATen ops, bytes and working set of
a global branch or a backbone."""
import pytest

from benchmarks.memory.op_counts import count_ops, format_op_counts, kernel_cuts
from tests.markdown import table_rows


def test_meta_tensors_count_what_the_cpu_counts():
    """``device='meta'`` (no data: a batch of 128 in seconds) dispatches the
    same ops with the same shapes as the CPU."""
    on_cpu, on_meta = (count_ops('m1', 0, 64, 2, device) for device in ('cpu', 'meta'))
    assert on_meta == on_cpu
    inference = on_meta['inference']
    assert inference['bytes'] == sum(inference['bytes_by_op'].values()) > 0
    assert set(inference['bytes_by_op']) <= set(inference['by_op'])


def test_the_fused_kernels_allocations_on_meta_tensors():
    """``kernels='triton'`` on meta: the wrappers allocate, nothing launches;
    the fused path holds less than the PyTorch path and has no autograd."""
    cfg = dict(matmul_dtype='bfloat16')
    fused = count_ops('m1', 0, 64, 2, 'meta', dict(cfg, kernels='triton'))
    eager = count_ops('m1', 0, 64, 2, 'meta', dict(cfg, kernels='torch'))
    assert set(fused) == {'inference'}
    assert 0 < fused['inference']['peak_live_bytes'] < eager['inference']['peak_live_bytes']
    assert fused['inference']['kernels'] < eager['inference']['kernels']


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
