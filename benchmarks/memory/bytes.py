"""The bytes the neural memory moves, counted three ways: the ATen ops a
global branch or a backbone dispatches (``count_ops``, the ``ops`` case),
the memory's write and read in one training step at a backbone's shapes
(``count_step_bytes``, the ``bytes`` case), and what ``torch.compile``'s
kernels move by Inductor's own count (``InductorByteCounter``).

**The write and read step.** The bytes their ATen ops move and their time,
autograd's backward against the closed-form one (``chunk_grads_closed_form``, ``read_closed_form``), and the
bytes of the Triton kernels' operators (``TRITON``), forward and backward;
the projections' training step, autograd, closed form and Triton operators;
and each stage's whole global branch (``count_branch_step_bytes``).

    python -m benchmarks.run bytes [--arch m3] [--size 224] [--batch 128]
        [--time-batch 2] [--step-batch 2] [--rounds 5] [--compiled-batch 128]

One step is the forward and backward of each stage's chunk gradients (the
write, ``chunk_grads_torch``) and read (``read_torch``), called directly at
the shapes the stage's first global branch gives them with the default memory
settings (no decomposed read); everything else of the branch (projections,
scan, gates) is left out, its states and queries are inputs. Bytes are
counted on meta tensors with ``AtenOpCounter`` (each kernel's tensor arguments and results,
each read or written once), so a training-sized batch counts in seconds. On
meta tensors the Triton operators run their fakes: each counts as its
arguments and results, and the scratch its kernels write and read again
(the (T, d) tensors between two passes, per-chunk shares before their sum)
is not counted.
``--step-batch`` also times whole training steps of the backbone, both
backward passes in turns (``time_backbone_steps``). ``--compiled-batch``
also counts the branches' step compiled by ``torch.compile``
(``count_compiled_branch_step_bytes``): Inductor's fused kernels, by its own
count, running the step for real on the CPU.

**Op counts** (``count_ops``): the ATen ops a global branch or a backbone
dispatches in eager mode, the bytes they move, the most it holds, counted
with ``AtenOpCounter`` and ``LiveTensorBytes`` of
``convneur_mm.testing.dispatch_probes``. Ops that return no tensor are left
out, and views (which launch nothing) are counted apart. Each kernel's tensor
arguments and results are summed in bytes as if each were read or written
once: the least memory traffic of the unfused ops. On ``meta`` tensors (no
data: a training-sized batch in seconds) the ops dispatch as on a CPU, but
16-bit products outside autograd write float32 directly, as on CUDA
(``memory_ops.product``), instead of a widening cast.
With ``implementation='triton'`` on ``meta`` the fused kernels' wrappers allocate
what they would on a GPU and their launches do nothing: the inference count
of CUDA's fused path (the wrappers run without their operators' autograd:
inference counts only). Where compiled Triton is installed, a second call
records what an sm_90 GPU of 132 multiprocessors would launch, ATen kernels
and Triton launches (its grids sized for that GPU: a chunk's projections in
row groups at a small batch): every kernel a GPU launches, what bounds a
small batch's time. ``count_ops`` imports the model inside, so that
``isolated.run_isolated`` can run it against an older checkout's package.

**Inductor's count.** ``AtenOpCounter`` prices eager code: one kernel per
ATen op. Compiled code runs Inductor's kernels instead, each a fusion of
many ops that reads its inputs and writes its outputs once. ``InductorByteCounter`` reads Inductor's
own count of each generated kernel's (and each library product's) buffers,
read or written once, over every graph compiled inside the context: the
forward's, and the backward's where a backward runs there. The count is the
plan Inductor made for the device it compiled for (a CPU's fusions, here);
the code in the context runs for real.
"""
import argparse
import contextlib
import logging
import math
import sys
from collections import Counter
from typing import (TYPE_CHECKING, Callable, ContextManager, Dict, Iterator, List, NamedTuple,
                    Optional, Tuple)

import torch

# Module level: only what an older checkout's run of ``count_ops`` takes from
# this tree (``OWN_MODULES``); the memory's ops are imported where they are used.
from convneur_mm.analysis.timing import median, time_in_turns
from convneur_mm.testing.dispatch_probes import AtenOpCounter, LiveTensorBytes
from convneur_mm.utils.cli import positive_int

if TYPE_CHECKING:  # not at run time: see OWN_MODULES
    from benchmarks.common.record import Record

