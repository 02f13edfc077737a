"""The Triton kernels as custom operators (``torch.ops.convneur_mm``):
``torch.library.opcheck`` (schema, fake tensors, AOT dispatch with dynamic
shapes), their fakes against their results, ``torch.compile`` with
``fullgraph=True`` over them and over a memory that plans them, all in
Triton's interpreter (float32 and float16 operands; one subprocess, as in
``test_memory_kernels``); their autograd (the backward operators) under
opcheck; and the plan's choice in training.
"""
import contextlib
from typing import Dict, Tuple

import pytest
import torch

from convneur_mm.models.layers.memory_ops import (MemoryWeights, chunk_grads_triton,
                                                  chunk_read_triton, read_triton)
from convneur_mm.models.layers.memory_ops.project import (ProjectionWeights, fold, project_triton,
                                                          projection_shapes)
from convneur_mm.models.layers.memory_ops.scan import scan_states_triton
from convneur_mm.models.layers.neural_memory import NeuralMemory
from ... import interpreted as interpreted_runs
from .test_memory_kernels import _run_interpreted

OPS = ('memory_chunk_grads', 'memory_read', 'memory_chunk_read', 'memory_project', 'memory_scan')
# the cases whose autograd and backward operator opcheck runs (the per-image
# views' backward is checked against float64 in test_memory_kernels_backward)
DIFFERENTIABLE = ('chunk_grads', 'read', 'read_decomposed', 'chunk_read', 'chunk_read_decomposed',
                  'project', 'scan', 'scan_updates')


def _weights(lead: Tuple[int, ...], d: int, gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(*lead, d, 4 * d, generator=gen) * d**-0.5,
            torch.randn(*lead, 4 * d, d, generator=gen) * (4 * d)**-0.5,
            torch.randn(*lead, d, generator=gen) * 0.1)


