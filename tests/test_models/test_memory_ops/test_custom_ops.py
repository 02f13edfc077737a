"""The kernels' custom operators: opcheck, fakes, torch.compile keeping them in
one graph, and the device they launch on."""
import contextlib

import pytest
import torch

from convneur_mm.models.layers.neural_memory import NeuralMemory

from .memory_cases import (DIFFERENTIABLE, OPCHECKED, OPS, SIXTEEN_BIT_BACKWARDS, _on_meta,
                           _requiring_grad, op_cases)


@pytest.mark.parametrize('case,tag', OPCHECKED)
def test_custom_ops_pass_opcheck(custom_op_runs, case, tag):
    report = custom_op_runs[f'{case}_{tag}']['opcheck']
    assert report and set(report.values()) == {'SUCCESS'}, report


@pytest.mark.parametrize('tag', ['f32', 'f16'])
@pytest.mark.parametrize('case', list(op_cases(torch.float32)))
def test_fakes_give_the_results_shapes_and_dtypes(custom_op_runs, case, tag):
    result = custom_op_runs[f'{case}_{tag}']
    assert result['fake'] == result['real']
    # the scan's states and the fold's weight in the 16-bit dtype asked for
    halves = {'scan': 1, 'fold': 1}.get(case, 0) if tag == 'f16' else 0
    dtypes = [dtype for _, dtype in result['real']]
    assert dtypes == [str(torch.float16)] * halves + [str(torch.float32)] * (len(dtypes) - halves)


@pytest.mark.parametrize('case', SIXTEEN_BIT_BACKWARDS)
def test_backward_fakes_give_16_bit_inputs_16_bit_gradients(custom_op_runs, case):
    """bf16 training's (float16 here): the scan's gradients, the chunk read's
    states and the chunk gradients' cotangents 16-bit; the gradient of
    each 16-bit input comes in its dtype, fake and real alike."""
    result = custom_op_runs[f'{case}_f16']
    assert result['fake'] == result['real']
    halves = [i for i, (_, dtype) in enumerate(result['real']) if dtype == str(torch.float16)]
    assert halves == {'scan_backward_16_bit': [0], 'chunk_read_backward_16_bit': [0, 1],
                      'chunk_grads_backward_16_bit': []}[case], result['real']


@pytest.mark.parametrize('tag', ['f32', 'f16'])
def test_compile_keeps_the_ops_in_one_graph(custom_op_runs, tag):
    result = custom_op_runs[f'compiled_calls_{tag}']
    assert result['graph_breaks'] == 0
    assert result['ops'] == list(OPS)
    assert result['difference'] == 0


def test_a_compiled_memory_runs_the_kernels_inside_its_graph(custom_op_runs):
    result = custom_op_runs['compiled_memory']
    assert result['graph_breaks'] == 0
    assert result['ops'] == ['memory_chunk_grads', 'memory_chunk_read', 'memory_project',
                             'memory_scan', 'memory_gates', 'memory_fold']
    assert result['difference'] < 1e-5


@pytest.mark.parametrize('case', DIFFERENTIABLE)
def test_the_operators_autograd_passes_opcheck(custom_op_runs, case):
    report = custom_op_runs[f'{case}_grad']['opcheck']
    assert report and set(report.values()) == {'SUCCESS'}, report


@pytest.mark.parametrize('case', ['compiled_training', 'compiled_training_f16_states',
                                  'compiled_training_f16_states_decomposed'])
def test_a_compiled_training_step_keeps_the_kernels(custom_op_runs, case):
    """Also on 16-bit states and chunk gradients (bf16 training's, float16
    here): the graphs take their cotangents' dtypes from the fakes."""
    result = custom_op_runs[case]
    assert result['graph_breaks'] == 0
    assert result['ops'] == ['memory_chunk_grads', 'memory_chunk_read', 'memory_project',
                             'memory_scan', 'memory_gates']
    assert result['grads'] > 15 and result['difference'] < 1e-5 * result['scale'], result


def test_fakes_on_meta_tensors_without_triton():
    """The fakes need no kernel: meta tensors give the results' shapes."""
    for name, (op, args) in op_cases(torch.float16).items():
        outputs = op(*_on_meta(args))
        outputs = outputs if isinstance(outputs, tuple) else (outputs, )
        # the state dtype asked for; a 16-bit input's gradient in its dtype
        halves = {'scan': 1, 'fold': 1, 'scan_backward_16_bit': 1,
                  'chunk_read_backward_16_bit': 2}
        assert all(t.device.type == 'meta' for t in outputs), name
        assert [t.dtype for t in outputs] == [torch.float16] * halves.get(name, 0) + [
            torch.float32] * (len(outputs) - halves.get(name, 0)), name


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
    # every operator and its backward, but the gates' (PyTorch's) and the fold's (none)
    assert len(names) == 2 * len(OPS) - 2


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
    memory = NeuralMemory(16, chunk_size=8, implementation='triton', backward='closed_form').train()
    with without_launches():  # plans the kernels anywhere (no launch)
        plan = memory.plan(torch.randn(1, 20, 16))
    # the kernels' own backward: the closed form is the PyTorch path's
    assert (plan.implementation, plan.backward) == ('triton', 'autograd')
    memory.implementation = 'auto'
    assert memory.plan(torch.randn(1, 20, 16)).implementation == 'torch'


@pytest.mark.parametrize('case', DIFFERENTIABLE)
def test_each_kernels_backward_refuses_create_graph(case):
    """The backward kernels are of first order: through each operator's
    registered autograd, on meta tensors (fakes, no kernel), a first-order
    gradient runs its backward operator, and ``create_graph=True`` is an
    error naming the operator, not a gradient taken as a constant."""
    op, args = op_cases(torch.float32)[case]
    leaves = _requiring_grad(_on_meta(args))
    inputs = [a for a in leaves if isinstance(a, torch.Tensor)]

    def loss() -> torch.Tensor:
        outputs = op(*leaves)
        return sum(t.sum() for t in (outputs if isinstance(outputs, tuple) else (outputs, )))

    grads = torch.autograd.grad(loss(), inputs, allow_unused=True)
    assert all(g is None or (g.is_meta and g.shape == t.shape) for g, t in zip(grads, inputs))
    assert any(g is not None for g in grads)
    with pytest.raises(RuntimeError, match=f'{op.default.name()} has a backward of first order'):
        torch.autograd.grad(loss(), inputs, create_graph=True, allow_unused=True)


def test_only_a_kernel_op_gets_a_first_order_backward():
    from convneur_mm.models.layers.memory_ops.kernels.ops import register_first_order_autograd
    with pytest.raises(ValueError, match='is no kernel_op'):
        register_first_order_autograd(len, lambda ctx, grad: grad, lambda ctx, i, o: None)
