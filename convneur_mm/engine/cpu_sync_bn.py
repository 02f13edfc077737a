"""SyncBatchNorm that also works on CPU with the gloo backend.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, yet the MMSegmentation bases
use SyncBN in their heads. This drop-in replacement all-reduces the batch
statistics with autograd-aware collectives, so a 2-process CPU run computes
what one process with the doubled batch would.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with statistics over all processes of the default group."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input, got {x.dim()}D')

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        synced = (self.training and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size() > 1)
        if not synced:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                self.training or not self.track_running_stats,
                0.0 if self.momentum is None else self.momentum, self.eps)
        return self._synced_forward(x.float()).to(x.dtype)

    def _synced_forward(self, x: Tensor) -> Tensor:
        """Statistics in float32 and their reduction in float64, whatever the
        input dtype (under bf16 autocast E[x^2] - E[x]^2 would keep 8 bits)."""
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        count = x.new_tensor([x.numel() // channels], dtype=torch.float64)
        sums = torch.cat([x.sum(dims), x.square().sum(dims)]).double()
        stats = dist_fn.all_reduce(torch.cat([sums, count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean.square()).clamp_min(0)
        mean, var = mean.float(), var.float()
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.item())
        shape = (1, channels) + (1, ) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape).float() + self.bias.view(shape).float()
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: float) -> None:
        self.num_batches_tracked += 1
        momentum = (1.0 / float(self.num_batches_tracked)
                    if self.momentum is None else self.momentum)
        unbiased = var * total / max(total - 1, 1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def _is_sync_bn(module: nn.Module) -> bool:
    """torch's SyncBatchNorm (a ``_BatchNorm``), or mmcv's ``mmcv.ops.SyncBatchNorm``
    (``sync_bn='mmcv'``; a plain Module with the same attributes and state)."""
    if isinstance(module, CpuSyncBatchNorm) or 'SyncBatchNorm' not in type(module).__name__:
        return False
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or \
        type(module).__module__.startswith('mmcv.')


def convert_to_cpu_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm (torch's or mmcv's) with CpuSyncBatchNorm."""
    if _is_sync_bn(module):
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum,
                               module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for param, old in zip(new.parameters(), module.parameters()):
            param.requires_grad = old.requires_grad
        return new
    for name, child in module.named_children():
        new_child = convert_to_cpu_sync_bn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
