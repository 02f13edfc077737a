"""What the backbone's warm start reads from a converted checkpoint's meta.

``ConvNeur(global_init='warm')`` starts only global branches that the
ConvNeXt-V2 converter (``convneur_mm.models.converters.convnextv2``) left at
initialization and recorded in ``meta['left_at_init']``; this module holds
that contract, so that the backbone needs nothing from the converter.
"""
import re
from typing import Iterable, List, Optional

CONVERTER = 'tools/model_converters/convnextv2_to_convneur.py'


class ConvNeXtV2CheckpointError(ValueError):
    """The input is not a ConvNeXt-V2 checkpoint ConvNeur can take."""


def global_branch_modules(keys: Iterable[str]) -> List[str]:
    """The global branches (``...stages.<i>.<j>.global_branch``) among ``keys``.

    Args:
        keys: state-dict keys.
    """
    return sorted({m[1] for k in keys for m in [re.match(r'(.*\.global_branch)\.', k)] if m})


def warm_start_blocks(meta: Optional[dict], prefix: str = '') -> List[str]:
    """The blocks (``stages.<i>.<j>``, without ``prefix``) whose global
    branches a checkpoint written by the converter left at initialization;
    a checkpoint from anywhere else is refused, as a warm start there would
    overwrite trained global branches.

    Args:
        meta: the checkpoint's ``meta``.
        prefix: the prefix the backbone is loaded from (``'backbone.'``).
    """
    meta = meta if isinstance(meta, dict) else {}
    if meta.get('converter') != CONVERTER:
        raise ConvNeXtV2CheckpointError(
            "global_init='warm' starts the global branches of a checkpoint converted from "
            f'ConvNeXt-V2 by {CONVERTER}; this checkpoint was written by '
            f"{meta.get('converter') or 'something else'} and its global branches may be "
            "trained: load it with global_init='paper' (the default)")
    prefix = prefix if not prefix or prefix.endswith('.') else prefix + '.'
    return [name[len(prefix):-len('.global_branch')]
            for name in meta.get('left_at_init', []) if name.startswith(prefix)]
