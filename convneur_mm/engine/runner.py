"""MMEngine's Runner, plus distributed runs on machines without a GPU.

MMEngine 0.10.7 cannot start a distributed run on a CPU-only machine: its
``init_dist`` calls ``torch.cuda.set_device`` unconditionally, and
``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to DDP, which DDP
rejects for CPU modules. On such machines this runner starts the process group
with gloo itself, wraps the model in DDP without device ids, and makes SyncBN
layers work over gloo.

On any machine it also resumes exactly (``convneur_mm.engine.resume``): every
checkpoint carries the random generators' states, and a run resumed in the
middle of an epoch skips the batches already trained instead of repeating them.
And a run killed while writing a checkpoint keeps the one before it
(``convneur_mm.engine.checkpoint_hook``): checkpoints are written under a
temporary name and renamed when complete, and old ones are removed only after
the new one is written.
"""
import copy
import datetime
import inspect
import os
import os.path as osp
import subprocess

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed, is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS, LOOPS, MODEL_WRAPPERS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, Runner
from mmengine.model.utils import convert_sync_batchnorm
from torch.nn.parallel import DistributedDataParallel

from convneur_mm.models.utils.pretrained import check_checkpoint_fits
from convneur_mm.registry import RUNNERS
from .checkpoint_hook import PART_SUFFIX, SafeCheckpointHook, replace_durably, writes_locally
from .cpu_sync_bn import convert_to_cpu_sync_bn
from .resume import RESUMABLE_LOOPS, RngStateHook, gather_rng_states
from .wrapping import inner_model


def _slurm_env_to_torch_env(port=None) -> None:
    """Fill the torch.distributed variables from Slurm's, as MMEngine does
    (``env_cfg.dist_cfg.port``, then $MASTER_PORT, then 29500)."""
    node_list = os.environ['SLURM_NODELIST']
    os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(
        f'scontrol show hostname {node_list} | head -n1'))
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


def init_cpu_process_group(launcher: str, timeout=None, port=None) -> None:
    """Start a gloo process group for the 'pytorch' (torchrun) or 'slurm' launcher."""
    if launcher == 'slurm':
        _slurm_env_to_torch_env(port)
    elif launcher != 'pytorch':
        raise ValueError(f'launcher {launcher!r} is not supported without a GPU; '
                         "use 'pytorch' (tools/dist_train.sh) or 'slurm'")
    if isinstance(timeout, (int, float)):  # seconds, as MMEngine's init_dist reads it
        timeout = datetime.timedelta(seconds=timeout)
    kwargs = {} if timeout is None else dict(timeout=timeout)
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **kwargs)


_SAVE_SIGNATURE = inspect.signature(Runner.save_checkpoint)


