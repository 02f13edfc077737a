from .convneur import ConvNeur

__all__ = ['ConvNeur']
