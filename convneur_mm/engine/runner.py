"""MMEngine's Runner, plus distributed runs on machines without a GPU.

MMEngine 0.10.7 cannot start a distributed run on a CPU-only machine: its
``init_dist`` calls ``torch.cuda.set_device`` unconditionally, and
``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to DDP, which DDP
rejects for CPU modules. On such machines this runner starts the process group
with gloo itself, wraps the model in DDP without device ids, and makes SyncBN
layers work over gloo. With a GPU it is MMEngine's Runner unchanged.
"""
import os
import subprocess

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner
from mmengine.model.utils import convert_sync_batchnorm
from torch.nn.parallel import DistributedDataParallel

from convneur_mm.registry import RUNNERS
from .cpu_sync_bn import convert_to_cpu_sync_bn


def _slurm_env_to_torch_env() -> None:
    """Fill the torch.distributed variables from Slurm's, as MMEngine does."""
    node_list = os.environ['SLURM_NODELIST']
    os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(
        f'scontrol show hostname {node_list} | head -n1'))
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


def init_cpu_process_group(launcher: str, timeout=None) -> None:
    """Start a gloo process group for the 'pytorch' (torchrun) or 'slurm' launcher."""
    if launcher == 'slurm':
        _slurm_env_to_torch_env()
    elif launcher != 'pytorch':
        raise ValueError(f'launcher {launcher!r} is not supported without a GPU; '
                         "use 'pytorch' (tools/dist_train.sh) or 'slurm'")
    kwargs = {} if timeout is None else dict(timeout=timeout)
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **kwargs)


@RUNNERS.register_module()
class ConvNeurRunner(Runner):
    """``mmengine.runner.Runner`` that also runs distributed on CPU (gloo)."""

    @property
    def _cpu_distributed(self) -> bool:
        return self.distributed and not torch.cuda.is_available()

    def setup_env(self, env_cfg: dict) -> None:
        if self._cpu_distributed and not is_distributed():
            init_cpu_process_group(self.launcher, env_cfg.get('dist_cfg', {}).get('timeout'))
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        if not self._cpu_distributed:
            return super().wrap_model(model_wrapper_cfg, model)
        model = model.to('cpu')
        if self.cfg.get('sync_bn'):
            model = convert_sync_batchnorm(model, self.cfg.sync_bn)
        model = convert_to_cpu_sync_bn(model)
        wrapper_cfg = dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=self.cfg.get('find_unused_parameters', False))
        wrapper_cfg.update(model_wrapper_cfg or {})
        if issubclass(MODEL_WRAPPERS.get(wrapper_cfg['type']), DistributedDataParallel):
            wrapper_cfg['device_ids'] = None  # CPU modules take no device ids
        return MODEL_WRAPPERS.build(wrapper_cfg, default_args=dict(module=model))
