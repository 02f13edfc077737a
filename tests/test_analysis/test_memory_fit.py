"""Training memory: the activation meter, what checkpointing saves, and the
ImageNet per-GPU batch estimate that sets the configs' per-GPU batch (its
arithmetic, and one measurement at a small size)."""
import pytest
import torch
from torch import nn

from convneur_mm.analysis import memory_fit as memory
from convneur_mm.analysis.memory_fit import SavedTensorMeter
from ..threads import one_thread

MIB, GIB = 2**20, 2**30


def test_meter_counts_unique_saved_storages_without_parameters():
    linear = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    with SavedTensorMeter(exclude=linear.parameters(), scopes={'linear': linear}) as meter:
        hidden = linear(x)  # saves x (and the weight: excluded)
        out = (hidden.sin() * hidden[:, :1]).sum()  # saves hidden, once, and a view of it
    assert meter.total_bytes == 2 * 64 * 256 * 4 + 64 * 256 * 4  # x, hidden, sin's product
    assert meter.by_scope == {'linear': 64 * 256 * 4}
    out.backward()
    assert x.grad is not None  # the hooks pass tensors through unchanged


def test_checkpointing_keeps_less_and_estimates_the_recomputed_block():
    with one_thread():
        rows = memory.checkpointing_rows('m1', 'cpu', batch=1, size=(64, 64), repeats=1,
                                         chunk_size=64)
    plain, cp = rows['False'], rows['True']
    assert cp['saved'] < plain['saved']
    assert 0 < plain['largest_block'] < plain['saved']
    assert cp['peak_estimate'] == cp['saved'] + plain['largest_block']
    assert plain['peak_estimate'] == plain['saved'] and all(r['time'] > 0 for r in rows.values())
    text = memory.checkpointing_report(rows, 1)
    assert '| False |' in text and '| True |' in text and 'with_cp keeps' in text


@pytest.mark.parametrize('per_image_mib,expected', [(100, 128), (240, 64), (400, 32)])
def test_batch_is_the_largest_power_of_two_that_fits(per_image_mib, expected):
    fixed, gpu, reserve = 300 * MIB, 24 * GIB, 3 * GIB
    batch = memory.fitting_batch(per_image_mib * MIB, fixed, gpu, reserve)
    assert batch == expected
    assert fixed + reserve + batch * per_image_mib * MIB <= gpu
    assert fixed + reserve + 2 * batch * per_image_mib * MIB > gpu


FIXED_ESTIMATE = dict(per_image=100 * MIB, saved_per_image=90 * MIB, fixed=300 * MIB,
                      params=300 * MIB / 16)


def test_no_batch_fits_a_small_gpu():
    """1 GiB with 3 GiB reserved: batch 0 and the peak of a batch of 1."""
    rows, _ = memory.imagenet_batches({'m1': FIXED_ESTIMATE}, gpu_gib=1)
    assert rows['m1']['batch'] == 0 and rows['m1']['peak_gib'] > 1
    assert 'none fits' in memory.imagenet_table(rows)


def test_a_global_batch_other_than_4096_is_a_warning():
    """3 GPUs x 128 x 10 is 3840."""
    rows, notes = memory.imagenet_batches({'m1': FIXED_ESTIMATE}, gpus=3)
    assert rows['m1']['batch'] == 128 and rows['m1']['accumulative_counts'] == 10
    assert rows['m1']['global_batch'] == 3840
    assert notes == ['warning: ConvNeur-M1: 3 GPUs x batch 128 x accumulative_counts 10 = '
                     'global batch 3840, not 4096 (the batch the configs\' learning rate is '
                     'for): scale the learning rate by 3840/4096 or use a GPU count whose '
                     'product with the batch divides it']
    rows, notes = memory.imagenet_batches({'m1': FIXED_ESTIMATE}, gpus=8)
    assert rows['m1']['global_batch'] == 4096 and not notes


def test_estimate_counts_activations_and_adamw_state():
    small = memory.imagenet_estimate('m1', batch=1, size=64)
    assert small['fixed'] == 16 * small['params'] and 4e6 < small['params'] < 5e6
    assert 0 < small['saved_per_image'] < small['per_image']  # + the largest block's transient
    # activations grow with the pixels: 4x the pixels, more than twice the bytes
    bigger = memory.imagenet_estimate('m1', batch=1, size=128)
    assert 2 < bigger['saved_per_image'] / small['saved_per_image'] < 5


# m2 to m4 (15-50 s each on 2 cores) are `slow` tests
@pytest.mark.parametrize('arch', ['m1', *(pytest.param(a, marks=pytest.mark.slow)
                                        for a in ('m2', 'm3', 'm4'))])
def test_configs_train_the_batch_the_estimate_fits(arch):
    """Each ImageNet config's per-GPU batch is the estimate's for a 24 GiB GPU
    (measured under the CUDA fp16 stand-in), and 8 GPUs x batch x
    accumulation is the paper's 4096."""
    from convneur_mm.apis.launch import load_config
    cfg = load_config(f'cls_convneur_{arch}_300e_in1k.py')
    batch = cfg.train_dataloader.batch_size
    assert 8 * batch * cfg.optim_wrapper.accumulative_counts == memory.PAPER_BATCH
    assert cfg.auto_scale_lr.base_batch_size == 8 * batch
    e = memory.imagenet_estimate(arch)
    assert memory.fitting_batch(e['per_image'], e['fixed'], 24 * GIB, 3 * GIB) == batch
