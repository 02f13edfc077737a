"""The lab's measured subjects, built in one place: ConvNeur-M3's ImageNet
classifier and its local-only network (``build_classifier``), a bare
``ConvNeur`` backbone (``convneur_backbone``), its global branches with
inputs of their shapes (``stage_branches``, ``branch_inputs``), and the
neural memory's variants.

A variant is a set of ``memory_cfg`` keys (``operand_dtype``, ``implementation``,
``working_set_mib``, ``recompute``) with a precision context (TF32 products,
bf16 autocast or none) and training or inference. ``memory_like`` and
``branch_like`` build a variant with the weights of a given memory; a key the
installed ``NeuralMemory`` does not take is reported by ``unsupported``, so
the benchmarks run at any commit. ``gemm_shapes`` gives the memory's batched
matrix products at its real shapes.

The peers of ConvNeur (ConvNeXt-V2, PVTv2, ResNet-50) are the package's
``analysis.speed.MODELS``, which the user's speed tool times too.
"""
import contextlib
import copy
import gc
import inspect
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

M3_CONFIG = 'cls_convneur_m3_300e_in1k.py'
LOCAL_ONLY = {'model.backbone.memory_placement': 'none'}
M3_SIZE = 224  # ImageNet's side, the paper's speed protocol
MAX_LRS = (1.0, 0.2, 1e-3)
NEEDS_CUDA = 'skipped: needs CUDA'
# the bf16 autocast training step: a branch variant and a mode of the model section
TRAINING_MODE = 'train_bf16_autocast'

# name -> (memory_cfg keys, context, training, needs CUDA). Contexts: 'tf32'
# (TF32 products and convolutions), 'bf16' (CUDA/CPU bf16 autocast), None.
# 'float32' is the defaults ('auto': Triton kernels where they apply on
# CUDA), the reference of every row's error; 'torch_float32' the PyTorch path.
BRANCH_VARIANTS = {
    'float32': ({}, None, False, False),
    'torch_float32': ({'implementation': 'torch', 'operand_dtype': 'float32'}, None, False, False),
    'tf32': ({}, 'tf32', False, True),
    'bf16_autocast': ({}, 'bf16', False, False),
    'matmul_float32': ({'operand_dtype': 'float32'}, None, False, False),
    'matmul_bfloat16': ({'operand_dtype': 'bfloat16'}, None, False, False),
    'matmul_bfloat16_torch': ({'operand_dtype': 'bfloat16', 'implementation': 'torch'}, None,
                              False, False),
    'triton_float32': ({'operand_dtype': 'float32', 'implementation': 'triton'}, None, False,
                       True),
    'triton_bfloat16': ({'operand_dtype': 'bfloat16', 'implementation': 'triton'}, None, False,
                        True),
    'bf16_autocast_triton': ({'implementation': 'triton'}, 'bf16', False, True),
    # GELU's tanh form in the kernels' loops, against the exact form's row above
    'bf16_autocast_triton_tanh_gelu': ({'implementation': 'triton', 'gelu_approximate': 'tanh'},
                                       'bf16', False, True),
    'working_set_1024': ({'working_set_mib': 1024}, None, False, False),
    'working_set_256': ({'working_set_mib': 256}, None, False, False),
    'working_set_256_bf16_autocast': ({'working_set_mib': 256}, 'bf16', False, False),
    'train_float32': ({}, None, True, False),
    'train_recompute': ({'recompute': True}, None, True, False),
    TRAINING_MODE: ({}, 'bf16', True, False),
    'train_recompute_bf16_autocast': ({'recompute': True}, 'bf16', True, False),
    # the default backward is the closed form: autograd's is the row beside it
    'train_autograd_bf16_autocast': ({'backward': 'autograd'}, 'bf16', True, False),
    'train_triton_bf16_autocast': ({'implementation': 'triton'}, 'bf16', True, True),
    'train_triton_autograd_bf16_autocast': ({'implementation': 'triton',
                                             'backward': 'autograd'}, 'bf16', True, True),
}
# the memory variants whose numerics are measured against float64
NUMERICS_VARIANTS = ('float32', 'torch_float32', 'tf32', 'bf16_autocast', 'matmul_bfloat16',
                     'triton_float32', 'triton_bfloat16', 'bf16_autocast_triton',
                     'bf16_autocast_triton_tanh_gelu')
