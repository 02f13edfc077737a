"""``torch.compile`` for training and evaluation runs (``--compile``).

MMEngine's own ``compile`` setting is not used: it compiles the whole
``train_step`` (preprocessing, loss parsing, backward and optimizer step, each
a graph break), in training only, and cannot say that input sizes vary.
Instead the parts that are one static network (``COMPILED_PARTS``) get their
``forward`` replaced by a compiled one (``compile_forward``): checkpoints,
hooks, DDP and the data-dependent detection heads stay as they are, and the
same compiled modules serve training and evaluation. ``forward`` is compiled,
not ``__call__``, because MMSegmentation's heads call ``self.forward``.

Training compiles static shapes (a graph per shape up to the recompile limit,
then eager): automatic dynamic shapes fail in Inductor on a training run's
second size (pytorch/pytorch#185510). Evaluation saves nothing for backward
and uses automatic dynamic shapes. ``bucket_detection_sizes`` pads detection
batches to a few sizes so that training meets few shapes;
``CompilationCountHook`` logs the graphs compiled per epoch.
"""
import functools
import inspect
import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from torch import nn

from convneur_mm.models.utils.shapes import ceil_to
from .wrapping import inner_model

COMPILED_PARTS = ('backbone', 'neck', 'decode_head', 'auxiliary_head', 'head')
MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
# the modes that record CUDA graphs, each with its twin without them: what
# training compiles with when the optimizer accumulates gradients, which a
# CUDA graph's replay overwrites (torch raises "accessing gradient tensor
# output of CUDAGraphs that has been overwritten"; pytorch/pytorch#169545,
# open)
WITHOUT_CUDAGRAPHS = {'reduce-overhead': 'default', 'max-autotune': 'max-autotune-no-cudagraphs'}
# CUDA graphs are recorded one per concrete input size, also for a graph with
# symbolic sizes, and without a limit (PyTorch only warns); evaluation stays
# static in these modes, bounded by the recompile limit
CUDAGRAPH_MODES = tuple(WITHOUT_CUDAGRAPHS)
# torch >= 2.13 keeps a compiled function's graphs and recompile limit apart
# from other compilations of the same code; older torch has no such keyword
# and compiles without it
ISOLATE_RECOMPILES = 'isolate_recompiles' in inspect.signature(torch.compile).parameters


def add_compile_argument(parser) -> None:
    """The ``--compile [MODE]`` option that tools/train.py and tools/test.py share."""
    parser.add_argument('--compile', nargs='?', const='default', choices=MODES,
                        help='torch.compile the backbone, neck and dense heads (optional '
                        'mode, default "default"; see convneur_mm/engine/compile.py)')


def compilable_parts(model: nn.Module, parts: Optional[Sequence[str]] = None) -> List[str]:
    """The names of ``model``'s parts to compile: ``parts`` (each must exist)
    or those of ``COMPILED_PARTS`` the model has."""
    model = inner_model(model)
    names = [p for p in (parts or COMPILED_PARTS) if getattr(model, p, None) is not None]
    if parts is not None and len(names) != len(parts):
        missing = sorted(set(parts) - set(names))
        raise ValueError(f'{type(model).__name__} has no part(s) {missing} to compile')
    if not names:
        raise ValueError(f'{type(model).__name__} has none of {COMPILED_PARTS} to compile')
    return names


def compile_model(model: nn.Module, parts: Optional[Sequence[str]] = None,
                  mode: str = 'default', dynamic: Optional[bool] = False,
                  backend: str = 'inductor',
                  inference_dynamic: Optional[bool] = None,
                  training_mode: Optional[str] = None) -> List[str]:
    """Compile ``model``'s parts in place; returns the names compiled.

    Args:
        model: a toolbox model, or a wrapper (DDP) around one.
        parts: see ``compilable_parts``; a part that is a ``ModuleList``
            (UperNet's auxiliary heads) has each entry compiled.
        mode, backend: passed to ``torch.compile``.
        dynamic, inference_dynamic: ``torch.compile``'s ``dynamic`` with and
            without gradients (``compile_forward``).
        training_mode: the mode with gradients, where it is not ``mode``
            (``training_compile_mode``).
    """
    for name in (mode, training_mode or mode):
        if name not in MODES:
            raise ValueError(f'compile mode must be one of {MODES}, got {name!r}')
    names = compilable_parts(model, parts)
    for module in part_modules(model, names):
        module.forward = compile_forward(module, mode=mode, dynamic=dynamic, backend=backend,
                                         inference_dynamic=inference_dynamic,
                                         training_mode=training_mode)
    return names