def op_cases(dtype: torch.dtype, seed: int = 0) -> Dict[str, Tuple[object, tuple]]:
    """{case: (operator, arguments)} at tiny shapes: 4-D and per-image 5-D
    keys (strided views), plain and decomposed reads, a partial last chunk."""
    gen = torch.Generator().manual_seed(seed)
    ops = torch.ops.convneur_mm
    heads, batch, chunks, length, d = 2, 2, 2, 8, 16
    keys = torch.randn(heads, length, chunks, d, generator=gen).transpose(1, 2)
    per_image = torch.randn(heads, batch, chunks, length, d, generator=gen)
    values = torch.randn(heads, chunks, length, d, generator=gen)
    token_lr = torch.rand(heads, chunks, length, generator=gen)
    w = _weights((heads, ), d, gen)
    groups = heads * batch
    x = torch.randn(groups, 12, d, generator=gen)
    delta = tuple(t * 1e-2 for t in _weights((groups, ), d, gen))
    carry = torch.rand(groups, generator=gen)
    states = _weights((heads, batch, chunks), d, gen)
    queries = torch.randn(heads, batch, chunks * length - 3, d, generator=gen)
    tiles = (16, 32)
    projection = ProjectionWeights(*(torch.randn(*shape, generator=gen) * 0.3
                                     for shape in projection_shapes(d, heads)))
    # x a strided view; 20 tokens in chunks of 8: two written, a partial last one
    x_tokens = torch.randn(batch, d, 20, generator=gen).transpose(1, 2)
    project_args = (x_tokens, *fold(projection))
    cases = {
        'chunk_grads': (ops.memory_chunk_grads, (*w, keys, values, token_lr, dtype, *tiles)),
        'chunk_grads_per_image': (ops.memory_chunk_grads, (
            *w, per_image, per_image * 0.5, token_lr[:, None].expand(heads, batch, chunks, length),
            dtype, None, None)),
        'read': (ops.memory_read, (*_weights((groups, ), d, gen), x, None, None, None, dtype,
                                   *tiles)),
        'read_decomposed': (ops.memory_read, (*delta, x, *w[:2], carry, dtype, *tiles)),
        'chunk_read': (ops.memory_chunk_read, (*states, queries, length, None, None, None,
                                               dtype, *tiles)),
        'chunk_read_decomposed': (ops.memory_chunk_read, (
            *(t * 1e-2 for t in states), queries, length, *w[:2],
            torch.rand(heads, batch, chunks, generator=gen), dtype, *tiles)),
        'project': (ops.memory_project, (*project_args, 2, 8, 0.5, dtype, 16, None)),
        'project_one_chunk': (ops.memory_project, (*project_args, 0, 32, 0.5, dtype, None, None)),
        # the states of 3 steps of (N = 4, P = 40) weights, from W_0 and from zero
        'scan': (ops.memory_scan, (*_scan_args(gen), torch.randn(4, 40, generator=gen), dtype)),
        'scan_updates': (ops.memory_scan, (*_scan_args(gen), None, torch.float32)),
    }
    # the backward operators: the forward's tensors, then the outputs' cotangents
    for name in DIFFERENTIABLE:
        op, args = cases[name]
        if name.startswith('scan'):  # its backward takes the saved states too (float32)
            n, u, p = args[0].shape
            states, bar = (torch.randn(n, u + 1, p, generator=gen) for _ in range(2))
            cases[f'{name}_backward'] = (ops.memory_scan_backward, (*args[:5], states, bar))
            continue
        if name == 'project':  # its backward takes the pooled rows and log-sum-exp too
            x_, updates, length_ = args[0], args[4], args[5]
            hd = d // heads
            pooled, lse, *bars = (torch.randn(shape, generator=gen) for shape in (
                (batch, updates, d), (batch, updates, d), (heads, batch, x_.shape[1], hd),
                (heads, batch, updates * length_, hd), (heads, batch, updates * length_, hd),
                (heads, batch, updates * length_), (batch, updates, d)))
            cases['project_backward'] = (ops.memory_project_backward,
                                         (*args[:4], pooled, lse, *bars, *args[4:9]))
            continue
        if name.startswith('chunk_grads'):
            groups, chunks, d = args[0].shape[0], token_lr.shape[1], args[0].shape[1]
            if name.endswith('per_image'):
                chunks = batch * chunks
            shapes = [(groups, chunks, d, 4 * d), (groups, chunks, 4 * d, d), (groups, chunks, d)]
            tensor_args, backward = 6, ops.memory_chunk_grads_backward
        elif name.startswith('chunk_read'):
            q = args[3]  # (H, B, N, d), heads merged in the output
            shapes = [(*q.shape[1:3], q.shape[0] * q.shape[3])]
            tensor_args, backward = 8, ops.memory_chunk_read_backward
        else:
            shapes, tensor_args, backward = [args[3].shape], 7, ops.memory_read_backward
        cotangents = [torch.randn(shape, generator=gen) for shape in shapes]
        cases[f'{name}_backward'] = (backward, (*args[:tensor_args], *cotangents,
                                                *args[tensor_args:]))
    return cases


def _scan_args(gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """Gradients (4, 3, 40) as a strided view, rho, log(1 - alpha), log(eta)."""
    gates = torch.nn.functional.logsigmoid(torch.randn(2, 4, 3, generator=gen))
    return (torch.randn(40, 4, 3, generator=gen).permute(1, 2, 0),
            torch.rand(4, 3, generator=gen), gates[0], gates[1])


def _requiring_grad(args: tuple) -> tuple:
    """The floating tensors of ``args`` as leaves that require grad."""
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in args)


def _layout(outputs) -> list:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs, )
    return [[list(t.shape), str(t.dtype)] for t in outputs]


def _on_meta(args: tuple) -> tuple:
    return tuple(a.to('meta') if isinstance(a, torch.Tensor) else a for a in args)