# whole-model rows besides M3 and local-only: the PyTorch path, the bounded
# working set
MODEL_VARIANTS = {'M3 implementation=torch': {'implementation': 'torch'},
                  'M3 working_set_256': {'working_set_mib': 256}}


def memories_of(model: torch.nn.Module) -> List[torch.nn.Module]:
    """``model``'s ``NeuralMemory`` modules, in order."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def pytorch_path_forced() -> Optional[str]:
    """Why no memory runs the Triton kernels in this process, whatever it
    asks (``CONVNEUR_MEMORY_IMPLEMENTATION=torch``, a rerun after a fault),
    or None: a row timed then would be the PyTorch path's under another name."""
    from convneur_mm.models.layers.memory_ops import dispatch
    if dispatch.FORCED_IMPLEMENTATION == 'torch':
        return f'{dispatch.FORCE_ENV}=torch puts every memory on the PyTorch path'
    return None


def describe_error(exc: BaseException) -> str:
    """``error: <type>: <message>`` on one line, at most 500 characters."""
    text = f'{type(exc).__name__}: {exc}'.strip()
    return 'error: ' + ' '.join(text.split())[:500]


def supported_memory_keys() -> Optional[List[str]]:
    """The keyword arguments the installed ``NeuralMemory`` takes (None: any,
    it takes ``**kwargs``)."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    params = inspect.signature(NeuralMemory.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name != 'self']


def backbone_memory_keys() -> Optional[List[str]]:
    """The ``memory_cfg`` keys the backbone passes on (None: it names none)."""
    from convneur_mm.models.backbones import convneur
    keys = getattr(convneur, 'MEMORY_KEYS', None)
    return list(keys) if keys is not None else None


def unsupported(cfg: Dict, keys: Optional[List[str]], who: str = 'NeuralMemory') -> Optional[str]:
    """Why a variant cannot run at this commit, or None."""
    missing = [k for k in cfg if keys is not None and k not in keys]
    if missing:
        return (f'skipped: {who} here takes no {", ".join(map(repr, missing))} '
                f'(it takes {", ".join(keys)})')
    return None


@contextlib.contextmanager
def precision(context: Optional[str], device: str) -> Iterator[None]:
    """The variant's context: TF32 products, bf16 autocast, or nothing."""
    if context == 'tf32':
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif context == 'bf16':
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all tensors together, in float64."""
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return math.sqrt(num / den) if den > 0 else math.nan


def median_ms(seconds: List[float]) -> float:
    """The median of ``seconds``, in ms."""
    from convneur_mm.analysis.timing import median
    return median(seconds) * 1e3


def free(device: str) -> None:
    """Collect garbage and hand CUDA's cached blocks back between measurements."""
    gc.collect()
    if device.startswith('cuda'):
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a context broken by a kernel's fault: the next measurement
            pass              # records that error, and the rows so far are kept


def memory_settings(memory: torch.nn.Module) -> Dict:
    """The settings a ``NeuralMemory`` was built with, as ``memory_cfg`` keys
    (``gelu_approximate`` where not the default: an earlier checkout has none)."""
    settings = dict(chunk_size=memory.chunk_size, max_lr=memory.max_lr, update=memory.update,
                    heads=memory.heads, scan_block=memory.scan_block)
    if getattr(memory, 'gelu_approximate', 'none') != 'none':
        settings['gelu_approximate'] = memory.gelu_approximate
    return settings


