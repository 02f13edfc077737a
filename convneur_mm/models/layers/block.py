"""ConvNeur block: local branch, optional global branch, and their fusion."""
from typing import Optional

import torch
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .global_branch import GlobalBranch
from .local_branch import LocalBranch

FUSIONS = ('gate', 'add', 'concat')


class ConvNeurBlock(nn.Module):
    """``X + DropPath(fuse(G, F_loc))``; without memory ``X + DropPath(F_loc)``.

    ``memory_cfg`` (None: no global branch) holds ``dim`` (C_m) and the
    NeuralMemory settings; ``global_mixer`` picks the branch's mixer (the
    memory or another global-branch type of Table 5) and ``mixer_cfg`` holds
    that mixer's own settings.

    Fusion (the paper's Table 5): 'gate' sigmoid(G) * F_loc (default), 'add'
    G + F_loc, 'concat' Conv1x1([G, F_loc]) (2C -> C).
    """

    def __init__(self,
                 channels: int,
                 drop_path: float = 0.0,
                 memory_cfg: Optional[dict] = None,
                 fusion: str = 'gate',
                 global_mixer: str = 'memory',
                 mixer_cfg: Optional[dict] = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')
        self.local_branch = LocalBranch(channels)
        self.global_branch = None
        self.fusion = fusion
        if memory_cfg is not None:
            memory_cfg = dict(memory_cfg)
            self.global_branch = GlobalBranch(
                channels, memory_cfg.pop('dim'), global_mixer, mixer_cfg, **memory_cfg)
            if fusion == 'concat':
                self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.branches(x)[-1])

    def branches(self, x: Tensor) -> tuple:
        """(F_loc, G or None, fused update) for analysis tools."""
        local = self.local_branch(x)
        if self.global_branch is None:
            return local, None, local
        glob = self.global_branch(x)
        if self.fusion == 'gate':
            fused = torch.sigmoid(glob) * local
        elif self.fusion == 'add':
            fused = glob + local
        else:
            fused = self.fuse(torch.cat([glob, local], dim=1))
        return local, glob, fused
