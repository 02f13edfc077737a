"""The memory's path policy (``memory_ops.dispatch``): where ``implementation='auto'``
takes the Triton kernels, what 'triton' refuses, and the plan's reasons."""

import pytest
import torch

from convneur_mm.models.layers.memory_ops import chunk_grads_triton, dispatch, kernels
from convneur_mm.models.layers.memory_ops.kernels import tuned
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.models.layers.neural_memory import NeuralMemory

from .memory_cases import BF16_TOL, _rel_err, _write_inputs


def test_auto_kernels_on_a_cpu_take_the_pytorch_path():
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    auto = NeuralMemory(16, chunk_size=8, implementation='auto', operand_dtype='float16').eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        plan = auto.plan(x)
        assert plan.implementation == 'torch' and 'CUDA' in plan.reason, plan
        out = auto(x)
        auto.implementation = 'torch'
        torch.testing.assert_close(out, auto(x), rtol=0, atol=0)


@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
def test_triton_kernels_on_a_cpu_without_the_interpreter_are_an_error():
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, implementation='triton').eval()
    refused = "implementation='triton'.*(CUDA|triton)"
    with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
        memory(torch.randn(2, 20, 16))
    with pytest.raises(RuntimeError, match=refused):
        memory.train()(torch.randn(2, 20, 16))  # training too: the Triton reads


def test_without_launches_lets_a_memory_plan_the_triton_kernels_anywhere():
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, implementation='triton').eval().to('meta')
    x = torch.empty(2, 20, 16, device='meta')
    with torch.no_grad(), kernels.without_launches():
        assert memory.plan(x).implementation == 'triton'
        assert memory(x).shape == x.shape
    assert not kernels.availability.launches_skipped()  # the context is closed


@pytest.mark.skipif(interpreter_requested(), reason='this process runs Triton in its interpreter')
def test_kernels_refuse_a_cpu_without_the_interpreter():
    assert not kernels.kernels_available('cpu')
    reason = kernels.unavailable_reason('cpu')
    assert 'TRITON_INTERPRET' in reason or 'triton' in reason
    w, keys, values, token_lr = _write_inputs(1, 2, 8, 16, 1.0, seed=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match='cannot run'):
        chunk_grads_triton(w, keys, values, token_lr)


@pytest.mark.gpu
def test_auto_kernels_serve_cuda_inference_in_bfloat16_where_measured():
    from convneur_mm.models.layers import NeuralMemory
    torch.manual_seed(0)
    memory = NeuralMemory(128, chunk_size=196, implementation='auto').cuda().eval()
    x = torch.randn(4, 784, 128, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        plan = memory.plan(x)
        out = memory(x)
        memory.implementation = 'torch'
        ref = memory(x)
    # the kernels where a GPU of this kind measured them faster (an H100 or H200)
    from convneur_mm.models.layers.memory_ops.dispatch import auto_path
    major, minor = torch.cuda.get_device_capability()
    expected = auto_path(major * 10 + minor, 'bfloat16', False, 128)[0]
    assert plan.implementation == expected and plan.operand_dtype == torch.bfloat16, plan
    assert _rel_err(out.cpu(), ref.double().cpu()) < BF16_TOL


def test_auto_trains_on_the_pytorch_path():
    memory = NeuralMemory(16, chunk_size=8, implementation='auto').train()
    plan = memory.plan(torch.randn(1, 20, 16))
    assert plan.implementation == 'torch' and 'trains on the PyTorch path' in plan.reason


@pytest.mark.parametrize('arch, dtype, training, path, words', [
    (None, 'bfloat16', False, 'torch', "off NVIDIA's CUDA GPUs"),
    (None, 'float32', True, 'torch', 'trains on the PyTorch path'),
    (90, 'bfloat16', False, 'triton', '10.28 ms through the kernels against 20.43 ms'),
    (90, 'float32', False, 'torch', '54.48 ms through the kernels against 28.87 ms'),
    (90, 'float16', False, 'torch', 'no GPU has timed'),
    (80, 'bfloat16', False, 'torch', 'on sm_80 with bfloat16 operands'),
    (90, 'bfloat16', True, 'torch', '77.73 ms through the kernels against 60.27 ms'),
    (90, 'float16', True, 'torch', 'trains on the PyTorch path: no GPU has timed'),
])
def test_auto_takes_the_kernels_only_where_a_gpu_measured_them_faster(arch, dtype, training,
                                                                      path, words):
    got, why = dispatch.auto_path(arch, dtype, training, 128)
    assert got == path and words in why, why


def test_a_measurement_speaks_for_the_head_widths_tiled_as_it_was():
    """M3's measurement (C_m 128) serves M1's and M2's 80 and 96, which the
    kernels tile as 128 too, and not M4's 160, tiled as 256."""
    for head_dim in (80, 96, 128):
        assert dispatch.auto_path(90, 'bfloat16', False, head_dim)[0] == 'triton'
    path, why = dispatch.auto_path(90, 'bfloat16', False, 160)
    assert path == 'torch' and 'no GPU has timed' in why and 'tiled as 256' in why
    with pytest.raises(ValueError, match='block_d must be a power of two'):
        dispatch.check_measured_paths([tuned.MEASURED_PATHS[0]._replace(block_d=160)])
    # one entry per width: M4's may sit beside M3's
    dispatch.check_measured_paths([*tuned.MEASURED_PATHS,
                                tuned.MEASURED_PATHS[0]._replace(block_d=256)])
    # and a compiled one beside the eager one
    dispatch.check_measured_paths([*tuned.MEASURED_PATHS,
                                tuned.MEASURED_PATHS[0]._replace(compiled=True)])


def test_a_new_measurement_decides_auto_for_its_gpu_and_mode(monkeypatch):
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', tuned.MEASURED_PATHS + (
        tuned.MeasuredPath(80, 'bfloat16', True, 9.0, 10.0, 'a test'), ))
    assert dispatch.auto_path(80, 'bfloat16', True, 128)[0] == 'triton'
    assert dispatch.auto_path(80, 'bfloat16', False, 128)[0] == 'torch'


