"""Test session set-up.

CPU pinning: the tests run on the CPU, and so does every process they start
(tools/train.py, torchrun, gloo workers), also on a machine with GPUs, where
`make test` must pass as it does here: CUDA_VISIBLE_DEVICES is emptied before
anything touches CUDA, and the tools take an emptied CUDA_VISIBLE_DEVICES as
the CPU chosen on purpose.

GPU tests: marked ``gpu`` (``gpu(count=2)`` for two GPUs). They are skipped,
with the reason, where fewer GPUs are visible; where there are enough, each
runs in a child pytest that sees the GPUs the session was started with. A
test that runs on both takes a ``device`` parameter (tests/devices.py).

Workers: `make test` runs pytest-xdist workers, each taking whole files. They
share the cores (one OpenMP thread each on 2 cores) and build the wheel once.
"""
import os

GPU_CHILD = 'CONVNEUR_TEST_GPU_CHILD'  # set in the child that runs one GPU test
ORIGINAL_VISIBLE = os.environ.get('CUDA_VISIBLE_DEVICES')
if os.environ.get(GPU_CHILD) != '1':
    os.environ['CUDA_VISIBLE_DEVICES'] = ''  # before torch is imported
if os.environ.get('PYTEST_XDIST_WORKER') and 'OMP_NUM_THREADS' not in os.environ:
    # pytest-xdist's workers share the cores, and so do the processes they start:
    # oversubscribed OpenMP threads spin (tests/threads.py)
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // workers))

import contextlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from convneur_mm.utils.config_metafiles import metafiles_read_once  # noqa: E402
from convneur_mm.utils.cpu_malloc import tune_cpu_malloc  # noqa: E402
from convneur_mm.utils.cuda_env import detect_nvidia  # noqa: E402

from . import interpreted  # noqa: E402
from .paths import REPO  # noqa: E402

_gpu_count = None
_session = contextlib.ExitStack()  # what pytest_configure holds open until the end


def pytest_configure(config):
    # the markers (gpu, slow, torch_pinned) are registered in pytest.ini
    # what tools/train.py does on CPU; spawned test processes inherit it
    tune_cpu_malloc()
    # in-process loads outside load_config too (Config.fromfile, the toolboxes' APIs)
    _session.enter_context(metafiles_read_once())


def pytest_unconfigure(config):
    _session.close()


def _in_gpu_child() -> bool:
    return os.environ.get(GPU_CHILD) == '1'


def _gpu_env() -> dict:
    """The session's original environment, GPUs visible."""
    env = dict(os.environ, **{GPU_CHILD: '1'})
    if ORIGINAL_VISIBLE is None:
        env.pop('CUDA_VISIBLE_DEVICES', None)
    else:
        env['CUDA_VISIBLE_DEVICES'] = ORIGINAL_VISIBLE
    return env


def visible_gpus() -> int:
    """CUDA devices the session was started with (asked in a child process:
    this one must not initialize CUDA)."""
    global _gpu_count
    if _gpu_count is None:
        if _in_gpu_child():
            import torch
            _gpu_count = torch.cuda.device_count()
        elif not detect_nvidia().present:
            _gpu_count = 0
        else:
            probe = subprocess.run([sys.executable, '-c',
                                    'import torch; print(torch.cuda.device_count())'],
                                   env=_gpu_env(), capture_output=True, text=True)
            _gpu_count = int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0
    return _gpu_count


