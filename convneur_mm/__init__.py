"""ConvNeur-MM: the ConvNeur backbone for MMDetection, MMSegmentation and MMPretrain.

Importing the package imports no toolbox; ``convneur_mm.models`` registers the
backbone into ``convneur_mm.registry.MODELS``. It also installs the
weights-only checkpoint allow-list (``convneur_mm.utils.checkpoint_safety``),
so that MMEngine Runner checkpoints load under torch >= 2.6 while pickles
carrying code are refused, and arranges for the classifiers to join
MMPretrain's model hub when MMPretrain is imported (``convneur_mm.model_index``).
"""
from .model_index import register_when_mmpretrain_is_imported as _register_model_index
from .utils.checkpoint_safety import install as _install_checkpoint_safety
from .version import __version__, version_info

_install_checkpoint_safety()
_register_model_index()

__all__ = ['__version__', 'version_info']