@RUNNERS.register_module()
class ConvNeurRunner(Runner):
    """``mmengine.runner.Runner`` that also runs distributed on CPU (gloo) and
    resumes exactly."""
    is_resuming = False
    resumed_rng_state = None

    @property
    def _cpu_distributed(self) -> bool:
        return self.distributed and not torch.cuda.is_available()

    def setup_env(self, env_cfg: dict) -> None:
        if self._cpu_distributed and not is_distributed():
            dist_cfg = env_cfg.get('dist_cfg') or {}
            init_cpu_process_group(self.launcher, dist_cfg.get('timeout'), dist_cfg.get('port'))
        super().setup_env(env_cfg)

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        super().register_hooks(default_hooks, custom_hooks)
        self.register_hook(RngStateHook())

    def register_hook(self, hook, priority=None) -> None:
        """MMEngine's ``CheckpointHook`` (exactly, by config) is built as
        ``SafeCheckpointHook``."""
        if isinstance(hook, dict):
            kind = hook.get('type')
            if isinstance(kind, str):
                with HOOKS.switch_scope_and_registry(None) as registry:  # as build looks it up
                    kind = registry.get(kind)
            if kind is CheckpointHook:
                hook = {**hook, 'type': SafeCheckpointHook}
        super().register_hook(hook, priority)

    def build_train_loop(self, loop):
        """MMEngine's epoch- and iteration-based loops become their resumable
        subclasses; other loops are built as configured."""
        if isinstance(loop, dict):
            loop = copy.deepcopy(loop)
            if 'type' in loop:
                kind = LOOPS.get(loop['type']) if isinstance(loop['type'], str) else loop['type']
            else:
                kind = EpochBasedTrainLoop if loop.get('by_epoch') else IterBasedTrainLoop
            if kind in RESUMABLE_LOOPS:
                loop.pop('by_epoch', None)
                loop['type'] = RESUMABLE_LOOPS[kind]
        return super().build_train_loop(loop)

    gathered_rng_states = None
    training_rng_state = None  # while validating: training's states (RngStateHook)

    def save_checkpoint(self, out_dir, filename, *args, **kwargs) -> None:
        """MMEngine writes checkpoints on rank 0 only (its ``save_checkpoint``
        is master-only), but every rank calls this: gather every rank's
        generator states here, for ``RngStateHook`` to store. In a local
        directory the checkpoint is written as ``filename.part``, flushed and
        renamed: a kill while writing never leaves a cut-short file under a
        checkpoint's name."""
        self.gathered_rng_states = gather_rng_states(self.training_rng_state)
        call = _SAVE_SIGNATURE.bind(self, out_dir, filename, *args, **kwargs).arguments
        if not writes_locally(out_dir, call.get('file_client_args'), call.get('backend_args')):
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        super().save_checkpoint(out_dir, filename + PART_SUFFIX, *args, **kwargs)
        if is_main_process():
            replace_durably(osp.join(out_dir, filename + PART_SUFFIX), osp.join(out_dir, filename))

    def set_randomness(self, seed, diff_rank_seed: bool = False,
                       deterministic: bool = False) -> None:
        """MMEngine's, with ops that have no deterministic CUDA kernel warning
        instead of raising (``launch.build_runner``), also when MMEngine sets
        the randomness again: ``resume`` does for a checkpoint of another seed
        (a config without one, such as the ImageNet ones, draws it)."""
        super().set_randomness(seed, diff_rank_seed, deterministic)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def resume(self, filename, *args, **kwargs) -> None:
        if not filename:  # what MMEngine's find_latest_checkpoint reads from an empty file
            raise FileNotFoundError(
                f'{osp.join(self.work_dir, "last_checkpoint")} names no checkpoint (empty: '
                'was its run killed while writing it?); resume from one by path: '
                '--resume PATH')
        # MMEngine resumes without strict, and a model of another config then fails deep
        # in the optimizer's state, or trains on half-loaded
        check_checkpoint_fits(inner_model(self.model), filename)
        self.is_resuming = True
        try:
            super().resume(filename, *args, **kwargs)
        finally:
            self.is_resuming = False

    def wrap_model(self, model_wrapper_cfg, model):
        if not self._cpu_distributed:
            return super().wrap_model(model_wrapper_cfg, model)
        return wrap_cpu_ddp(model, model_wrapper_cfg, sync_bn=self.cfg.get('sync_bn'),
                            find_unused_parameters=self.cfg.get('find_unused_parameters',
                                                                False))


def wrap_cpu_ddp(model, model_wrapper_cfg=None, sync_bn=None,
                 find_unused_parameters: bool = False):
    """What ``ConvNeurRunner.wrap_model`` does on a CPU-only distributed run
    (also usable without a Runner, e.g. by tests): SyncBN (torch's or mmcv's,
    or every BN with ``sync_bn``) becomes ``CpuSyncBatchNorm``, and the model
    is wrapped in ``MMDistributedDataParallel`` (or ``model_wrapper_cfg``'s
    wrapper) without device ids. The process group must already exist."""
    model = model.to('cpu')
    if sync_bn:
        model = convert_sync_batchnorm(model, sync_bn)
    model = convert_to_cpu_sync_bn(model)
    wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=find_unused_parameters)
    wrapper_cfg.update(model_wrapper_cfg or {})
    if issubclass(MODEL_WRAPPERS.get(wrapper_cfg['type']), DistributedDataParallel):
        wrapper_cfg['device_ids'] = None  # CPU modules take no device ids
    return MODEL_WRAPPERS.build(wrapper_cfg, default_args=dict(module=model))
