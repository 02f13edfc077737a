"""ConvNeur backbone (CVPR 2026, "Efficiency Follows Global-Local Decoupling").

Four stages of ConvNeXt-V2 style blocks; the first block of every stage also
runs a chunked neural memory whose read-out gates the local features. One
class serves MMPretrain, MMDetection and MMSegmentation through the
``convneur_mm`` registry scope (``type='convneur_mm.ConvNeur'``).
"""
import copy
import logging
from itertools import chain
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor, nn

from ...registry import MODELS
from ..layers.block import ConvNeurBlock
from ..layers.mixers import SELF_INITIALIZED, resolve_mixer_cfg
from ..layers.neural_memory import RENAMED_KEYS, UPDATE_MODES
from ..layers.norms import LayerNorm2d
from ..utils.precision import Float32Conv2d, in_float32
from ..utils.pretrained import load_pretrained_backbone
from ..utils.renamed_keys import with_renamed_keys
from ..utils.shapes import ceil_to, known_zero
from ..utils.warm_start import ConvNeXtV2CheckpointError, warm_start_blocks

PLACEMENTS = ('none', 'stage', 'block')
GLOBAL_INITS = ('paper', 'warm')
NO_CHECKPOINT = (None, '', 'none')
DEFAULT_INIT_CFG = [
    dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
    dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.),
]
MEMORY_KEYS = ('dim', 'chunk_size', 'max_lr', 'update', 'heads', 'scan_block',
               'operand_dtype', 'implementation', 'working_set_mib', 'recompute', 'backward',
               'gelu_approximate')