def test_the_memory_asks_auto_path_for_its_gpu(monkeypatch):
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(16, chunk_size=8, operand_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 80)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 16))
    assert plan.implementation == 'torch' and 'sm_80 with bfloat16' in plan.reason


def test_the_triton_kernels_refuse_to_train_through_a_kernel_that_faults(monkeypatch):
    """A backward kernel listed in ``CUDA_FAULTS``: implementation='triton' says so
    before a training step instead of killing the process; inference keeps
    the kernels, and 'auto' trains on the PyTorch path."""
    from convneur_mm.models.layers import NeuralMemory
    from convneur_mm.models.layers.memory_ops.kernels import availability
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    x = torch.randn(1, 20, 16)
    memory = NeuralMemory(16, chunk_size=8, operand_dtype='bfloat16', implementation='triton')
    assert memory.plan(x).implementation == 'triton'  # none listed: it trains
    monkeypatch.setattr(availability, 'CUDA_FAULTS', {'read_backward_rows': 'seen somewhere'})
    with pytest.raises(RuntimeError, match='read_backward_rows kernel faults on CUDA GPUs'):
        memory.plan(x)
    with torch.no_grad():
        assert memory.plan(x).implementation == 'triton'
    memory.implementation = 'auto'
    assert memory.plan(x).implementation == 'torch'
    # a forward kernel that faulted would refuse inference too
    monkeypatch.setattr(availability, 'CUDA_FAULTS', {'read': 'seen somewhere'})
    memory.implementation = 'triton'
    with torch.no_grad(), pytest.raises(RuntimeError, match=r'read kernel faults.*seen somewhere'):
        memory.plan(x)


def test_a_plan_that_auto_takes_the_kernels_by_quotes_the_measurement(monkeypatch):
    """On a CPU in Triton's interpreter, as if it were an sm_90 GPU."""
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=8, operand_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 128))
    assert plan.implementation == 'triton' and '10.28 ms through the kernels' in plan.reason
    # that measurement timed every kernel: the projections and the scan too
    assert 'every Triton kernel' in plan.reason
    assert (plan.projections, plan.scan) == ('triton', 'triton')


def test_auto_keeps_the_projections_and_scan_on_pytorch_where_only_the_write_and_read_were_timed(
        monkeypatch):
    from convneur_mm.models.layers import NeuralMemory
    memory = NeuralMemory(128, chunk_size=8, operand_dtype='bfloat16').eval()
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', (
        tuned.MeasuredPath(90, 'bfloat16', False, 9.0, 10.0, 'a tuning run'), ))
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 128))
    assert plan.implementation == 'triton' and 'the Triton write and read' in plan.reason
    assert (plan.projections, plan.scan) == ('torch', 'torch')


def test_the_environment_forces_the_pytorch_path_over_triton_and_auto(monkeypatch):
    x = torch.empty(2, 20, 16, device='meta')
    for asked in ('triton', 'auto'):
        memory = NeuralMemory(16, chunk_size=8, implementation=asked).eval().to('meta')
        with torch.no_grad(), kernels.without_launches():
            monkeypatch.setattr(dispatch, 'FORCED_IMPLEMENTATION', 'torch')
            plan = memory.plan(x)
            assert (plan.implementation, plan.projections, plan.scan) == ('torch',) * 3, plan
            assert dispatch.FORCE_ENV in plan.reason
            monkeypatch.setattr(dispatch, 'FORCED_IMPLEMENTATION', None)
            if asked == 'triton':  # the same memory takes the kernels without it
                assert memory.plan(x).implementation == 'triton'


@pytest.mark.parametrize('value, forced', [('', None), ('torch', 'torch')])
def test_the_forcing_variable_takes_torch_or_nothing(value, forced):
    assert dispatch.forced_implementation({dispatch.FORCE_ENV: value}) == forced
    assert dispatch.forced_implementation({}) is None


def test_a_bad_forcing_value_is_a_clear_error():
    with pytest.raises(ValueError, match="CONVNEUR_MEMORY_IMPLEMENTATION may only be 'torch'"):
        dispatch.forced_implementation({dispatch.FORCE_ENV: 'triton'})


