"""Models of ConvNeur-MM; importing this registers them."""
from .backbones import ConvNeur

__all__ = ['ConvNeur']