def accumulative_counts(cfg) -> int:
    """The most iterations a config's optimizer wrapper (or any of an
    ``OptimWrapperDict``'s) accumulates gradients over before a step."""
    wrapper = cfg.get('optim_wrapper') or {}
    wrappers = [wrapper] + [w for w in wrapper.values() if isinstance(w, dict)]
    return max(int(w.get('accumulative_counts', 1) or 1) for w in wrappers)


def training_compile_mode(mode: str, accumulation: int) -> str:
    """The mode training compiles with: ``mode``, without its CUDA graphs
    when gradients accumulate over several iterations (the ImageNet configs:
    4-16). A CUDA graph's replay overwrites the gradients that the previous
    replay handed to ``param.grad``: on CUDA, ``reduce-overhead`` and
    ``max-autotune`` stop at the second iteration (torch 2.13; older torch
    summed wrong gradients silently). Evaluation keeps ``mode``."""
    if accumulation > 1 and mode in WITHOUT_CUDAGRAPHS:
        return WITHOUT_CUDAGRAPHS[mode]
    return mode


def part_modules(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """The modules whose ``forward`` compiling the named parts replaces: each
    part, or each entry of a part that is a ``ModuleList`` (UperNet's
    auxiliary heads); a wrapper (DDP, test-time augmentation) is looked through."""
    model = inner_model(model)
    modules = []
    for name in names:
        part = getattr(model, name)
        modules.extend(part if isinstance(part, nn.ModuleList) else [part])
    return modules


def compile_forward(module: nn.Module, dynamic: Optional[bool] = False,
                    inference_dynamic: Optional[bool] = None,
                    training_mode: Optional[str] = None, **compile_kwargs) -> Callable:
    """``torch.compile`` of the module's own ``forward`` (not of an instance
    attribute set by an earlier call: compiling twice is refused), with
    ``dynamic`` where autograd records (training) and ``inference_dynamic``
    where it does not (validation, testing: automatic dynamic shapes by
    default, so that evaluation's varying sizes mostly share a graph; static
    in the modes that record CUDA graphs, ``CUDAGRAPH_MODES``).

    The two keep their graphs apart (``isolate_recompiles``): each has its
    own ``recompile_limit`` (8), so a detector's training buckets and its
    evaluation's graphs do not use up each other's, and one of them running
    out does not send the other to eager. ``training_mode``, where given,
    replaces ``mode`` where autograd records."""
    if 'forward' in vars(module):
        raise ValueError(f'{type(module).__name__}.forward is already replaced '
                         '(compiled twice?)')
    if inference_dynamic is None and compile_kwargs.get('mode') in CUDAGRAPH_MODES:
        inference_dynamic = False
    if ISOLATE_RECOMPILES:
        compile_kwargs['isolate_recompiles'] = True
    else:
        _warn_shared_recompile_limit()
    training_kwargs = dict(compile_kwargs, mode=training_mode) if training_mode else compile_kwargs
    training = torch.compile(module.forward, dynamic=dynamic, **training_kwargs)
    inference = torch.compile(module.forward, dynamic=inference_dynamic, **compile_kwargs)

    @functools.wraps(module.forward)
    def forward(*args, **kwargs):
        return (training if torch.is_grad_enabled() else inference)(*args, **kwargs)
    return forward


@functools.lru_cache(maxsize=None)
def _warn_shared_recompile_limit() -> None:
    """Once a process: without ``isolate_recompiles`` training and
    evaluation share one recompile limit (guards on grad mode still keep their
    graphs apart)."""
    print_log(f'torch {torch.__version__} has no torch.compile(isolate_recompiles=...) '
              '(torch >= 2.13): training and evaluation share one recompile limit of '
              f'{torch._dynamo.config.recompile_limit} graphs', logger='current',
              level=logging.WARNING)


def compile_runner_model(runner, mode: str = 'default', dynamic: Optional[bool] = False,
                         backend: str = 'inductor', training: bool = True) -> None:
    """``--compile`` of tools/train.py and tools/test.py (``training=False``),
    after the runner is built (its model exists, maybe wrapped) and before it
    trains or tests."""
    if runner.cfg.get('compile'):
        raise ValueError('--compile replaces MMEngine\'s cfg.compile (which compiles '
                         'train_step only); remove one of them')
    accumulation = accumulative_counts(runner.cfg) if training else 1
    training_mode = training_compile_mode(mode, accumulation)
    if training_mode != mode:
        print_log(f'--compile {mode}: training compiles as {training_mode!r} (no CUDA graphs), '
                  f'since the optimizer accumulates gradients over {accumulation} iterations '
                  'and a CUDA graph\'s replay overwrites them; evaluation keeps '
                  f'{mode!r}', logger='current', level=logging.WARNING)
    names = compile_model(runner.model, mode=mode, dynamic=dynamic, backend=backend,
                          training_mode=training_mode)
    runner.register_hook(CompilationCountHook(), priority='VERY_LOW')
    evaluation_shapes = 'static' if mode in CUDAGRAPH_MODES else 'automatic dynamic'
    print_log(f'torch.compile ({training_mode} in training, {mode} in evaluation; '
              f'dynamic={dynamic} in training, {evaluation_shapes} '
              'shapes in evaluation) of the model\'s '
              f'{", ".join(names)}; the first iterations compile (minutes on a CPU)',
              logger='current')


def _is_size(value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) for v in value))


