from .block import ConvNeurBlock
from .global_branch import GlobalBranch, GlobalSelfAttention
from .local_branch import GRN, LocalBranch
from .neural_memory import NeuralMemory
from .norms import LayerNorm2d

__all__ = ['ConvNeurBlock', 'GlobalBranch', 'GlobalSelfAttention', 'GRN', 'LocalBranch',
           'NeuralMemory', 'LayerNorm2d']
