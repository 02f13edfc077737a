"""Registry nodes of ConvNeur-MM.

They are children of MMEngine's root registries under the scope ``convneur_mm``,
so configs of MMDetection, MMSegmentation and MMPretrain all reach our modules
with ``type='convneur_mm.ConvNeur'``: MMEngine imports ``convneur_mm.registry``
when it meets the scope prefix, and ``locations`` makes each registry import
the modules that register into it. No toolbox is imported here.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='convneur_mm',
    locations=['convneur_mm.models'])
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='convneur_mm',
    locations=['convneur_mm.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMENGINE_CONSTRUCTORS, scope='convneur_mm',
    locations=['convneur_mm.engine'])
RUNNERS = Registry(
    'runner', parent=MMENGINE_RUNNERS, scope='convneur_mm',
    locations=['convneur_mm.engine'])
HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='convneur_mm',
    locations=['convneur_mm.engine'])
