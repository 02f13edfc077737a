"""convneur_mm/analysis/fp16_headroom.py: the largest float16 gradients of a
step, and the loss scale they allow."""
import math
import os.path as osp

import pytest
import torch
from torch import nn

from convneur_mm.demo_data.imagenet import generate_imagenet_tiny
from convneur_mm.analysis.fp16_headroom import (Float16Gradients, cuda_fp16_stand_in,
                                                cuda_layer_norm_rule, format_step,
                                                loss_scale_bound, measure_headroom)
from ..paths import REPO


def test_loss_scale_bound():
    assert loss_scale_bound(1.0) == 2 ** 15  # 65504 / 1 = 2**15.999
    assert loss_scale_bound(7.64) == 2 ** 13
    assert loss_scale_bound(65504.0) == 1
    assert loss_scale_bound(4e4) == 1
    assert loss_scale_bound(7e4) == loss_scale_bound(math.inf) == 0
    assert loss_scale_bound(0.0) == math.inf


def test_the_stand_in_runs_products_in_float16_and_layer_norm_in_float32():
    linear, norm = nn.Linear(8, 8), nn.LayerNorm(8)
    with cuda_fp16_stand_in():
        hidden = linear(torch.randn(2, 8))
        out = norm(hidden)
    assert (hidden.dtype, out.dtype) == (torch.float16, torch.float32)
    assert norm(hidden.float()).dtype == torch.float32 and not torch.is_autocast_enabled('cpu')


def test_records_the_float16_gradients_of_tensors_and_parameters():
    """Under fp16 autocast: both linear layers' outputs and GELU's are
    float16, their gradients recorded under module:op; both linear layers'
    parameters are float16-computed, the LayerNorm's (float32 under autocast)
    are not. The values are the float32 gradients, to float16 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.LayerNorm(4))
    x = torch.randn(32, 8)
    upstream = torch.randn(32, 4) * 100

    def step(amp: bool):
        model.zero_grad()
        recorder = Float16Gradients(model)
        with recorder.recording(), cuda_layer_norm_rule(), \
                torch.autocast('cpu', dtype=torch.float16, enabled=amp):
            hidden = model[:3](x)
            out = model[3](hidden)
        assert out.dtype == torch.float32  # the LayerNorm rule of CUDA's autocast
        hidden.retain_grad()
        (out * upstream).sum().backward()
        return recorder.headroom(top=10), hidden.grad

    want_params = {f'{name}': p for name, p in model.named_parameters()}
    _, want_hidden = step(amp=False)
    want = {name: p.grad.abs().max().item() for name, p in want_params.items()}
    headroom, _ = step(amp=True)
    params = dict(headroom.parameters)
    assert set(params) == {'0.weight', '0.bias', '2.weight', '2.bias'}
    for name, value in params.items():
        assert value == pytest.approx(want[name], rel=1e-2)
    tensors = dict(headroom.tensors)
    assert {'0:linear', '1:gelu', '2:linear'} <= set(tensors)
    assert tensors['2:linear'] == pytest.approx(want_hidden.abs().max().item(), rel=1e-2)
    name, value = headroom.largest
    assert value == max(max(tensors.values()), max(params.values()))
    assert headroom.bound == loss_scale_bound(value)


def test_non_finite_gradients_come_first():
    """A NaN gradient ranks as inf, above a large finite one elsewhere (NaN
    compares false with everything, so it had sorted anywhere)."""
    branches = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    recorder = Float16Gradients(branches)
    x = torch.randn(2, 4)
    with recorder.recording(), torch.autocast('cpu', dtype=torch.float16):
        outs = [branch(x) for branch in branches]
    nan_upstream = torch.ones(2, 4)
    nan_upstream[0, 0] = float('nan')
    ((outs[0].float() * nan_upstream).sum() + (outs[1].float() * 1e3).sum()).backward()
    headroom = recorder.headroom()
    tensors, params = dict(headroom.tensors), dict(headroom.parameters)
    assert set(tensors) == {'0:linear', '1:linear'}
    assert tensors['1:linear'] == pytest.approx(1e3)  # finite, and large
    assert headroom.tensors[0] == ('0:linear', math.inf)
    assert headroom.parameters[0][1] == math.inf and headroom.parameters[0][0].startswith('0.')
    assert math.isfinite(params['1.weight']) and params['1.weight'] > 1
    assert headroom.largest[1] == math.inf and headroom.bound == 0


def test_nothing_is_recorded_in_float32():
    model = nn.Linear(4, 4)
    recorder = Float16Gradients(model)
    with recorder.recording():
        model(torch.randn(2, 4)).sum().backward()
    assert recorder.headroom() == ([], []) and recorder.headroom().bound == math.inf


def test_the_classification_demo(tmp_path):
    """The CPU stand-in on ConvNeur-M1's demo config: a bound is found, and
    neither the stem nor a global branch's input projection (float32 under
    autocast since they held the COCO detector's loss scale near 1) has a
    float16 gradient."""
    root = str(tmp_path / 'imagenet_tiny')
    generate_imagenet_tiny(root, train_per_class=1, val_per_class=1)
    config = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')
    lines = []
    result = measure_headroom(config, iters=1, device='cpu', batch=2, top=1000, cfg_options={
        'train_dataloader.dataset.data_root': root}, log=lines.append)
    assert 'CPU stand-in' in lines[0] and lines[1] == format_step(0, result['steps'][0])
    step = result['steps'][0]
    assert result['bound'] == step['bound'] == loss_scale_bound(step['largest'][1]) >= 1
    listed = [name for kind in ('tensors', 'parameters') for name, _ in step[kind]]
    assert any(name.startswith('backbone.stages.0') for name in listed), listed
    assert not [name for name in listed
                if name.startswith('backbone.downsample_layers.0') or 'proj_in' in name]