def _compiled_calls(dtype: torch.dtype) -> dict:
    """A function calling the three operations' Triton wrappers, eager against
    ``torch.compile(backend='aot_eager', fullgraph=True)``; its graph breaks
    and the operators in its graph."""
    cases = op_cases(dtype)
    w1, w2, g, keys, values, token_lr = cases['chunk_grads'][1][:6]
    states, queries, length = cases['chunk_read'][1][:3], *cases['chunk_read'][1][3:5]

    x = cases['project'][1][0]
    projection = ProjectionWeights(*(torch.randn(*shape) for shape in projection_shapes(16, 1)))

    def fn(w1, w2, g, keys, values, token_lr, queries):
        grads = chunk_grads_triton(MemoryWeights(w1, w2, g), keys, values, token_lr, dtype)
        read = read_triton(MemoryWeights(w1, w2, g), keys.flatten(1, 2), dtype)
        chunked = chunk_read_triton(MemoryWeights(*states), queries, length, dtype)
        scanned = scan_states_triton([grads[0].flatten(2)], token_lr[None, :, :, 0],
                                     token_lr[..., 1], token_lr[..., 2], [None],
                                     state_dtypes=[dtype])
        return (*grads, read, chunked, *project_triton(x, projection, 2, 8, 1.0, dtype),
                *scanned)

    args = (w1, w2, g, keys, values, token_lr, queries)
    eager = fn(*args)
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)(*args)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=max((a - b).abs().max().item() for a, b in zip(eager, compiled)),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _compiled_memory() -> dict:
    """``NeuralMemory(kernels='triton')`` in inference, compiled with
    ``fullgraph=True``: the plan takes the kernels inside the graph."""
    torch.manual_seed(0)
    memory = NeuralMemory(16, heads=2, chunk_size=8, kernels='triton').eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        eager = memory(x)
        compiled = torch.compile(memory, backend='aot_eager', fullgraph=True)(x)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(memory)(x)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=(eager - compiled).abs().max().item(),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _compiled_training() -> dict:
    """``NeuralMemory(kernels='triton')`` in training, compiled with
    ``fullgraph=True``: the kernels and their backward operators inside the
    graphs, the gradients as eager's."""
    torch.manual_seed(0)
    memory = NeuralMemory(16, heads=2, chunk_size=8, kernels='triton').train()
    x = torch.randn(2, 20, 16)

    def grads(module):
        module.zero_grad()
        module(x).square().sum().backward()
        return [p.grad.clone() for p in memory.parameters() if p.grad is not None]

    eager = grads(memory)
    compiled = grads(torch.compile(memory, backend='aot_eager', fullgraph=True))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(memory)(x)
    code = ''.join(graph.code for graph in explanation.graphs)
    return dict(difference=max((a - b).abs().max().item() for a, b in zip(eager, compiled)),
                scale=max(a.abs().max().item() for a in eager), grads=len(eager),
                graph_breaks=explanation.graph_break_count,
                ops=[op for op in OPS if f'convneur_mm.{op}' in code])


def _opcheck(op, args) -> dict:
    try:
        return torch.library.opcheck(op, args)
    except Exception as err:  # opcheck's error names the failing check
        return {'error': repr(err)[-2000:]}


# opcheck's cases: every operator in float32; the three product operators'
# forward in float16 too (opcheck's checks, of schemas, fakes and
# registrations, do not depend on the dtype, and each costs interpreter time)
OPCHECKED = [(case, tag) for tag in ('f32', 'f16') for case in op_cases(torch.float32)
             if tag == 'f32' or case in ('chunk_grads', 'chunk_grads_per_image', 'read',
                                         'read_decomposed', 'chunk_read',
                                         'chunk_read_decomposed')]


def custom_op_results() -> dict:
    """Every interpreter case (the subprocess's result)."""
    results = {}
    for tag, dtype in (('f32', torch.float32), ('f16', torch.float16)):
        for name, (op, args) in op_cases(dtype).items():
            with torch.no_grad():
                real = _layout(op(*args))
                fake = _layout(op(*_on_meta(args)))
            report = _opcheck(op, args) if (name, tag) in OPCHECKED else None
            results[f'{name}_{tag}'] = dict(opcheck=report, real=real, fake=fake)
            if name in DIFFERENTIABLE and tag == 'f32':  # registered, traced with its backward
                results[f'{name}_grad'] = dict(opcheck=_opcheck(op, _requiring_grad(args)))
        results[f'compiled_calls_{tag}'] = _compiled_calls(dtype)
    results['compiled_memory'] = _compiled_memory()
    results['compiled_training'] = _compiled_training()
    return results


# the run of the ``interpreted`` fixture, which the session starts early (tests/interpreted.py)
INTERPRETED = ('custom_op_results', 'test_memory_custom_ops')


@pytest.fixture(scope='module')
def interpreted():
    return _run_interpreted(*INTERPRETED)


@pytest.mark.parametrize('case,tag', OPCHECKED)
def test_custom_ops_pass_opcheck(interpreted, case, tag):
    report = interpreted[f'{case}_{tag}']['opcheck']
    assert report and set(report.values()) == {'SUCCESS'}, report


@pytest.mark.parametrize('tag', ['f32', 'f16'])
@pytest.mark.parametrize('case', list(op_cases(torch.float32)))
def test_fakes_give_the_results_shapes_and_dtypes(interpreted, case, tag):
    result = interpreted[f'{case}_{tag}']
    assert result['fake'] == result['real']
    want = str(torch.float16 if case == 'scan' and tag == 'f16' else torch.float32)
    assert all(dtype == want for _, dtype in result['real'])


