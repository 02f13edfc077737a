"""The ImageNet per-GPU memory estimate that sets the configs'
per-GPU batch: its arithmetic, and one measurement at a small size."""
import pytest

from ..paths import import_analysis_tool

memory = import_analysis_tool('imagenet_memory')
MIB, GIB = 2**20, 2**30


@pytest.mark.parametrize('per_image_mib,expected', [(100, 128), (240, 64), (400, 32)])
def test_batch_is_the_largest_power_of_two_that_fits(per_image_mib, expected):
    fixed, gpu, reserve = 300 * MIB, 24 * GIB, 3 * GIB
    batch = memory.fitting_batch(per_image_mib * MIB, fixed, gpu, reserve)
    assert batch == expected
    assert fixed + reserve + batch * per_image_mib * MIB <= gpu
    assert fixed + reserve + 2 * batch * per_image_mib * MIB > gpu


def test_estimate_counts_activations_and_adamw_state():
    small = memory.estimate('m1', batch=1, size=64)
    assert small['fixed'] == 16 * small['params'] and 4e6 < small['params'] < 5e6
    assert 0 < small['saved_per_image'] < small['per_image']  # + the largest block's transient
    # activations grow with the pixels: 4x the pixels, more than twice the bytes
    bigger = memory.estimate('m1', batch=1, size=128)
    assert 2 < bigger['saved_per_image'] / small['saved_per_image'] < 5


# m3 and m4 (30-50 s each on 2 cores) are `slow` tests
@pytest.mark.parametrize('arch', ['m1', 'm2', *(pytest.param(a, marks=pytest.mark.slow)
                                              for a in ('m3', 'm4'))])
def test_configs_train_the_batch_the_estimate_fits(arch):
    """Each ImageNet config's per-GPU batch is the tool's for a 24 GiB GPU
    (measured under the CUDA fp16 stand-in), and 8 GPUs x batch x
    accumulation is the paper's 4096."""
    from convneur_mm.apis.launch import load_config
    cfg = load_config(f'cls_convneur_{arch}_300e_in1k.py')
    batch = cfg.train_dataloader.batch_size
    assert 8 * batch * cfg.optim_wrapper.accumulative_counts == memory.PAPER_BATCH
    assert cfg.auto_scale_lr.base_batch_size == 8 * batch
    e = memory.estimate(arch)
    assert memory.fitting_batch(e['per_image'], e['fixed'], 24 * GIB, 3 * GIB) == batch
