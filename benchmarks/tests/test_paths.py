"""The memory branch against the autograd reference and titans-pytorch."""
import sys

import torch

from benchmarks.memory import paths as bench


def test_memory_benchmark_counts_the_same_matrix_products_on_both_paths():
    """The speed-up bound of the memory task's paths rests on this: the
    closed-form path and the autograd reference run the same GEMM FLOPs."""
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    from convneur_mm.testing.memory_reference import reference_memory
    torch.manual_seed(0)
    d, chunk, tokens = 16, 32, 128  # 4 chunks: 3 updates that are read
    memory = NeuralMemory(d, chunk_size=chunk)
    x = torch.randn(2, tokens, d, requires_grad=True)
    paths = {'fast': lambda m, t: m(t), 'reference': reference_memory}
    flops = {name: bench.gemm_flops(lambda: bench.train_step(memory, fn, x, 'cpu'))
             for name, fn in paths.items()}
    # forward alone: 5 (L x d x 4d) products per update, 2 per token read
    assert flops['fast'] > 2 * 2 * (3 * chunk * 5 + 2 * tokens) * d * 4 * d
    # the fast path adds only its scan's small products ((U+1) x U per weight)
    assert abs(flops['fast'] - flops['reference']) <= 0.05 * flops['reference'], flops
    step = lambda: bench.train_step(memory, paths['fast'], x, 'cpu')  # noqa: E731
    assert 0 < bench.gemm_seconds(step, 'cpu') < 10


def test_memory_benchmark_skips_titans_with_a_message_when_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, 'titans_pytorch', None)  # import fails
    module, message = bench.titans_memory(16, 4)
    assert module is None and 'requirements/optional/titans.txt' in message


def test_memory_benchmark_reports_titans_eager_and_both_compiled():
    name = 'titans-pytorch 0.5.5'
    ours, ours_c = 'ours (closed form, scan)', 'ours, torch.compile'
    titans_c = name + ', torch.compile'
    train = {ours: 0.7, name: 1.4, ours_c: 0.5, titans_c: 0.6}
    infer = {ours: 0.2, name: 0.3, ours_c: 0.1, titans_c: 0.25}
    lines = bench.titans_report(name, {'ours': 80e9, 'titans': 100e9}, train, infer)
    assert lines == [
        f'vs {name}: ours 2.00x faster forward+backward (target >= 2x), 1.50x inference',
        f'{name} runs 1.25x our matrix-product FLOPs (forward+backward)',
        'both compiled: ours 1.20x faster forward+backward, 2.50x inference']
    eager_only = {k: v for k, v in train.items() if 'compile' not in k}
    assert len(bench.titans_report(name, {'ours': 1, 'titans': 1}, eager_only, infer)) == 2
