from .block import ConvNeurBlock
from .global_branch import GlobalMemoryBranch
from .local_branch import GRN, LocalBranch
from .neural_memory import NeuralMemory
from .norms import LayerNorm2d

__all__ = ['ConvNeurBlock', 'GlobalMemoryBranch', 'GRN', 'LocalBranch',
           'NeuralMemory', 'LayerNorm2d']