def find_resize_scale(node) -> Optional[Tuple[int, int]]:
    """The ``scale`` of the first keep-ratio ``Resize`` in a (wrapped) dataset
    config's pipeline; for a multi-scale ``RandomResize`` (``scale`` a range
    of two sizes, mmdet's ``[(1333, 640), (1333, 800)]``), the longest and
    shortest side of the range."""
    if isinstance(node, dict):
        scale = node.get('scale')
        if str(node.get('type', '')).endswith('Resize') and node.get('keep_ratio'):
            if _is_size(scale):
                return tuple(scale)
            if isinstance(scale, (tuple, list)) and len(scale) == 2 and all(map(_is_size, scale)):
                sides = [side for size in scale for side in size]
                return max(sides), min(sides)
        children = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return None
    return next((found for found in map(find_resize_scale, children) if found), None)


def bucket_detection_sizes(cfg) -> Optional[Tuple[int, ...]]:
    """For ``--compile`` of a detector: pad its training batches up to three
    side lengths, the resize's short and long sides and their middle (each a
    multiple of ``pad_size_divisor``): (800, 1088, 1344) for COCO's 1333x800.
    Returns the buckets, or None where the config is no detector with a
    keep-ratio ``Resize``, or has batch augments of its own (left alone)."""
    preprocessor = cfg.get('model', {}).get('data_preprocessor') or {}
    if not str(preprocessor.get('type', '')).endswith('DetDataPreprocessor') \
            or preprocessor.get('batch_augments'):
        return None
    scale = find_resize_scale(cfg.get('train_dataloader', {}).get('dataset'))
    if scale is None:
        return None
    divisor = preprocessor.get('pad_size_divisor', 1) or 1
    short, long = sorted(scale)
    buckets = tuple(sorted({ceil_to(math.ceil(s), divisor)
                            for s in (short, (short + long) / 2, long)}))
    preprocessor['batch_augments'] = [dict(
        type='convneur_mm.BucketPad', buckets=buckets,
        pad_mask=bool(preprocessor.get('pad_mask', False)),
        pad_seg=bool(preprocessor.get('pad_seg', False)))]
    print_log(f'--compile: training batches padded to sides {buckets} (convneur_mm.BucketPad), '
              'so that the compiled backbone and neck meet few input shapes', logger='current')
    return buckets


class CompilationCountHook(Hook):
    """Logs after every epoch how many graphs were compiled during it: after
    the first epoch a count above zero means recompilations (``TORCH_LOGS=
    recompiles`` names their reasons), which cost minutes each on a CPU."""

    def __init__(self) -> None:
        self.seen = graphs_compiled()
        self.history: List[tuple] = []  # (what, graphs compiled during it)

    def _log(self, runner, what: str) -> None:
        count = graphs_compiled()
        self.history.append((what, count - self.seen))
        print_log(f'torch.compile: {count - self.seen} graph(s) compiled during {what} '
                  f'({count} in this process)', logger='current')
        self.seen = count

    def after_train_epoch(self, runner) -> None:
        # an iteration-based loop ends its one "epoch" with the run
        by_iter = isinstance(runner.train_loop, IterBasedTrainLoop)
        self._log(runner, 'training' if by_iter else f'training epoch {runner.epoch + 1}')

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._log(runner, 'validation')

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._log(runner, 'testing')


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled so far in this process (first compilations
    and recompilations; ``TORCH_LOGS=recompiles`` names each recompilation's
    reason)."""
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']
