"""ATen ops that a global branch (or a backbone) dispatches in eager mode:
the kernels a GPU launches for it, the bytes they move, the most it holds.

Counted with ``AtenOpCounter`` and ``LiveTensorBytes`` of
``convneur_mm.testing.dispatch_probes``. Ops that return no tensor are left
out, and views (which launch nothing) are counted apart. Each kernel's tensor
arguments and results are summed in bytes as if each were read or written
once: the least memory traffic of the unfused ops. On ``meta`` tensors (no
data: a training-sized batch in seconds) the ops dispatch as on a CPU, but
16-bit products outside autograd write float32 directly, as on CUDA
(``memory_ops.product``), instead of a widening cast.
With ``kernels='triton'`` on ``meta`` the fused kernels' wrappers allocate
what they would on a GPU and their launches do nothing: the inference count
of CUDA's fused path (the wrappers run without their operators' autograd:
inference counts only).

The model is imported inside ``count_ops``, so that ``isolated.run_isolated``
can run it against an older checkout's package with this tree's probes.
"""
import contextlib
from typing import ContextManager, Dict, Optional

import torch

from convneur_mm.testing.dispatch_probes import AtenOpCounter, LiveTensorBytes

PARTS = ('branch', 'backbone', 'local-only')
# the modules a count against an older checkout takes from this tree
OWN_MODULES = ('convneur_mm.testing.dispatch_probes', )


def _kernels_without_launches() -> ContextManager:
    """The Triton kernels' wrappers checking and allocating as on a GPU, on
    any device, launching nothing (the memory's ``without_launches``)."""
    try:
        from convneur_mm.models.layers.memory_ops.kernels import without_launches
    except ImportError:  # an older checkout's package (``isolated.run_isolated``)
        raise ValueError('this package\'s memory cannot run its kernels without launching '
                         "them: count with kernels='torch'") from None
    return without_launches()


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
    stubbed = device == 'meta' and memory_cfg.get('kernels') == 'triton'
    torch.manual_seed(0)
    options = dict(memory_placement='none') if part == 'local-only' else {}
    if memory_cfg:
        options['memory_cfg'] = memory_cfg
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
    return result


def format_op_counts(counts: Dict[str, dict], top: int = 8) -> str:
    """Markdown: one line per code counted (``{name: count_ops(...)}``), then
    the ``top`` ops that move the most bytes in inference, of the last one."""
    lines = ['| code | inference: kernels | views | GB moved | MiB held at most | '
             'with autograd: kernels | views | GB moved |', '|---|---|---|---|---|---|---|---|']
    for name, c in counts.items():
        inf, grad = c['inference'], c.get('autograd')  # none for the stubbed fused kernels
        autograd = (f'{grad["kernels"]} | {grad["views"]} | {grad["bytes"] / 1e9:.3g}'
                    if grad else '- | - | -')
        lines.append(f'| {name} | {inf["kernels"]} | {inf["views"]} | '
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


def memory_cfg_of(matmul_dtype: str = 'auto', kernels: str = 'auto') -> Dict[str, str]:
    """The ``memory_cfg`` overrides of the given options ('auto': the memory's own)."""
    return {key: value for key, value in (('matmul_dtype', matmul_dtype),
                                          ('kernels', kernels)) if value != 'auto'}

