import time

import torch

from convneur_mm.utils.bench_env import peak_gemm_rate


def test_peak_gemm_rate_is_the_best_of_its_products():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    a @ b
    start = time.perf_counter()
    a @ b
    one_product = 2 * 256 ** 3 / (time.perf_counter() - start)
    rate = peak_gemm_rate('cpu', size=256, repeats=20)
    assert 1e8 < rate < 1e15  # FLOP/s, not seconds
    assert rate > 0.5 * one_product
