"""Training-engine pieces: CPU-capable distributed runner, gloo SyncBN, CPU AMP,
layer-wise learning-rate decay, a stop at the first non-finite loss or gradient."""
from .cpu_sync_bn import CpuSyncBatchNorm, convert_to_cpu_sync_bn
from .finite_check import NonFiniteStopHook, NonFiniteTrainingError, module_group
from .layer_decay import LayerDecayOptimWrapperConstructor
from .optim_wrapper import CpuAmpOptimWrapper
from .runner import ConvNeurRunner, init_cpu_process_group, wrap_cpu_ddp

__all__ = ['CpuSyncBatchNorm', 'convert_to_cpu_sync_bn', 'CpuAmpOptimWrapper',
           'LayerDecayOptimWrapperConstructor', 'NonFiniteStopHook', 'NonFiniteTrainingError',
           'module_group',
           'ConvNeurRunner', 'init_cpu_process_group', 'wrap_cpu_ddp']
