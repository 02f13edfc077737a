from .block import ConvNeurBlock
from .global_branch import GlobalBranch
from .local_branch import GRN, LocalBranch
from .mixers import (CBAM, IRRWKV, MIXERS, GlobalSelfAttention, NonLocal2d, SegmentedAttention,
                     TitansMAC)
from .neural_memory import NeuralMemory
from .norms import LayerNorm2d

__all__ = ['ConvNeurBlock', 'GlobalBranch', 'GlobalSelfAttention', 'GRN', 'LocalBranch',
           'NeuralMemory', 'LayerNorm2d', 'MIXERS', 'CBAM', 'NonLocal2d', 'IRRWKV',
           'SegmentedAttention', 'TitansMAC']
