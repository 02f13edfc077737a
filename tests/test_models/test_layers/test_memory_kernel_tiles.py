"""How the memory's kernels get their launch options: the defaults, a tuned
entry for the GPU compiled for, a tuning run's forced options, the caller's
tile sizes (``kernels.launch.tile_config``, ``kernels.tuned``)."""
import pytest
import torch

from convneur_mm.models.layers.memory_ops.kernels import launch, tuned
from convneur_mm.models.layers.memory_ops.kernels.tuned import TunedTile, check_tuned_tiles

BF16 = torch.bfloat16


def _entry(**changes) -> TunedTile:
    fields = dict(kernel='grads_cols', arch=90, operand_dtype='bfloat16', block_d=128,
                  decomposed=False, BM=128, BH=64, num_warps=8, num_stages=3)
    fields.update(changes)
    return TunedTile(**fields)


def test_the_shipped_tables_are_valid():
    check_tuned_tiles(tuned.TUNED_TILES)
    tuned.check_measured_paths(tuned.MEASURED_PATHS)
    entry = tuned.MEASURED_PATHS[0]
    with pytest.raises(ValueError, match='two measured paths'):
        tuned.check_measured_paths([entry, entry._replace(triton_ms=1.0)])
    with pytest.raises(ValueError, match='must be positive'):
        tuned.check_measured_paths([entry._replace(torch_ms=0.0)])
    with pytest.raises(ValueError, match='operand_dtype must be one of'):
        tuned.check_measured_paths([entry._replace(operand_dtype='bf16')])


def test_a_tuned_entry_applies_to_its_kernel_gpu_dtype_and_width_only(monkeypatch):
    default = launch.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(), ))
    chosen = launch.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
    assert chosen == dict(default, BM=128, BH=64, num_warps=8, num_stages=3)
    # another kernel, GPU, dtype, width or read kind; the interpreter (no arch)
    assert launch.tile_config('grads_rows', 128, 196, None, None, BF16, arch=90) != chosen
    for other in (dict(kernel='grads_backward_cols'), dict(arch=80),
                  dict(operand_dtype=torch.float16), dict(d=80 * 2 + 1)):
        args = dict(kernel='grads_cols', d=128, operand_dtype=BF16, arch=90)
        args.update({k: v for k, v in other.items()})
        config = launch.tile_config(args['kernel'], args['d'], 196, None, None,
                                    args['operand_dtype'], arch=args['arch'])
        assert (config['BM'], config['num_stages']) != (128, 3), other
    assert launch.tile_config('grads_cols', 128, 196, None, None, BF16)['num_stages'] == 2
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(kernel='read', decomposed=True), ))
    assert launch.tile_config('read', 128, 196, None, None, BF16, arch=90)['BM'] == 64
    assert launch.tile_config('read', 128, 196, None, None, BF16, True, arch=90)['BM'] == 128


def test_precedence_caller_then_forced_then_tuned_and_no_block_past_the_rows(monkeypatch):
    monkeypatch.setattr(tuned, 'TUNED_TILES', (_entry(), ))
    with launch.forced_tiles('grads_cols', BM=32, num_warps=2):
        config = launch.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)
        # the options not forced come from the tuned entry
        assert (config['BM'], config['num_warps'], config['BH'], config['num_stages']) == (
            32, 2, 64, 3)
        # only the kernel named
        assert launch.tile_config('grads_rows', 128, 196, None, None, BF16, arch=90)['BM'] == 64
        with launch.forced_tiles('grads_cols', BM=16):  # the innermost wins
            assert launch.tile_config('grads_cols', 128, 196, None, None, BF16)['BM'] == 16
        caller = launch.tile_config('grads_cols', 128, 196, 16, 128, BF16, arch=90)
        assert (caller['BM'], caller['BH']) == (16, 128)
    assert launch.tile_config('grads_cols', 128, 196, None, None, BF16, arch=90)['BM'] == 128
    # a chunk of 20 rows takes 32-row blocks, whatever the table says
    assert launch.tile_config('grads_cols', 128, 20, None, None, BF16, arch=90)['BM'] == 32


@pytest.mark.parametrize('kernel, options, match', [
    ('grads', {}, 'kernel must be one of'),
    ('read', dict(BK=32), 'forced_tiles takes'),
    ('read', dict(BM=48), 'BM must be a power of two'),
])
def test_forced_tiles_refuses_what_no_launch_takes(kernel, options, match):
    with pytest.raises(ValueError, match=match):
        with launch.forced_tiles(kernel, **options):
            pass