PATHS = ('autograd', 'closed form')  # the PyTorch path's, counted and timed
TRITON = 'Triton kernels (operators)'  # counted only: a CPU runs them in the interpreter
PARTS = ('branch', 'backbone', 'local-only')  # what count_ops counts
# the modules a count against an older checkout takes from this tree
OWN_MODULES = ('convneur_mm.testing.dispatch_probes', 'convneur_mm.analysis.timing')


def _functions(path: str) -> Tuple[Callable, Callable]:
    """The chunk gradients' and the read's function of ``path``."""
    from convneur_mm.models.layers.memory_ops import (chunk_grads_closed_form, chunk_grads_torch,
                                                      chunk_grads_triton, read_closed_form,
                                                      read_torch, read_triton)
    return {'autograd': (chunk_grads_torch, read_torch),
            'closed form': (chunk_grads_closed_form, read_closed_form),
            TRITON: (chunk_grads_triton, read_triton)}[path]


class MemoryShape(NamedTuple):
    """One stage's memory at a batch: ``tokens`` N per image in chunks of
    ``chunk`` L; U = (N - 1) // L chunks write, every chunk reads."""
    batch: int
    tokens: int
    chunk: int
    heads: int
    head_dim: int

    @property
    def writes(self) -> int:
        return (self.tokens - 1) // self.chunk