def memory_like(memory: torch.nn.Module, **cfg) -> torch.nn.Module:
    """A ``NeuralMemory`` with ``memory``'s weights and settings, ``cfg`` overriding."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    twin = NeuralMemory(memory.dim, **{**memory_settings(memory), **cfg})
    twin.load_state_dict(memory.state_dict())
    return twin.to(next(memory.parameters()).device)


def branch_like(branch: torch.nn.Module, cfg: Dict) -> torch.nn.Module:
    """A copy of a global branch whose memory takes ``cfg`` on top of its settings."""
    twin = copy.deepcopy(branch)
    twin.memory = memory_like(branch.memory, **cfg)
    return twin


def gemm_shapes(memory: torch.nn.Module, batch: int, tokens: int) -> Dict[str, Tuple]:
    """name -> (groups, m, k, n) of the memory's batched products for
    ``batch`` images of ``tokens`` tokens each (stage 1). Products with the
    shared W_0 run as one GEMM over all rows (groups = 1), as in the memory."""
    d, L = memory.head_dim, memory.chunk_size
    hidden = 4 * d
    updates = memory.num_updates(tokens)
    chunks = updates + 1
    shapes = {'projection x.W (B*N, d, d)': (1, batch * tokens, d, d),
              'read q.W1_t per chunk': (batch * chunks, L, d, hidden),
              'read h.W2_t per chunk': (batch * chunks, L, hidden, d)}
    if updates:
        rows = batch * updates * L
        shapes.update({
            'write K.W1_0 (B*U*L rows)': (1, rows, d, hidden),
            'write act.W2_0 (B*U*L rows)': (1, rows, hidden, d),
            'write per-chunk K^T.d_pre': (batch * updates, d, L, hidden),
            'write per-chunk act^T.d_hidden': (batch * updates, hidden, L, d),
            'scan coef.G (w1)': (batch, chunks, updates, d * hidden),
        })
    return shapes


def build_classifier(device: str, chunk_size: Optional[int] = None,
                     options: Optional[Dict] = None) -> torch.nn.Module:
    """ConvNeur-M3's ImageNet classifier from its config, with the memory's
    ``chunk_size`` and config ``options`` overriding, on ``device`` in eval mode."""
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    cfg = load_config(M3_CONFIG)
    if chunk_size:
        cfg.merge_from_dict({'model.backbone.memory_cfg.chunk_size': chunk_size})
    if options:
        cfg.merge_from_dict(options)
    return build_model(cfg, init=True).to(device).eval()


def logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> logits of a toolbox classifier."""
    return lambda x: model(x, mode='tensor')


def global_branches(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's ``GlobalBranch`` modules, in order."""
    from convneur_mm.models.layers.global_branch import GlobalBranch
    return [m for m in model.modules() if isinstance(m, GlobalBranch)]


def hooked_inputs(model: torch.nn.Module, x: torch.Tensor,
                  modules: List[torch.nn.Module]) -> List[torch.Tensor]:
    """The input each of ``modules`` gets in one forward of ``model`` on ``x``."""
    got: Dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: got.setdefault(id(mod), args[0]))
             for m in modules]
    try:
        with torch.no_grad():
            logits_fn(model)(x)
    finally:
        for h in hooks:
            h.remove()
    return [got[id(m)] for m in modules]


def convneur_backbone(arch: str = 'm3', device='cpu', seed: int = 0, **kwargs) -> torch.nn.Module:
    """``ConvNeur(arch, **kwargs)`` (its public constructor), its weights
    drawn after ``torch.manual_seed(seed)``, on ``device``.

    Args:
        arch: m1 to m4.
        device: where the module goes.
        seed: the seed of its weights.
        kwargs: the other constructor arguments (``memory_cfg``, ``memory_placement``...).
    """
    from convneur_mm.models import ConvNeur
    torch.manual_seed(seed)
    return ConvNeur(arch=arch, **kwargs).to(device)


def stage_branches(backbone: torch.nn.Module, first_only: bool = False
                   ) -> List[Tuple[int, torch.nn.Module]]:
    """(stage, global branch) of every block of ``backbone`` that has one
    (``first_only``: each stage's first one)."""
    found = [(stage, block.global_branch) for stage, blocks in enumerate(backbone.stages)
             for block in blocks if block.global_branch is not None]
    if first_only:
        found = [(stage, branch) for i, (stage, branch) in enumerate(found)
                 if i == 0 or found[i - 1][0] != stage]
    return found


def branch_inputs(branches: List[Tuple[int, torch.nn.Module]], batch: int,
                  size: Union[int, Tuple[int, int]] = M3_SIZE, device='cpu',
                  seed: int = 1) -> List[torch.Tensor]:
    """Random inputs of each branch's shape at ``batch`` images of ``size``
    (a side, or (H, W); stage s sees ``H / 4 / 2**s`` by ``W / 4 / 2**s``
    pixels); on 'meta' empty ones."""
    gen = torch.Generator().manual_seed(seed)
    height, width = (size, size) if isinstance(size, int) else size
    shapes = [(batch, branch.proj_in.in_channels, height // 4 // 2**stage, width // 4 // 2**stage)
              for stage, branch in branches]
    if str(device) == 'meta':
        return [torch.empty(shape, device='meta') for shape in shapes]
    return [torch.randn(shape, generator=gen).to(device) for shape in shapes]
