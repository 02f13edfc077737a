"""The global branch's mixers: one table of every global-branch type of Table 5.

Each entry says how the mixer is built from the branch width C_m, the
backbone's ``memory_cfg`` (the memory's settings, for the mixers that hold a
memory) and its own settings (the backbone's ``mixer_cfg``), and whether it
works on the (B, N, C_m) tokens or on the (B, C_m, H, W) map.
"""
from typing import Callable, Dict, NamedTuple, Optional

from torch import nn

from ..neural_memory import NeuralMemory
from .attention import GlobalSelfAttention
from .cbam import CBAM
from .non_local import NonLocal2d
from .rwkv import IRRWKV, SpatialMix
from .titans import SegmentedAttention, TitansMAC


class MixerSpec(NamedTuple):
    """How ``GlobalBranch`` builds and calls one mixer.

    ``attribute`` is the submodule's name in the branch (its state-dict
    prefix), ``settings`` the ``mixer_cfg`` keys with their defaults, and
    ``build(dim, memory_cfg, **settings)`` the constructor.
    """
    attribute: str
    tokens: bool
    settings: Dict[str, object]
    build: Callable[..., nn.Module]


def _attention(dim: int, memory_cfg: dict, heads: Optional[int] = None) -> nn.Module:
    # before mixer_cfg existed the attention took memory_cfg's heads; it still does by default
    return GlobalSelfAttention(dim, memory_cfg.get('heads', 1) if heads is None else heads)


MIXERS: Dict[str, MixerSpec] = {
    'memory': MixerSpec('memory', True, {}, lambda dim, memory_cfg: NeuralMemory(
        dim, **memory_cfg)),
    'attention': MixerSpec('attention', True, dict(heads=None), _attention),
    'cbam': MixerSpec('cbam', False, dict(reduction=16, kernel_size=7),
                      lambda dim, memory_cfg, **cfg: CBAM(dim, **cfg)),
    'nonlocal': MixerSpec('non_local', False, dict(reduction=2, use_scale=True),
                          lambda dim, memory_cfg, **cfg: NonLocal2d(dim, **cfg)),
    'rwkv': MixerSpec('rwkv', False, dict(expansion=1.0, kernel_size=5, shift_gamma=0.25),
                      lambda dim, memory_cfg, **cfg: IRRWKV(dim, **cfg)),
    'titans': MixerSpec('titans', True,
                        dict(heads=8, head_dim=64, persistent_tokens=4, segment_len=None),
                        lambda dim, memory_cfg, **cfg: TitansMAC(dim, memory_cfg, **cfg)),
}

# modules with an init of their own, which the backbone re-applies after its
# generic (truncated-normal) init of every conv and linear layer
SELF_INITIALIZED = (NeuralMemory, NonLocal2d, SpatialMix, SegmentedAttention)


def resolve_mixer_cfg(mixer: str, mixer_cfg: Optional[dict]) -> dict:
    """``mixer_cfg`` completed with the mixer's defaults; a clear error for an
    unknown mixer or a key the mixer does not take."""
    if mixer not in MIXERS:
        raise ValueError(f'global_mixer must be one of {tuple(MIXERS)}, got {mixer!r}')
    settings = MIXERS[mixer].settings
    mixer_cfg = dict(mixer_cfg or {})
    unknown = set(mixer_cfg) - set(settings)
    if unknown:
        valid = (f'valid keys are {list(settings)}' if settings else
                 'it takes none (its settings are in memory_cfg)')
        raise ValueError(f'unknown mixer_cfg keys {sorted(unknown)} for '
                         f'global_mixer={mixer!r}; {valid}')
    return dict(settings, **mixer_cfg)


def build_mixer(mixer: str, dim: int, memory_cfg: dict,
                mixer_cfg: Optional[dict] = None) -> nn.Module:
    """The mixer ``mixer`` of width ``dim``."""
    return MIXERS[mixer].build(dim, memory_cfg, **resolve_mixer_cfg(mixer, mixer_cfg))


__all__ = ['MIXERS', 'MixerSpec', 'SELF_INITIALIZED', 'build_mixer', 'resolve_mixer_cfg',
           'CBAM', 'GlobalSelfAttention', 'IRRWKV', 'NonLocal2d', 'SegmentedAttention',
           'SpatialMix', 'TitansMAC']