def pytest_collection_modifyitems(config, items):
    # the files that read interpreter runs go last, so that in one process the runs are
    # made beside the others (pytest-xdist's loadfile sends the largest files first anyway)
    late = {item.path for item in items
            if interpreted.wanted([getattr(item, 'fixturenames', ())])}
    items.sort(key=lambda item: item.path in late)  # stable
    for item in items:
        marker = item.get_closest_marker('gpu')
        if marker is None:
            continue
        need = marker.kwargs.get('count', 1)
        have = visible_gpus()
        if have < need:
            item.add_marker(pytest.mark.skip(
                reason=f'needs {need} CUDA GPU(s); {have} visible' +
                ('' if have or detect_nvidia().present else ' (no NVIDIA driver)')))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A GPU test runs in a child pytest that sees the GPUs."""
    if _in_gpu_child() or pyfuncitem.get_closest_marker('gpu') is None:
        return None
    # -m '': the test was selected here; pytest.ini's `-m "not slow"` must not
    # deselect it in the child
    child = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            '-m', '', pyfuncitem.nodeid], cwd=str(pyfuncitem.config.rootpath),
                           env=_gpu_env(), capture_output=True, text=True)
    out = child.stdout + child.stderr
    if child.returncode == 0 and re.search(r'\b1 passed\b', out):
        return True
    if child.returncode == 0 and re.search(r'\b1 skipped\b', out):
        pytest.skip(f'skipped on the GPU: {out[-500:]}')
    pytest.fail(f'on the GPU (child pytest, exit {child.returncode}):\n{out[-6000:]}',
                pytrace=False)


@pytest.fixture(autouse=True)
def _no_tf32_on_gpu(request):
    """The CPU tests' tolerances assume float32 products: for a test marked
    ``gpu``, cuDNN's and cuBLAS's TF32 (on by default for convolutions) is
    turned off, and restored after."""
    if not _in_gpu_child() or request.node.get_closest_marker('gpu') is None:
        yield
        return
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope='session')
def repo_root():
    return REPO


def _in_xdist_worker(config) -> bool:
    # not the environment variable, which a child pytest of a worker inherits
    return hasattr(config, 'workerinput')


def _run_folder(request, tmp_path_factory) -> Path:
    """The test run's folder: under pytest-xdist, the workers' shared one."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if _in_xdist_worker(request.config) else base


@pytest.fixture(scope='session', autouse=True)
def _interpreter_runs(request, tmp_path_factory):
    """Make the interpreter runs that the selected tests' fixtures read
    (``interpreted.FIXTURE_RUNS``) beside the tests, once per test run: each
    pytest-xdist worker makes its share, and ends what it makes at its end."""
    keys = interpreted.wanted(getattr(item, 'fixturenames', ()) for item in request.session.items)
    if _in_xdist_worker(request.config):
        worker = request.config.workerinput
        keys = keys[int(worker['workerid'][len('gw'):])::worker['workercount']]
    interpreted.SESSION.begin(_run_folder(request, tmp_path_factory) / 'interpreter-runs', keys)
    yield
    interpreted.SESSION.stop_all()


def _once_per_run(request, tmp_path_factory, name: str, make) -> str:
    """``make(folder)`` once per test run, also when pytest-xdist runs it in
    several workers: they share the run's folder and take turns by a lock,
    so no two build in the checkout at once. Returns what ``make`` returned,
    as text (every worker reads it from the folder)."""
    from filelock import FileLock
    folder = _run_folder(request, tmp_path_factory) / name
    with FileLock(str(folder) + '.lock'):
        done = folder / 'made'
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(str(make(folder)))
        return done.read_text()


@pytest.fixture(scope='session')
def built_wheel(request, tmp_path_factory):
    """A wheel of this repository, built once per run."""
    def build(out):
        subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                        '--no-build-isolation', '-q', '-w', str(out), REPO],
                       check=True, cwd=str(out))
        wheels = list(out.glob('convneur_mm-*.whl'))
        assert len(wheels) == 1, wheels
        return wheels[0]
    return Path(_once_per_run(request, tmp_path_factory, 'wheel', build))


@pytest.fixture(scope='session')
def installed_wheel(request, built_wheel, tmp_path_factory) -> str:
    """``built_wheel`` installed (``pip install --target``) into a fresh
    directory, once per run: put it on PYTHONPATH, read it, don't write."""
    def install(folder):
        site = folder / 'site'
        subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q',
                        '--target', str(site), str(built_wheel)], check=True, cwd=str(folder))
        return site
    return _once_per_run(request, tmp_path_factory, 'wheel_install', install)


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """Tests that build Runners or call init_default_scope leave MMEngine's
    current default scope behind (a process-wide singleton); registry lookups
    in later tests would then go to that toolbox's registry. Restore it."""
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