@pytest.mark.parametrize('tag', ['f32', 'f16'])
def test_compile_keeps_the_ops_in_one_graph(interpreted, tag):
    result = interpreted[f'compiled_calls_{tag}']
    assert result['graph_breaks'] == 0
    assert result['ops'] == list(OPS)
    assert result['difference'] == 0


def test_a_compiled_memory_runs_the_kernels_inside_its_graph(interpreted):
    result = interpreted['compiled_memory']
    assert result['graph_breaks'] == 0
    assert result['ops'] == ['memory_chunk_grads', 'memory_chunk_read', 'memory_project',
                             'memory_scan']
    assert result['difference'] < 1e-5


@pytest.mark.parametrize('case', DIFFERENTIABLE)
def test_the_operators_autograd_passes_opcheck(interpreted, case):
    report = interpreted[f'{case}_grad']['opcheck']
    assert report and set(report.values()) == {'SUCCESS'}, report


def test_a_compiled_training_step_keeps_the_kernels(interpreted):
    result = interpreted['compiled_training']
    assert result['graph_breaks'] == 0
    assert result['ops'] == ['memory_chunk_grads', 'memory_chunk_read', 'memory_project',
                             'memory_scan']
    assert result['grads'] > 15 and result['difference'] < 1e-5 * result['scale'], result


def test_fakes_on_meta_tensors_without_triton():
    """The fakes need no kernel: meta tensors give the results' shapes."""
    for name, (op, args) in op_cases(torch.float16).items():
        outputs = op(*_on_meta(args))
        outputs = outputs if isinstance(outputs, tuple) else (outputs, )
        want = torch.float16 if name == 'scan' else torch.float32  # the state dtype asked for
        assert all(t.device.type == 'meta' and t.dtype == want for t in outputs), name


class _Entered(Exception):
    """Raised where an operator makes its tensors' device current."""


def test_every_operator_launches_on_its_tensors_device(monkeypatch):
    """Each operator, forward and backward, runs its implementation inside
    ``on_tensors_device`` of its own arguments (no kernel runs: the probe
    stops each call there)."""
    from convneur_mm.models.layers.memory_ops.kernels import ops as kernel_ops
    seen = []

    def probe(*args):
        seen.append(args)
        raise _Entered

    monkeypatch.setattr(kernel_ops, 'on_tensors_device', probe)
    names = set()
    for name, (op, args) in op_cases(torch.float32).items():
        with pytest.raises(_Entered):
            op(*args)
        assert seen.pop()[0] is args[0], name
        names.add(op.default.name())
    assert len(names) == 2 * len(OPS)  # every operator and its backward


def test_on_tensors_device_makes_the_first_tensors_gpu_current(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from convneur_mm.models.layers.memory_ops.kernels.ops import on_tensors_device
    current = []
    monkeypatch.setattr(torch.cuda, 'device', lambda device: current.append(device) or
                        contextlib.nullcontext())
    with FakeTensorMode():  # CUDA tensors without a GPU
        second, first = torch.empty(2, device='cuda:1'), torch.empty(2, device='cuda:0')
    on_tensors_device(3, None, second, first)
    assert current == [torch.device('cuda:1')]
    for args in ((torch.ones(1), second), (torch.ones(1, device='meta'), ), (2, )):
        on_tensors_device(*args)  # a CPU or meta tensor first, or none: nothing to make current
    assert current == [torch.device('cuda:1')]


def test_the_plan_trains_with_the_kernels_on_request_only():
    from convneur_mm.models.layers.memory_ops.kernels import without_launches
    memory = NeuralMemory(16, chunk_size=8, kernels='triton', backward='closed_form').train()
    with without_launches():  # plans the kernels anywhere (no launch)
        plan = memory.plan(torch.randn(1, 20, 16))
    # the kernels' own backward: the closed form is the PyTorch path's
    assert (plan.implementation, plan.backward) == ('triton', 'autograd')
    memory.kernels = 'auto'
    assert memory.plan(torch.randn(1, 20, 16)).implementation == 'torch'


if __name__ == '__main__':  # the interpreter subprocess of ``_run_interpreted``
    interpreted_runs.main(globals())