@pytest.mark.parametrize('changes, match', [
    (dict(kernel='grads'), 'kernel must be one of'),
    (dict(operand_dtype='half'), 'operand_dtype must be one of'),
    (dict(BH=96), 'BH must be a power of two'),
    (dict(block_d=8), 'block_d must be a power of two >= 16'),
    (dict(num_warps=3), 'num_warps must be a power of two'),
])
def test_a_bad_tuned_entry_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        check_tuned_tiles([_entry(**changes)])
    with pytest.raises(ValueError, match='two entries for'):
        check_tuned_tiles([_entry(), _entry(BM=16)])


@pytest.mark.parametrize('arch, dtype, training, path, words', [
    (None, 'bfloat16', False, 'torch', "off NVIDIA's CUDA GPUs"),
    (None, 'float32', True, 'torch', 'trains on the PyTorch path'),
    (90, 'bfloat16', False, 'triton', '17.96 ms through the kernels against 20.36 ms'),
    (90, 'float32', False, 'torch', '49.67 ms through the kernels against 27.82 ms'),
    (90, 'float16', False, 'torch', 'no GPU has timed'),
    (80, 'bfloat16', False, 'torch', 'on sm_80 with bfloat16 operands'),
    (90, 'bfloat16', True, 'torch', 'trains on the PyTorch path: no GPU has timed'),
])
def test_auto_takes_the_kernels_only_where_a_gpu_measured_them_faster(arch, dtype, training,
                                                                      path, words):
    got, why = tuned.auto_path(arch, dtype, training)
    assert got == path and words in why, why


def test_a_new_measurement_decides_auto_for_its_gpu_and_mode(monkeypatch):
    monkeypatch.setattr(tuned, 'MEASURED_PATHS', tuned.MEASURED_PATHS + (
        tuned.MeasuredPath(80, 'bfloat16', True, 9.0, 10.0, 'a test'), ))
    assert tuned.auto_path(80, 'bfloat16', True)[0] == 'triton'
    assert tuned.auto_path(80, 'bfloat16', False)[0] == 'torch'


def test_the_memory_asks_auto_path_for_its_gpu(monkeypatch):
    from convneur_mm.models.layers import NeuralMemory, neural_memory
    memory = NeuralMemory(16, chunk_size=8, matmul_dtype='bfloat16').eval()
    monkeypatch.setattr(neural_memory, '_cuda_arch', lambda device: 80)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 16))
    assert plan.implementation == 'torch' and 'sm_80 with bfloat16' in plan.reason


def test_a_plan_that_auto_takes_the_kernels_by_quotes_the_measurement(monkeypatch):
    """On a CPU in Triton's interpreter, as if it were an sm_90 GPU."""
    from convneur_mm.models.layers import NeuralMemory, neural_memory
    memory = NeuralMemory(16, chunk_size=8, matmul_dtype='bfloat16').eval()
    monkeypatch.setattr(neural_memory, '_cuda_arch', lambda device: 90)
    monkeypatch.setattr(neural_memory, 'unavailable_reason', lambda *args: None)
    with torch.no_grad():
        plan = memory.plan(torch.randn(1, 20, 16))
    assert plan.implementation == 'triton' and '17.96 ms through the kernels' in plan.reason


OWN_TILES_SCRIPT = r'''
import json, torch
from convneur_mm.models.layers.memory_ops import MemoryWeights, chunk_grads_triton
from convneur_mm.models.layers.memory_ops.kernels import launch

gen = torch.Generator().manual_seed(0)
d, L = 16, 20
weights = MemoryWeights(torch.randn(1, d, 4 * d, generator=gen) / 4,
                        torch.randn(1, 4 * d, d, generator=gen) / 8,
                        torch.randn(1, d, generator=gen) / 10)
keys, values = torch.randn(1, 3, L, d, generator=gen), torch.randn(1, 3, L, d, generator=gen)
lr = torch.rand(1, 3, L, generator=gen)
with torch.no_grad():
    base = chunk_grads_triton(weights, keys, values, lr, torch.float16)
    errors = {}
    for bh in (16, 64):
        with launch.forced_tiles('grads_cols', BH=bh):
            got = chunk_grads_triton(weights, keys, values, lr, torch.float16)
        errors[bh] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, base))
print(json.dumps(errors))
'''


def test_the_weights_pass_launches_by_its_own_tiles():
    """The chunk gradients' weights pass with hidden blocks of its own (16
    or 64 units while the rows pass takes 32): its grid counts its own
    blocks, and every block of every chunk is computed (interpreter)."""
    import json
    import os
    import subprocess
    import sys

    from ...paths import REPO
    done = subprocess.run([sys.executable, '-c', OWN_TILES_SCRIPT], capture_output=True,
                          text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET='1'))
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert max(errors.values()) < 1e-6, errors