def _as_if_on_sm_90(monkeypatch) -> None:
    """The plan's view of an sm_90 CUDA GPU where the kernels can run: on a
    CPU, the dispatch's capability and availability answers faked."""
    monkeypatch.setattr(dispatch, 'cuda_capability', lambda device: 90)
    monkeypatch.setattr(dispatch, 'unavailable_reason', lambda *args: None)


@pytest.mark.parametrize('operand_dtype, max_lr', [
    ('bfloat16', 1.0), ('float32', 1.0), ('bfloat16', 1e-3)])
def test_the_projection_kernels_train_a_decomposed_read_too(monkeypatch, operand_dtype,
                                                            max_lr):
    """A decomposed read (16-bit operands, a small max_lr) asks the
    projections for exact queries only: their backward keeps 16-bit
    products, which compile without spills, so training keeps the kernel."""
    _as_if_on_sm_90(monkeypatch)
    memory = NeuralMemory(128, chunk_size=8, operand_dtype=operand_dtype, max_lr=max_lr,
                          implementation='triton')
    x = torch.randn(1, 20, 128)
    with torch.no_grad():
        assert memory.eval().plan(x).projections == 'triton'
    plan = memory.train().plan(x.requires_grad_())
    assert (plan.implementation, plan.scan, plan.projections) == ('triton', 'triton', 'triton')
    assert plan.decomposed_read == (max_lr < 1)


def test_auto_keeps_the_pytorch_path_under_torch_compile_on_a_measured_gpu(monkeypatch):
    """bf16 inference on sm_90, where a GPU measured the kernels faster:
    eager takes them, and 'auto' traced by torch.compile keeps the PyTorch
    path (Inductor fuses it; nobody has timed the kernels against that)."""
    _as_if_on_sm_90(monkeypatch)
    memory = NeuralMemory(128, chunk_size=8, operand_dtype='bfloat16').eval()
    x = torch.randn(1, 20, 128)
    with torch.no_grad():
        assert memory.plan(x).implementation == 'triton'  # the measurement decides
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        plan = memory.plan(x)
    assert plan.operand_dtype == torch.bfloat16
    assert plan.implementation == 'torch' and 'under torch.compile' in plan.reason, plan
    assert 'inside a compiled graph' in plan.reason
    assert (plan.projections, plan.scan) == ('torch', 'torch')
    memory.implementation = 'triton'  # asked for: traced as custom operators
    with torch.no_grad():
        assert memory.plan(x).implementation == 'triton'


@pytest.mark.parametrize('triton_ms, path', [(5.0, 'triton'), (15.0, 'torch')])
def test_a_compiled_measurement_decides_auto_under_torch_compile_only(monkeypatch, triton_ms,
                                                                      path):
    """An entry timed inside a compiled graph decides a compiled call, the
    projections and scan with it, and nothing of an eager call."""
    _as_if_on_sm_90(monkeypatch)
    compiled = tuned.MeasuredPath(90, 'bfloat16', False, triton_ms, 10.0, 'a compiled test',
                                  every_kernel=True, compiled=True)
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', (compiled, ))
    memory = NeuralMemory(128, chunk_size=8, operand_dtype='bfloat16').eval()
    x = torch.randn(1, 20, 128)
    with torch.no_grad():
        eager = memory.plan(x)
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        plan = memory.plan(x)
    assert eager.implementation == 'torch' and 'no GPU has timed' in eager.reason, eager
    assert plan.implementation == path and 'a compiled test' in plan.reason, plan
    assert (plan.projections, plan.scan) == (path, path)
    assert dispatch.auto_path(90, 'bfloat16', False, 128, compiled=True)[0] == path
    assert dispatch.auto_path(90, 'bfloat16', True, 128, compiled=True)[0] == 'torch'


def test_a_sequential_memory_never_reports_the_scan_kernel(monkeypatch):
    """The sequential mode takes each chunk's gradient at the previous state,
    with no scan: with implementation='triton' its plan says 'torch' for the scan
    (the parallel mode's says 'triton'), in inference and training."""
    _as_if_on_sm_90(monkeypatch)
    x = torch.randn(1, 20, 16)
    for update, scan in (('sequential', 'torch'), ('parallel', 'triton')):
        memory = NeuralMemory(16, chunk_size=8, update=update, implementation='triton')
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                plan = memory.plan(x)
            assert (plan.implementation, plan.scan) == ('triton', scan), (update, grad, plan)


def test_auto_picks_its_measurement_by_grad_mode_not_the_modules_mode(monkeypatch):
    """The shipped sm_90 bf16 measurements: inference took the kernels, a
    training step did not. An eval module under grad computes a training
    step's work, and a train module under no_grad an inference's."""
    _as_if_on_sm_90(monkeypatch)
    x = torch.randn(1, 20, 128)
    memory = NeuralMemory(128, chunk_size=8, operand_dtype='bfloat16')
    with torch.enable_grad():
        plan = memory.eval().plan(x)
    assert plan.implementation == 'torch' and '77.73 ms' in plan.reason, plan
    with torch.no_grad():
        plan = memory.train().plan(x)
    assert plan.implementation == 'triton' and '10.28 ms' in plan.reason, plan