def backbone_shapes(arch: str = 'm3', size: int = 224, batch: int = 128) -> List[MemoryShape]:
    """The memory shapes of each stage's global branch of ``ConvNeur(arch)``
    with its default memory settings, at ``size`` x ``size`` images."""
    from convneur_mm.models.backbones.convneur import ConvNeur
    settings, cfg = ConvNeur.arch_settings[arch], ConvNeur.default_memory_cfg
    heads = cfg['heads']
    return [MemoryShape(batch, (size // 4 // 2**stage)**2, cfg['chunk_size'], heads,
                        settings['memory_dim'] // heads)
            for stage in range(len(settings['dims']))]


class StepInputs(NamedTuple):
    """A stage's write and read inputs and the cotangents of their outputs.

    ``write``: (W_0, keys, values, token_lr), keys (H, chunks, L, hd), or None
    where the stage writes nothing; ``read``: (states, queries), states per
    group (one chunk of L queries each); ``cotangents``: of the write's three
    per-chunk gradients (if any) and of the read-out, in that order."""
    write: Optional[tuple]
    read: tuple
    cotangents: List[torch.Tensor]


def _drawing(dtype, device, seed: int) -> Callable[..., torch.Tensor]:
    """``tensor(*size, scale=1, mean=0, positive=False)``: random tensors from
    one generator seeded with ``seed``, normal (or uniform on [0, 1) where
    ``positive``) times ``scale`` plus ``mean``; on 'meta' no data is drawn."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(*size: int, scale: float = 1.0, mean: float = 0.0,
               positive: bool = False) -> torch.Tensor:
        if torch.device(device).type == 'meta':  # no data to draw
            return torch.empty(size, device=device, dtype=dtype)
        t = torch.rand(size, generator=gen) if positive else torch.randn(size, generator=gen)
        return (t * scale + mean).to(device, dtype)
    return tensor


def write_read_inputs(shape: MemoryShape, dtype=torch.float32, device='cpu',
                      seed: int = 0) -> StepInputs:
    """Random inputs of a stage's write and read (leaves that require grad),
    scaled as the memory's: the weights at 1/sqrt(fan-in), positive step sizes.

    Args:
        shape: the stage's memory (``backbone_shapes``).
        dtype: the inputs' dtype.
        device: where the tensors live ('meta' for a count without data).
        seed: of the random inputs.
    """
    from convneur_mm.models.layers.memory_ops import MemoryWeights
    h, hd, L = shape.heads, shape.head_dim, shape.chunk
    tensor = _drawing(dtype, device, seed)

    def leaf(*size: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
        return tensor(*size, scale=scale, positive=positive).requires_grad_()

    def weights(groups: int) -> MemoryWeights:
        return MemoryWeights(leaf(groups, hd, 4 * hd, scale=hd**-0.5),
                             leaf(groups, 4 * hd, hd, scale=(4 * hd)**-0.5),
                             leaf(groups, hd, scale=0.1))

    chunks = shape.batch * shape.writes
    if chunks:  # the chunks' gradients at W_0; chunk t reads state t (one group each)
        write = (weights(h), leaf(h, chunks, L, hd), leaf(h, chunks, L, hd),
                 leaf(h, chunks, L, positive=True))
        groups = h * shape.batch * (shape.writes + 1)
        read = (weights(groups), leaf(groups, L, hd))
    else:  # one chunk: no write, every token reads W_0
        write, read = None, (weights(h), leaf(h, shape.batch * shape.tokens, hd))
    # the outputs' shapes: the write's per-chunk gradients, the read-outs
    out_shapes = [] if write is None else [(h, chunks, *w.shape[1:]) for w in write[0]]
    return StepInputs(write, read, [tensor(*size) for size in out_shapes + [read[1].shape]])


class ProjectionInputs(NamedTuple):
    """A stage's projection inputs: ``x`` (B, N, d), the layers' ``weights``
    (``ProjectionWeights``), leaves that require grad, and the cotangents of
    the five results (``Projected``'s shapes)."""
    x: torch.Tensor
    weights: tuple
    cotangents: List[torch.Tensor]


def projection_inputs(shape: MemoryShape, dtype=torch.float32, device='cpu',
                      seed: int = 0) -> ProjectionInputs:
    """Random inputs of a stage's projections, scaled as the layers': the
    products' weights at 1/sqrt(fan-in), the norms' weights near one, the
    biases and zero-centred gains near zero. ``device`` 'meta': no data."""
    from convneur_mm.models.layers.memory_ops.project import ProjectionWeights, projection_shapes
    h, hd = shape.heads, shape.head_dim
    d, b, n, tokens = h * hd, shape.batch, shape.tokens, shape.writes * shape.chunk
    tensor = _drawing(dtype, device, seed)

    def weight(name: str, size: tuple) -> torch.Tensor:
        if name.endswith('norm'):
            return tensor(*size, scale=0.1, mean=1.0)
        if name.endswith(('bias', 'gamma')):
            return tensor(*size, scale=0.1)
        return tensor(*size, scale=d**-0.5)

    weights = ProjectionWeights(*(weight(name, size).requires_grad_() for name, size in
                                  projection_shapes(d, h)._asdict().items()))
    x = tensor(b, n, d).requires_grad_()
    cotangents = [tensor(h, b, n, hd), tensor(h, b, tokens, hd), tensor(h, b, tokens, hd),
                  tensor(h, b, tokens), tensor(b, shape.writes, d)]
    return ProjectionInputs(x, weights, cotangents)


def write_read_step(shape: MemoryShape, path: str,
                    operand_dtype: Optional[torch.dtype] = None, dtype=torch.float32,
                    device='cpu', seed: int = 0) -> Callable[[], None]:
    """One training step of the stage's write and read: their forward and the
    gradients of every input (W_0, keys, values, step sizes; states, queries)
    from fixed output gradients, as a call without arguments.

    Args:
        shape: the stage's memory (``backbone_shapes``).
        path: one of ``PATHS`` or ``TRITON``.
        operand_dtype: the products' operand dtype (``product``).
        dtype, device, seed: of the inputs (``write_read_inputs``).
    """
    write, read, cotangents = write_read_inputs(shape, dtype, device, seed)
    grads_fn, read_fn = _functions(path)
    inputs = [t for part in (write or (), read) for t in flat_inputs(part)]

    def step() -> None:
        outputs = _outputs(write, read, grads_fn, read_fn, operand_dtype)
        torch.autograd.grad(outputs, inputs, cotangents)

    return step


def flat_inputs(part) -> List[torch.Tensor]:
    """A write's or read's inputs as one list, the weights' tensors first."""
    return [t for item in part for t in (item if isinstance(item, tuple) else (item, ))]


def _outputs(write, read, grads_fn, read_fn, operand_dtype) -> List[torch.Tensor]:
    outputs = [] if write is None else list(grads_fn(*write, operand_dtype=operand_dtype))
    return outputs + [read_fn(*read, operand_dtype=operand_dtype)]


def count_step_bytes(shapes: List[MemoryShape], operand_dtype: Optional[torch.dtype] = None
                     ) -> Dict[str, List[int]]:
    """Bytes the ATen ops of ``write_read_step`` move, per path and stage,
    counted on meta tensors (float32 inputs), where the products outside
    autograd write float32 directly as on CUDA (``product``)."""
    counts: Dict[str, List[int]] = {path: [] for path in PATHS + (TRITON, )}
    for shape in shapes:
        for path in PATHS + (TRITON, ):
            step = write_read_step(shape, path, operand_dtype, device='meta')
            with AtenOpCounter() as counter:
                step()
            counts[path].append(counter.total_bytes)
    return counts


def time_steps(shape: MemoryShape, rounds: int, operand_dtype: Optional[torch.dtype] = None,
               device='cpu') -> Dict[str, List[float]]:
    """Seconds of float32 ``write_read_step`` calls per path, in turns."""
    steps = {path: write_read_step(shape, path, operand_dtype, device=device) for path in PATHS}
    return time_in_turns(steps, rounds, device, warmup=1)


def time_backbone_steps(arch: str = 'm3', batch: int = 2, size: int = 224, rounds: int = 5,
                        device='cpu') -> Dict[str, List[float]]:
    """Seconds of training steps (forward, backward, AdamW) of one float32
    ``ConvNeur(arch)``, its memories' ``backward`` 'closed_form' and
    'autograd' in turns (``time_in_turns``, one warm-up turn).

    Args:
        arch: the backbone.
        batch: images per step.
        size: their side.
        rounds: timed turns.
        device: where to run.
    """
    from benchmarks.common.subjects import convneur_backbone, memories_of
    model = convneur_backbone(arch, device).train()
    memories = memories_of(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randn(batch, 3, size, size, device=device)

    def step(backward: str) -> Callable[[], None]:
        def run() -> None:
            for memory in memories:
                memory.backward = backward
            optimizer.zero_grad(set_to_none=True)
            sum(out.mean() for out in model(x)).backward()
            optimizer.step()
        return run

    return time_in_turns({path: step(backward) for path, backward in
                          zip(PATHS, ('autograd', 'closed_form'))}, rounds, device, warmup=1)


def count_projection_bytes(shapes: List[MemoryShape],
                           operand_dtype: Optional[torch.dtype] = None
                           ) -> Dict[str, List[int]]:
    """Bytes of one training step of each stage's projections (forward and
    every input's gradient, on meta tensors): autograd through
    ``project_torch``, its closed-form backward (``project_closed_form``) and
    the Triton operators (``TRITON``: each counts as its arguments and
    results; the backward's product gradient, which its weight GEMMs read,
    is not counted)."""
    from convneur_mm.models.layers.memory_ops.project import (project_closed_form, project_torch,
                                                              project_triton)
    functions = dict(zip(PATHS + (TRITON, ), (project_torch, project_closed_form, project_triton)))
    counts: Dict[str, List[int]] = {path: [] for path in functions}
    for shape in shapes:
        for path, fn in functions.items():
            x, weights, _ = projection_inputs(shape, device='meta')
            with AtenOpCounter() as counter:
                out = fn(x, weights, shape.writes, shape.chunk, 1.0, operand_dtype)
                out = [t for t in out if t.requires_grad]  # no writes: empty results
                torch.autograd.backward(out, [torch.empty_like(t) for t in out])
            counts[path].append(counter.total_bytes)
    return counts


def _branch_steps(arch: str, size: int, batch: int, memory_cfg: Optional[dict],
                  device: str) -> Iterator[Tuple[torch.nn.Module, torch.Tensor]]:
    """Each stage's first global branch of ``ConvNeur(arch)`` in training
    mode on ``device``, with an input of ``batch`` images needing its gradient."""
    from benchmarks.common.subjects import branch_inputs, convneur_backbone, stage_branches
    model = convneur_backbone(arch, device, memory_cfg=memory_cfg).train()
    branches = stage_branches(model, first_only=True)
    for (_, branch), x in zip(branches, branch_inputs(branches, batch, size, device, seed=0)):
        yield branch, x.requires_grad_()


def _train_step(branch: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    out = branch(x)
    # an empty cotangent launches no kernel to count; real tensors need values
    out.backward(torch.empty_like(out) if out.is_meta else torch.ones_like(out))


def count_branch_step_bytes(arch: str = 'm3', size: int = 224, batch: int = 128,
                            memory_cfg: Optional[dict] = None) -> List[int]:
    """Bytes of one training step (forward and backward, every input's
    gradient) of each stage's first global branch of ``ConvNeur(arch)``,
    whole (projections, write, scan, read, gates, its 1x1 convolutions), on
    meta tensors. With ``implementation='triton'`` in ``memory_cfg`` the memory's
    operators run their fakes: each counts as its arguments and results."""
    counts = []
    for branch, x in _branch_steps(arch, size, batch, memory_cfg, 'meta'):
        with AtenOpCounter() as counter:
            _train_step(branch, x)
        counts.append(counter.total_bytes)
    return counts


def count_compiled_branch_step_bytes(arch: str = 'm3', size: int = 224, batch: int = 2,
                                     memory_cfg: Optional[dict] = None) -> List[int]:
    """The step of ``count_branch_step_bytes``, each branch compiled by
    ``torch.compile`` (Inductor, for the CPU): the bytes its kernels move by
    Inductor's own count (``InductorByteCounter``), forward and backward
    graphs. The step runs for real on the CPU, so ``batch`` is a CPU's.
    A graph break is an error: code past it would run eagerly, uncounted."""
    counts = []
    for branch, x in _branch_steps(arch, size, batch, memory_cfg, 'cpu'):
        with InductorByteCounter() as counter:
            _train_step(torch.compile(branch, fullgraph=True), x)
        counts.append(counter.total_bytes)
    return counts


# ------------------------------------------------------------ op counts
def _kernels_without_launches() -> ContextManager:
    """The Triton kernels' wrappers checking and allocating as on a GPU, on
    any device, launching nothing (the memory's ``without_launches``)."""
    try:
        from convneur_mm.models.layers.memory_ops.kernels import without_launches
    except ImportError:  # an older checkout's package (``isolated.run_isolated``)
        raise ValueError('this package\'s memory cannot run its kernels without launching '
                         "them: count with implementation='torch'") from None
    return without_launches()


def _gpu_launches(call: Callable[[], object]) -> Optional[Tuple[int, Dict[str, int]]]:
    """(ATen kernels, Triton launches by kernel) of ``call`` as an sm_90 GPU of 132
    multiprocessors would launch them: its launches recorded
    (``recording_launches``: compiled Triton, not its interpreter), which
    also sizes grids by that GPU (a chunk's projections in row groups at a
    small batch); None where they cannot be recorded. A call of its own: a
    recording holds every launch's tensors, which the live bytes must not see."""
    try:
        from convneur_mm.models.layers.memory_ops.kernels.availability import load_kernels
        from convneur_mm.models.layers.memory_ops.kernels.launcher import recording_launches
    except ImportError:  # an older checkout's package, without recordings
        return None
    kernels, _, interpreted = load_kernels('read')
    if kernels is None or interpreted:
        return None
    with recording_launches(90) as launches, AtenOpCounter() as counter:
        call()
    # an empty grid launches nothing (Triton's launcher skips it)
    return counter.num_kernels, dict(Counter(x.kernel.__name__ for x in launches
                                             if math.prod(x.grid)))


def count_ops(arch: str = 'm3', stage: int = 0, size: int = 224, batch: int = 1,
              device: str = 'cpu', memory_cfg: Optional[Dict] = None,
              part: str = 'branch') -> dict:
    """Kernels, views and bytes of one forward pass, without and with autograd.

    Args:
        arch: ConvNeur's arch (``'m1'`` ... ``'m4'``).
        stage: the stage whose first global branch is counted (``part='branch'``).
        size: the image side; a stage-``s`` branch sees ``size // 4 // 2**s``.
        batch: the batch.
        device: ``'cpu'`` or ``'meta'`` (shapes only).
        memory_cfg: overrides of the memory's ``memory_cfg``.
        part: ``'branch'`` (the stage's first global branch), ``'backbone'``
            or ``'local-only'`` (the backbone without global branches).

    Returns:
        ``{'inference': {...}, 'autograd': {...}}`` (no ``'autograd'`` for
        the stubbed fused kernels), each with ``kernels``, ``views``,
        ``by_op``, ``peak_live_bytes``, ``bytes`` and ``bytes_by_op``.
    """
    from convneur_mm.models import ConvNeur
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    if device not in ('cpu', 'meta'):
        raise ValueError(f"device must be 'cpu' or 'meta', got {device!r}")
    memory_cfg = memory_cfg or {}
    stubbed = device == 'meta' and memory_cfg.get('implementation') == 'triton'
    torch.manual_seed(0)
    options = dict(memory_placement='none') if part == 'local-only' else {}
    if memory_cfg:
        keys = getattr(sys.modules[ConvNeur.__module__], 'MEMORY_KEYS', None)
        options['memory_cfg'] = as_installed(memory_cfg, keys)
    model = ConvNeur(arch=arch, **options).eval().to(device)
    if part == 'branch':
        block = next(b for b in model.stages[stage] if b.global_branch is not None)
        channels = block.local_branch.dwconv.in_channels
        side = size // 4 // 2**stage
        module, x = block.global_branch, torch.randn(batch, channels, side, side, device=device)
    else:
        module, x = model, torch.randn(batch, 3, size, size, device=device)
    result = {}
    for grad in (False, ) if stubbed else (False, True):
        with torch.set_grad_enabled(grad), AtenOpCounter() as counter, \
                LiveTensorBytes() as live, \
                _kernels_without_launches() if stubbed else contextlib.nullcontext():
            module(x)
        result['autograd' if grad else 'inference'] = dict(
            kernels=counter.num_kernels, views=counter.num_views,
            by_op=dict(counter.kernels.most_common()), peak_live_bytes=live.peak,
            bytes=counter.total_bytes, bytes_by_op=dict(counter.bytes.most_common()))
    if stubbed:
        with torch.no_grad():
            result['inference']['gpu_launches'] = _gpu_launches(lambda: module(x))
    return result


def format_op_counts(counts: Dict[str, dict], top: int = 8) -> str:
    """Markdown: one line per code counted (``{name: count_ops(...)}``), then
    the ``top`` ops that move the most bytes in inference, of the last one."""
    lines = ['| code | inference: kernels | on an sm_90 GPU: ATen + Triton launches | views | '
             'GB moved | MiB held at most | with autograd: kernels | views | GB moved |',
             '|---|---|---|---|---|---|---|---|---|']
    for name, c in counts.items():
        inf, grad = c['inference'], c.get('autograd')  # none for the stubbed fused kernels
        autograd = (f'{grad["kernels"]} | {grad["views"]} | {grad["bytes"] / 1e9:.3g}'
                    if grad else '- | - | -')
        gpu = inf.get('gpu_launches') or '-'  # recorded for the fused kernels only
        if gpu != '-':
            triton = sum(gpu[1].values())
            gpu = f'{gpu[0]} + {triton} = {gpu[0] + triton}'
        lines.append(f'| {name} | {inf["kernels"]} | {gpu} | {inf["views"]} | '
                     f'{inf["bytes"] / 1e9:.3g} | {inf["peak_live_bytes"] / 2**20:.1f} | '
                     f'{autograd} |')
    name, inference = list(counts)[-1], list(counts.values())[-1]['inference']
    lines += ['', f'{name}, inference: the {top} ops that move the most bytes',
              '| op | calls | GB moved | share |', '|---|---|---|---|']
    for op, nbytes in list(inference['bytes_by_op'].items())[:top]:
        lines.append(f'| {op} | {inference["by_op"][op]} | {nbytes / 1e9:.3g} | '
                     f'{nbytes / max(inference["bytes"], 1):.0%} |')
    return '\n'.join(lines)


def kernel_cuts(before: dict, after: dict) -> Dict[str, float]:
    """The fraction of kernels ``after`` saves against ``before``, per mode
    both counted."""
    return {mode: 1 - after[mode]['kernels'] / before[mode]['kernels']
            for mode in after if mode in before}


def describe_part(part: str, stage: int) -> str:
    """What ``count_ops`` counts, in words."""
    return {'branch': f'the first global branch of stage {stage}', 'backbone': 'the backbone',
            'local-only': 'the local-only backbone'}[part]


# the memory_cfg keys' former names, which an older checkout (``--before``) takes: the
# package's RENAMED_KEYS inverted, written out since such a checkout has none
FORMER_KEY_NAMES = {'operand_dtype': 'matmul_dtype', 'implementation': 'kernels'}


def as_installed(memory_cfg: Dict, keys: Optional[List[str]]) -> Dict:
    """``memory_cfg`` with each key the installed backbone does not take
    under its former name, where the backbone takes that (``keys``: its
    ``memory_cfg`` keys; None: it names none, and ``memory_cfg`` is kept)."""
    if keys is None:
        return dict(memory_cfg)
    return {FORMER_KEY_NAMES[k] if k not in keys and FORMER_KEY_NAMES.get(k) in keys else k: v
            for k, v in memory_cfg.items()}


def memory_cfg_of(operand_dtype: str = 'auto', implementation: str = 'auto') -> Dict[str, str]:
    """The ``memory_cfg`` overrides of the given options ('auto': the memory's own)."""
    return {key: value for key, value in (('operand_dtype', operand_dtype),
                                          ('implementation', implementation)) if value != 'auto'}


# ------------------------------------------------------ Inductor's count
class InductorByteCounter:
    """Inside the context, ``torch.compile`` compiles afresh (Dynamo reset,
    no cached graphs: a cached graph is not lowered again, so not counted);
    on exit ``total_bytes`` holds the bytes its kernels move per call of
    each compiled graph. Exiting with nothing counted is an error: either
    nothing compiled, or this torch's Inductor no longer counts."""

    def __init__(self):
        self.total_bytes = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> 'InductorByteCounter':
        import torch._functorch.config as functorch_config
        from torch._inductor import compile_fx
        from torch._inductor import config as inductor_config
        from torch._inductor import metrics
        self._metrics = metrics
        self._stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        self._stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        # Inductor counts a graph's bytes only while this log is on; with no
        # handler and no propagation its INFO records go nowhere
        log = compile_fx.inductor_metrics_log
        self._stack.callback(log.setLevel, log.level)
        log.setLevel(logging.INFO)
        torch._dynamo.reset()
        metrics.reset()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.total_bytes = int(self._metrics.num_bytes_accessed)
        self._stack.close()
        torch._dynamo.reset()
        if kind is None and self.total_bytes <= 0:
            raise RuntimeError(
                'Inductor counted no bytes: nothing was compiled inside the context, or '
                f'torch {torch.__version__} no longer reports torch._inductor.metrics.'
                'num_bytes_accessed')


# ----------------------------------------------------------------- the case
def _print_table(title: str, rows: List[Tuple[str, str, List[int]]]) -> None:
    """A markdown table of GB per stage: rows of (operands, path, bytes per stage)."""
    stages = len(rows[0][2])
    print(f'\n{title}\n| operands | path | ' +
          ' | '.join(f'stage {i + 1}' for i in range(stages)) + ' | total |')
    print('|---|---|' + '---|' * (stages + 1))
    for name, path, per_stage in rows:
        print(f'| {name} | {path} | ' + ' | '.join(f'{b / 1e9:.2f}' for b in per_stage) +
              f' | {sum(per_stage) / 1e9:.2f} |')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bytes`` case's options."""
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--batch', type=positive_int, default=128)
    parser.add_argument('--time-batch', type=int, default=2,
                        help='batch of the CPU timing of stage 1 (0: no timing)')
    parser.add_argument('--step-batch', type=int, default=0,
                        help='batch of the CPU timing of whole training steps of the '
                        'backbone (0: none)')
    parser.add_argument('--rounds', type=positive_int, default=5)
    parser.add_argument('--compiled-batch', type=int, default=0,
                        help='batch of the compiled branches\' count, float32 (0: none; it '
                        'runs the steps: about 10 GB and a few minutes at 128)')


def run_from_args(args: argparse.Namespace, record: 'Record') -> Dict[str, Dict[str, List[int]]]:
    """The counts and timings asked for, printed as tables (a dry run: M1 at
    batch 2 of 64x64, one timed round, nothing compiled)."""
    if args.dry_run:
        args.arch, args.size, args.batch, args.rounds = 'm1', 64, 2, 1
        args.time_batch, args.step_batch, args.compiled_batch = min(args.time_batch, 1), 0, 0
    shapes = backbone_shapes(args.arch, args.size, args.batch)
    results = {}
    write_read, projections, branches = [], [], []
    for name, mm in (('float32', None), ('bfloat16', torch.bfloat16)):
        results[name] = counts = count_step_bytes(shapes, mm)
        write_read += [(name, path, per_stage) for path, per_stage in counts.items()]
        results[f'projections {name}'] = counts = count_projection_bytes(shapes, mm)
        projections += [(name, path, per_stage) for path, per_stage in counts.items()]
    for name in ('float32', 'bfloat16'):
        for path, cfg in (('autograd', dict(backward='autograd')),
                          ('closed form', dict(backward='closed_form')),
                          (TRITON, dict(implementation='triton'))):
            per_stage = count_branch_step_bytes(args.arch, args.size, args.batch,
                                                dict(cfg, operand_dtype=name))
            results[f'branches {name} {path}'] = {'total': per_stage}
            branches.append((name, path, per_stage))
    print(f'ConvNeur-{args.arch.upper()}, batch {args.batch} at {args.size}x{args.size}: '
          'GB moved by one training step (meta count)')
    _print_table("of the memory's write and read", write_read)
    _print_table('of the projections', projections)
    _print_table('of the global branches, whole', branches)
    if args.compiled_batch:
        compiled = []
        for path, backward in (('autograd', 'autograd'), ('closed form', 'closed_form')):
            cfg = dict(backward=backward, operand_dtype='float32')
            per_stage = count_compiled_branch_step_bytes(args.arch, args.size,
                                                         args.compiled_batch, cfg)
            results[f'compiled branches float32 {path}'] = {'total': per_stage}
            compiled += [('float32', f'{path}, eager', count_branch_step_bytes(
                args.arch, args.size, args.compiled_batch, cfg)),
                ('float32', f'{path}, compiled', per_stage)]
        _print_table(f'of the global branches, whole, at batch {args.compiled_batch}: eager '
                     "(meta count) and compiled (Inductor's count, its CPU plan)", compiled)
    if args.time_batch:
        shape = shapes[0]._replace(batch=args.time_batch)
        times = time_steps(shape, args.rounds)
        print(f'\nCPU, float32, stage 1 at batch {args.time_batch}: median ms of '
              f'{args.rounds} steps in turns: ' +
              ', '.join(f'{path} {median(t) * 1e3:.1f}' for path, t in times.items()))
    if args.step_batch:
        times = time_backbone_steps(args.arch, args.step_batch, args.size, args.rounds)
        print(f'\nCPU, float32, ConvNeur-{args.arch.upper()} training step (forward, backward, '
              f'AdamW) at batch {args.step_batch}, {args.size}x{args.size}: median ms of '
              f'{args.rounds} steps in turns: ' +
              ', '.join(f'{path} {median(t) * 1e3:.1f}' for path, t in times.items()))
    return results


def add_ops_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ops`` case's options."""
    parser.add_argument('--arch', default='m3')
    parser.add_argument('--stage', type=int, default=0)
    parser.add_argument('--size', type=positive_int, default=224)
    parser.add_argument('--batch', type=positive_int, default=1)
    parser.add_argument('--device', choices=('cpu', 'meta'), default='cpu')
    # --matmul-dtype and --kernels: the keys' former names, which older notes' commands use
    parser.add_argument('--operand-dtype', '--matmul-dtype', dest='operand_dtype',
                        choices=('auto', 'float32', 'bfloat16', 'float16'), default='auto',
                        help='memory_cfg.operand_dtype')
    parser.add_argument('--implementation', '--kernels', dest='implementation',
                        choices=('auto', 'torch', 'triton'), default='auto',
                        help="memory_cfg.implementation ('triton' on meta: launches "
                        'recorded, not run)')
    parser.add_argument('--part', choices=PARTS, default='branch')
    parser.add_argument('--before', metavar='PATH', help='an older checkout to count too')
    parser.add_argument('--top', type=positive_int, default=8, help='ops listed')


def run_ops(args: argparse.Namespace, record: 'Record') -> Dict[str, dict]:
    """``count_ops`` of this tree (and of ``--before``), printed as tables
    with the kernels the tree cuts (a dry run: M1 at batch 1 of 64x64)."""
    from convneur_mm.analysis.isolated import run_isolated
    if args.dry_run:
        args.arch, args.size, args.batch = 'm1', 64, 1
    memory_cfg = memory_cfg_of(args.operand_dtype, args.implementation)
    kwargs = dict(arch=args.arch, stage=args.stage, size=args.size, batch=args.batch,
                  device=args.device, memory_cfg=memory_cfg, part=args.part)
    counts = {}
    if args.before:
        counts[f'before ({args.before})'] = run_isolated(count_ops, kwargs, args.before,
                                                            OWN_MODULES)
    counts['this tree'] = count_ops(**kwargs)
    print(f'ATen ops of {describe_part(args.part, args.stage)}, ConvNeur-{args.arch.upper()}, '
          f'batch {args.batch} at {args.size}x{args.size}, eager, {args.device}, '
          f'torch {torch.__version__}')
    print(format_op_counts(counts, args.top))
    if args.before:
        cuts = kernel_cuts(counts[f'before ({args.before})'], counts['this tree'])
        for mode, cut in cuts.items():
            print(f'{mode}: {cut:.0%} fewer kernels')
    return counts
