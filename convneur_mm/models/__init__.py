"""Models of ConvNeur-MM; importing this registers them."""
from .backbones import ConvNeur
from .data_preprocessors import BucketPad

__all__ = ['ConvNeur', 'BucketPad']
