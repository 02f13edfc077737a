"""CpuSyncBatchNorm: two gloo processes with half batches = one BN over the whole."""
import torch
from torch import nn

from convneur_mm.engine.cpu_sync_bn import CpuSyncBatchNorm, convert_to_cpu_sync_bn
from .dist_utils import run_distributed


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 5, 5, generator=gen) * 3 + 1
    probe = torch.randn(8, 4, 5, 5, generator=gen)
    return x, probe


def _synced_half(rank, world_size):
    x, probe = _data()
    half = slice(rank * 4, rank * 4 + 4)
    torch.manual_seed(1)
    bn = CpuSyncBatchNorm(4).train()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    xs = x[half].clone().requires_grad_()
    out = bn(xs)
    (out * probe[half]).sum().backward()
    return dict(out=out.detach(), grad_x=xs.grad, grad_w=bn.weight.grad,
                running_mean=bn.running_mean, running_var=bn.running_var)


def test_two_processes_match_one_batch_norm_over_the_full_batch():
    results = run_distributed(_synced_half, 2)
    x, probe = _data()
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4).train()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    xs = x.clone().requires_grad_()
    out = bn(xs)
    (out * probe).sum().backward()
    torch.testing.assert_close(torch.cat([r['out'] for r in results]), out.detach(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r['grad_x'] for r in results]), xs.grad,
                               rtol=1e-4, atol=1e-5)
    # DDP would average the per-process weight gradients; their sum is BN's
    torch.testing.assert_close(results[0]['grad_w'] + results[1]['grad_w'], bn.weight.grad,
                               rtol=1e-4, atol=1e-4)
    for r in results:
        torch.testing.assert_close(r['running_mean'], bn.running_mean)
        torch.testing.assert_close(r['running_var'], bn.running_var)


def _synced_half_bf16(rank, world_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 30, 30, generator=gen) * 2 + 6  # mean 6: E[x^2] >> var
    bn = CpuSyncBatchNorm(4).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = bn(x[rank * 4:rank * 4 + 4].bfloat16())
    return dict(out=out, running_var=bn.running_var)


def test_statistics_stay_float32_under_bf16_autocast():
    results = run_distributed(_synced_half_bf16, 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 30, 30, generator=gen) * 2 + 6
    bn = nn.BatchNorm2d(4).train()
    reference = bn(x.bfloat16().float())
    out = torch.cat([r['out'] for r in results])
    assert out.dtype == torch.bfloat16
    # bf16 rounding of the output alone: ~0.01; bf16 statistics gave 0.25
    assert (out.float() - reference).abs().max() < 0.05
    for r in results:
        torch.testing.assert_close(r['running_var'], bn.running_var, rtol=1e-3, atol=1e-3)


def test_single_process_and_eval_behave_like_batch_norm():
    x, _ = _data()
    torch.manual_seed(1)
    ours, ref = CpuSyncBatchNorm(4), nn.BatchNorm2d(4)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.train()(x), ref.train()(x))
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_conversion_replaces_sync_bn_and_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Sequential(nn.SyncBatchNorm(4)))
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad = False
    converted = convert_to_cpu_sync_bn(model)
    assert isinstance(converted[1], CpuSyncBatchNorm)
    assert isinstance(converted[2][0], CpuSyncBatchNorm)
    assert torch.all(converted[1].running_mean == 0.5)
    assert not converted[1].weight.requires_grad


def _convert_mmcv_sync_bn(rank, world_size):
    from mmengine.model.utils import convert_sync_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model = convert_sync_batchnorm(model, 'mmcv')
    assert type(model[1]).__module__.startswith('mmcv.')  # what sync_bn='mmcv' gives
    model[1].running_mean.fill_(0.25)
    converted = convert_to_cpu_sync_bn(model)
    kept = converted[1].running_mean.clone()
    out = converted.train()(torch.randn(2, 3, 5, 5))  # mmcv's would need CUDA here
    return type(converted[1]).__name__, kept, out.shape


def test_conversion_also_replaces_mmcv_sync_bn():
    """``sync_bn='mmcv'`` in a config gives mmcv.ops.SyncBatchNorm (CUDA only,
    and not a torch _BatchNorm): it must become CpuSyncBatchNorm as well."""
    (name, kept, shape), = run_distributed(_convert_mmcv_sync_bn, 1)
    assert name == 'CpuSyncBatchNorm' and shape == (2, 4, 5, 5)
    assert torch.all(kept == 0.25)  # the state carried over