STEM_BIAS_STD = .02  # not zero: see ConvNeur._own_init


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad bottom/right so that a stride-``multiple`` conv sees every pixel.

    Always pads (maybe by zero) under torch.export or where a size is
    symbolic (``torch.compile``'s dynamic shapes), so that one graph serves
    every input size instead of the divisibility of the traced one (with
    ``ceil_to``: under symbolic sizes the four stages' nested remainders,
    (-h) % m, slowed Inductor's compilation down; the figure:
    docs/notes/investigations.md#smaller-decisions-in-the-model)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (ceil_to(size, multiple) - size for size in (h, w))
    if known_zero(pad_h, pad_w) and not torch.compiler.is_exporting():
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


class Downsample(nn.Sequential):
    """Strided patch conv, with an optional LayerNorm before or after it.

    The stem's conv (``norm='after'``) runs in float32 under autocast and
    keeps a float32 output: its weight and bias gradients sum over every
    pixel of the image, and its output's gradient is the stage-0 gradient
    times the LayerNorm's 1/sigma, both of which overflow float16 at loss
    scale 1 on detection-sized images (see ``ConvNeur._own_init`` and
    docs/user_guides/cuda.md). A 3-channel conv at stride 4 costs little in
    float32."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        if norm == 'after':  # the stem
            layers = [Float32Conv2d(in_channels, out_channels, stride, stride=stride),
                      LayerNorm2d(out_channels, eps=1e-6)]
        else:
            layers = [LayerNorm2d(in_channels, eps=1e-6),
                      nn.Conv2d(in_channels, out_channels, stride, stride=stride)]
        super().__init__(*layers)
        self.stride = stride
        self.is_stem = norm == 'after'

    def forward(self, x: Tensor) -> Tensor:
        # by position, not by the layers' types: FSDP1's auto-wrap replaces
        # layers with wrappers (a type test would skip the padding under them)
        if self.is_stem:
            return self[1](in_float32(self[0], _pad_to_multiple(x, self.stride)))
        return self[1](_pad_to_multiple(self[0](x), self.stride))


@MODELS.register_module()
class ConvNeur(BaseModule):
    """ConvNeur backbone.

    Args:
        arch: 'm1' ... 'm4' (case-insensitive) or a dict with ``depths``,
            ``dims`` and ``memory_dim``.
        in_channels: input image channels.
        memory_cfg: overrides of the memory settings: ``dim`` (C_m, the arch's
            by default), ``chunk_size`` (196 for classification, 4096 for
            detection), ``max_lr`` (inner step size: 1 or 1e-3), ``update``
            ('parallel' | 'sequential'), ``heads``, ``scan_block``,
            ``operand_dtype``, ``implementation``, ``working_set_mib``,
            ``recompute``, ``backward``, ``gelu_approximate`` (``NeuralMemory``;
            its deprecated names ``matmul_dtype`` and ``kernels`` are read as
            the new ones, with a warning). None of them but ``dim`` and
            ``heads`` changes the parameter set.
        memory_placement: 'stage' (first block of each stage, the paper's
            default), 'block' (every block) or 'none' (local-only ablation).
        fusion: 'gate' (default), 'add' or 'concat' (Table 5 ablations).
        global_mixer: the global branch's type (Table 5): 'memory' (default,
            ConvNeur), 'attention' (global self-attention), 'cbam',
            'nonlocal', 'rwkv' (IR-RWKV) or 'titans' (memory as context),
            each in the same bottleneck scaffold at width C_m.
        mixer_cfg: settings of a mixer other than the memory (whose settings
            are ``memory_cfg``; Titans takes both): attention ``heads``
            (default memory_cfg's); cbam ``reduction`` (16), ``kernel_size``
            (7); nonlocal ``reduction`` (2), ``use_scale`` (True); rwkv
            ``expansion`` (1.0), ``kernel_size`` (5), ``shift_gamma`` (0.25);
            titans ``heads`` (8), ``head_dim`` (64), ``persistent_tokens``
            (4), ``segment_len`` (the memory's chunk size).
        drop_path_rate: stochastic depth rate, linearly increasing per block.
        out_indices: stages whose (normalized) outputs are returned.
        frozen_stages: freeze the stem and the first ``frozen_stages`` stages.
        gap_before_final_norm: pool before the output norm (classification);
            outputs are then (B, C) vectors instead of maps.
        with_cp: gradient checkpointing per block (saves memory, costs time).
        global_init: 'paper' (default): the global branches keep the paper's
            random init, whose gate sigmoid(G) ~ 0.5 halves every gated
            block's local update. 'warm': after a checkpoint converted from
            ConvNeXt-V2 (tools/model_converters/convnextv2_to_convneur.py) is
            loaded, each global branch's out-projection is zeroed (G = 0, a
            gate of exactly 0.5) and that block's local out-projection
            (pwconv2) doubled, so the network computes ConvNeXt-V2's function
            at step 0 (docs/user_guides/warm_start.md). Needs fusion 'gate' or
            'add'; refused for checkpoints whose global branches were trained.
        init_cfg: MMEngine init config; ``dict(type='Pretrained', ...)``
            loads a checkpoint and reports any key mismatch.
    """
    arch_settings: Dict[str, dict] = {
        'm1': dict(depths=[2, 2, 6, 2], dims=[40, 80, 160, 320], memory_dim=80),
        'm2': dict(depths=[2, 2, 6, 2], dims=[48, 96, 192, 384], memory_dim=96),
        'm3': dict(depths=[2, 2, 6, 2], dims=[64, 128, 256, 512], memory_dim=128),
        'm4': dict(depths=[2, 2, 8, 2], dims=[80, 160, 320, 640], memory_dim=160),
    }
    default_memory_cfg = dict(chunk_size=196, max_lr=1.0, update='parallel', heads=1)

    def __init__(self,
                 arch: Union[str, dict] = 'm3',
                 in_channels: int = 3,
                 memory_cfg: Optional[dict] = None,
                 memory_placement: str = 'stage',
                 fusion: str = 'gate',
                 global_mixer: str = 'memory',
                 mixer_cfg: Optional[dict] = None,
                 drop_path_rate: float = 0.0,
                 out_indices: Union[int, Sequence[int]] = -1,
                 frozen_stages: int = 0,
                 gap_before_final_norm: bool = True,
                 with_cp: bool = False,
                 global_init: str = 'paper',
                 init_cfg: Optional[Union[dict, List[dict]]] = DEFAULT_INIT_CFG):
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        arch = self._parse_arch(arch)
        self.depths, self.dims = list(arch['depths']), list(arch['dims'])
        self.num_stages = len(self.depths)
        self.memory_cfg = self._parse_memory_cfg(memory_cfg, arch['memory_dim'])
        if memory_placement not in PLACEMENTS:
            raise ValueError(
                f'memory_placement must be one of {PLACEMENTS}, got {memory_placement!r}')
        self.memory_placement = memory_placement
        self.global_mixer = global_mixer
        self.mixer_cfg = resolve_mixer_cfg(global_mixer, mixer_cfg)
        self.out_indices = self._parse_out_indices(out_indices, self.num_stages)
        if (isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int)
                or not 0 <= frozen_stages <= self.num_stages):
            raise ValueError(f'frozen_stages must be in [0, {self.num_stages}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        for name, value in (('gap_before_final_norm', gap_before_final_norm),
                            ('with_cp', with_cp)):
            if not isinstance(value, bool):
                raise ValueError(f'{name} must be a bool, got {value!r}')
        self.gap_before_final_norm = gap_before_final_norm
        self.with_cp = with_cp
        self.in_channels = in_channels
        if global_init not in GLOBAL_INITS:
            raise ValueError(f'global_init must be one of {GLOBAL_INITS}, got {global_init!r}')
        if global_init == 'warm' and fusion == 'concat':
            raise ValueError("global_init='warm' needs fusion 'gate' or 'add': the 'concat' "
                             'fusion mixes the local update through a learned conv')
        self.global_init = global_init

        drop_rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.downsample_layers = nn.ModuleList()
        self.stages = nn.ModuleList()
        block_idx = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i == 0:
                self.downsample_layers.append(Downsample(in_channels, dim, 4, 'after'))
            else:
                self.downsample_layers.append(Downsample(self.dims[i - 1], dim, 2, 'before'))
            self.stages.append(nn.Sequential(*[
                ConvNeurBlock(
                    dim,
                    drop_path=drop_rates[block_idx + j],
                    memory_cfg=self.memory_cfg if self._has_memory(j) else None,
                    fusion=fusion,
                    global_mixer=global_mixer,
                    mixer_cfg=self.mixer_cfg) for j in range(depth)
            ]))
            block_idx += depth
            if i in self.out_indices:
                self.add_module(f'norm{i}', LayerNorm2d(dim, eps=1e-6))
        self._freeze_stages()

    # ----------------------------------------------------------- validation
    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_settings:
                raise ValueError(f'Unknown ConvNeur arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_settings)} or pass a dict with '
                                 f'depths, dims and memory_dim.')
            return cls.arch_settings[key]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
        missing = {'depths', 'dims', 'memory_dim'} - set(arch)
        if missing:
            raise ValueError(f'arch dict is missing {sorted(missing)}; got {sorted(arch)}')
        unknown = set(arch) - {'depths', 'dims', 'memory_dim'}
        if unknown:
            raise ValueError(f'arch dict has unknown keys {sorted(unknown)}; it takes '
                             'depths, dims and memory_dim')
        if len(arch['depths']) != len(arch['dims']) or not arch['depths']:
            raise ValueError(f'arch depths {arch["depths"]} and dims {arch["dims"]} '
                             'must be non-empty and of the same length')
        for name, values in (('depths', arch['depths']), ('dims', arch['dims']),
                             ('memory_dim', [arch['memory_dim']])):
            if not all(_positive_int(v) for v in values):
                raise ValueError(f'arch {name} must be ints >= 1, got {arch[name]!r}')
        return arch

    @classmethod
    def _parse_memory_cfg(cls, memory_cfg: Optional[dict], memory_dim: int) -> dict:
        # stacklevel 4: the warning points at whoever built the backbone
        memory_cfg = with_renamed_keys(memory_cfg or {}, RENAMED_KEYS, 'memory_cfg',
                                       stacklevel=4)
        unknown = set(memory_cfg) - set(MEMORY_KEYS)
        if unknown:
            raise ValueError(f'unknown memory_cfg keys {sorted(unknown)}; '
                             f'valid keys are {list(MEMORY_KEYS)}')
        cfg = dict(cls.default_memory_cfg, dim=memory_dim)
        cfg.update(memory_cfg)
        if cfg['update'] not in UPDATE_MODES:
            raise ValueError(f'memory_cfg.update must be one of {UPDATE_MODES}, '
                             f'got {cfg["update"]!r}')
        return cfg

    @staticmethod
    def _parse_out_indices(out_indices: Union[int, Sequence[int]],
                           num_stages: int) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, Sequence) or not out_indices:
            raise ValueError(f'out_indices must be an int or a non-empty sequence, '
                             f'got {out_indices!r}')
        parsed = []
        for index in out_indices:
            if (isinstance(index, bool) or not isinstance(index, int)
                    or not -num_stages <= index < num_stages):
                raise ValueError(f'out_indices {list(out_indices)} is invalid: each '
                                 f'index must be an int in [{-num_stages}, {num_stages - 1}]')
            parsed.append(index % num_stages)
        if len(set(parsed)) != len(parsed):
            raise ValueError(f'out_indices {list(out_indices)} names a stage twice')
        return tuple(sorted(parsed))

    def _has_memory(self, block_index: int) -> bool:
        return (self.memory_placement == 'block'
                or (self.memory_placement == 'stage' and block_index == 0))

    # -------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Per out index, a (B, C) vector or a contiguous (B, C, H, W) map.

        The maps must be contiguous: the LayerNorms work channels-last and
        hand back channels-last strides, which convolutions accept but mmcv's
        RoIAlign does not (it reads raw NCHW memory, on CPU and CUDA alike,
        and would silently pool scrambled features for the RoI heads;
        open-mmlab/mmcv#2203).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or not x.is_floating_point():
            raise ValueError(f'ConvNeur takes floating-point (B, {self.in_channels}, H, W) '
                             f'images, got {x.dtype} of shape {tuple(x.shape)}')
        outs = []
        for i, stage in enumerate(self.stages):
            x = self.downsample_layers[i](x)
            x = self._run_stage(stage, x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean((-2, -1), keepdim=True)).flatten(1))
                else:
                    outs.append(norm(x).contiguous())
        return tuple(outs)

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        for block in stage:
            if self.with_cp and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    # ------------------------------------------------------------- training
    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages):
            modules = (self.downsample_layers[i], self.stages[i])
            for module in modules:
                module.eval()
            for param in chain(*(m.parameters() for m in modules)):
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'ConvNeur':
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """Random init, then a strict load if ``init_cfg`` names a Pretrained
        checkpoint (as a dict or as an entry of a list).

        The random init runs first in every case, so that with ``strict=False``
        the tensors the checkpoint lacks get the documented init, not
        PyTorch's defaults. A checkpoint of None, '' or 'none' (the configs'
        default when $CONVNEUR_PRETRAINED is unset) means "train from scratch"
        and says so.
        """
        if self._is_init:  # MMEngine warns and keeps the weights
            super().init_weights()
            return
        entries = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in entries if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if len(pretrained) > 1:
            raise ValueError(f'init_cfg names {len(pretrained)} Pretrained checkpoints; give one')
        if not pretrained:
            super().init_weights()
            self._own_init()
            if self.global_init == 'warm':
                print_log("ConvNeur: global_init='warm' without a Pretrained init_cfg has no "
                          "weights to keep: the paper's init is used", logger='current',
                          level=logging.WARNING)
            return
        original = self.init_cfg
        self.init_cfg = [c for c in entries if c not in pretrained] or copy.deepcopy(
            DEFAULT_INIT_CFG)
        super().init_weights()
        self.init_cfg = original
        self._own_init()
        cfg = pretrained[0]
        if cfg.get('checkpoint') in NO_CHECKPOINT:
            print_log('ConvNeur: no pretrained checkpoint given (init_cfg.checkpoint is '
                      f'{cfg.get("checkpoint")!r}): the backbone is randomly initialized. Set '
                      'CONVNEUR_PRETRAINED=PATH or --cfg-options '
                      'model.backbone.init_cfg.checkpoint=PATH to load weights.',
                      logger='current', level=logging.WARNING)
            return
        # a dense checkpoint's output norms of other out_indices have no place here
        meta = load_pretrained_backbone(self, cfg['checkpoint'], cfg.get('prefix', ''),
                                        strict=cfg.get('strict', True), skip_unexpected=True)
        if self.global_init == 'warm':
            self._warm_start(cfg['checkpoint'], meta, cfg.get('prefix', ''))

    def _warm_start(self, checkpoint: str, meta: Optional[dict], prefix: str) -> None:
        """``global_init='warm'``: G = 0 (out-projection weight and bias
        zero), so the gate is sigmoid(0) = 0.5 exactly, and pwconv2 doubled:
        0.5 * 2 F_loc = F_loc bit for bit (scaling by 2 is exact). The gate
        sits where sigmoid's slope is largest and the zero out-projection gets
        gradient (its input, the mixer's output, is not zero), so the branch
        trains from the first step; the mixer from the second."""
        blocks = set(warm_start_blocks(meta, prefix))
        started = []
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                if block.global_branch is None:
                    continue
                if f'stages.{i}.{j}' not in blocks:
                    raise ConvNeXtV2CheckpointError(
                        f"global_init='warm': stages.{i}.{j}'s global branch was not left at "
                        f'its initialization by the conversion of {checkpoint}')
                with torch.no_grad():
                    block.global_branch.proj_out.weight.zero_()
                    block.global_branch.proj_out.bias.zero_()
                    if block.fusion == 'gate':  # 1 / sigmoid(0)
                        block.local_branch.pwconv2.weight.mul_(2.0)
                        block.local_branch.pwconv2.bias.mul_(2.0)
                started.append(f'stages.{i}.{j}')
        print_log(f'ConvNeur: warm start of {len(started)} global branches (G = 0, pwconv2 x2 '
                  f'under the gate): {", ".join(started)}', logger='current')

    def _own_init(self) -> None:
        """What follows the generic init: a random stem bias, and the
        memories' and mixers' own init (learned W_0, gate biases, a zero
        output conv, ...).

        With the generic zero bias the stem's output is exactly zero wherever
        the toolboxes zero-pad (mmdet to a multiple of 32, mmseg's crops), and
        every LayerNorm and RMSNorm after it normalizes a zero vector there,
        each multiplying the gradient by 1/sqrt(eps): at init, parameter
        gradients of 2e14 in float32 (M4, half the input padded; 1.5 without
        padding) and fp16 loss scaling that could never step
        (docs/user_guides/cuda.md)."""
        nn.init.trunc_normal_(self.downsample_layers[0][0].bias, std=STEM_BIAS_STD)
        for module in self.modules():
            if isinstance(module, SELF_INITIALIZED):
                module.reset_parameters()

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer-wise depth for layer-wise learning-rate decay.

        The stem is depth 0, every block one more than the previous, a
        downsample layer shares the depth of the first block after it, and
        everything else (output norms, the head) is the last depth.
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):].split('.')
        starts = [0] + torch.tensor(self.depths).cumsum(0).tolist()
        if name[0] == 'downsample_layers':
            stage = int(name[1])
            return (0 if stage == 0 else starts[stage] + 1), num_layers
        if name[0] == 'stages':
            return starts[int(name[1])] + int(name[2]) + 1, num_layers
        return num_layers - 1, num_layers
