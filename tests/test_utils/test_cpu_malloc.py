"""glibc malloc tuning for CPU runs: large tensors stop being page-faulted in."""
import json
import os
import subprocess
import sys

import pytest

from convneur_mm.utils import cpu_malloc
from convneur_mm.utils.cpu_malloc import GLIBC_ENV, OPT_OUT_ENV, tune_cpu_malloc

from ..paths import REPO

# A GEMM - GELU - GEMM step with a 64 MiB hidden tensor, as in the memory
# branch; the fewest page faults of a step once the heap has settled.
PROBE = """
import json, resource, torch
from convneur_mm.utils.cpu_malloc import tune_cpu_malloc
message = tune_cpu_malloc(force=True)
x, w1, w2 = torch.randn(16384, 256), torch.randn(256, 1024), torch.randn(1024, 256)
per_step = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (torch.nn.functional.gelu(x @ w1) @ w2).sum()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(per_step[4:])
print(json.dumps(dict(message=message, faults=faults, pages=16384 * 1024 * 4 // 4096)))
"""

needs_glibc = pytest.mark.skipif(not cpu_malloc.glibc_version(), reason='glibc only')


def _probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in GLIBC_ENV + (OPT_OUT_ENV, 'GLIBC_TUNABLES')}
    out = subprocess.run([sys.executable, '-c', PROBE], env={**clean, **env}, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_glibc
def test_freed_large_tensors_are_reused_without_page_faults():
    default = _probe(**{OPT_OUT_ENV: '0'})
    assert '=0' in default['message']
    if default['faults'] < 0.5 * default['pages']:
        pytest.skip(f'glibc\'s defaults already reuse the pages here (transparent huge '
                    f'pages?): {default}')
    tuned = _probe()
    if 'refused' in tuned['message']:
        pytest.skip(tuned['message'])
    assert 'raised to 1024 MiB' in tuned['message']
    assert tuned['faults'] < 0.1 * default['faults'], (tuned, default)


@pytest.fixture
def clean_env(monkeypatch):
    for name in GLIBC_ENV + (OPT_OUT_ENV, 'GLIBC_TUNABLES'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_opt_out_and_user_settings_win(clean_env):
    clean_env.setenv(OPT_OUT_ENV, '0')
    assert 'kept' in tune_cpu_malloc(force=True)
    assert not any(name in os.environ for name in GLIBC_ENV)
    # thresholds from the environment (the user's, or a tuned parent's) are
    # what glibc applied at start-up: reported as such, opted out or not
    clean_env.setenv('MALLOC_MMAP_THRESHOLD_', '4096')
    assert 'as set in the environment' in tune_cpu_malloc(force=True)
    assert os.environ['MALLOC_MMAP_THRESHOLD_'] == '4096'
    clean_env.delenv('MALLOC_MMAP_THRESHOLD_')
    clean_env.delenv(OPT_OUT_ENV)
    clean_env.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=65536')
    assert 'as set in the environment' in tune_cpu_malloc(force=True)
    assert not any(name in os.environ for name in GLIBC_ENV)


def test_thresholds_beyond_a_c_int_are_refused():
    with pytest.raises(ValueError, match='C int'):
        tune_cpu_malloc(4 << 30, force=True)  # would reach mallopt as 0


def test_other_c_libraries_are_left_alone(clean_env):
    clean_env.setattr(cpu_malloc.os, 'confstr', lambda name: 'musl 1.2')
    assert cpu_malloc.glibc_version() == ''
    assert 'not glibc' in tune_cpu_malloc(force=True)
    assert not any(name in os.environ for name in GLIBC_ENV)


def test_benchmarks_report_the_malloc_setting(clean_env):
    from convneur_mm.analysis.timing import setup_benchmark_device
    clean_env.setenv(OPT_OUT_ENV, '0')
    description = setup_benchmark_device('cpu')
    assert 'torch threads' in description and 'defaults kept' in description
