"""``--deterministic`` on CUDA: cuBLAS's workspace set before CUDA
starts, and ops without a deterministic CUDA kernel (the backward passes of
bilinear interpolate and adaptive average pooling) warn once per op name
instead of raising. What a CPU can show: the variable, the mode, the warning."""
import os
import warnings

import pytest
import torch
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import Runner
from torch import nn

from convneur_mm.apis.launch import build_runner, prepare_deterministic, set_randomness
from convneur_mm.engine.runner import ConvNeurRunner
from .test_resume import _toy_run


@MODELS.register_module(force=True)
class DeterministicToy(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, *args, **kwargs):
        return {}


@pytest.fixture
def restore_modes(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    filters = warnings.filters[:]
    yield
    torch.use_deterministic_algorithms(False)
    warnings.filters[:] = filters


def _runner(tmp_path, deterministic):
    return build_runner(Config(dict(
        model=dict(type='DeterministicToy'), work_dir=str(tmp_path), default_scope='mmengine',
        randomness=dict(seed=0, deterministic=deterministic))))


def test_deterministic_runs_warn_only_with_cublas_workspace(tmp_path, restore_modes):
    _runner(tmp_path, deterministic=True)
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # MMEngine set it to raise
    with warnings.catch_warnings(record=True) as caught:
        prepare_deterministic()  # the filters as the run has them
        # put_ has no deterministic kernel (on the CPU too): two call sites, one warning
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1., 2.]))
        torch.ones(4).put_(torch.tensor([1, 1]), torch.tensor([1., 2.]))
    messages = [str(w.message) for w in caught if 'deterministic' in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith('put_ does not have a deterministic')


def test_user_cublas_setting_is_kept_and_plain_runs_untouched(tmp_path, restore_modes,
                                                              monkeypatch):
    _runner(tmp_path, deterministic=False)
    assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':16:8')
    prepare_deterministic()
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':16:8'


def test_deterministic_without_a_seed_builds(tmp_path, restore_modes):
    """``--deterministic`` alone on a config without ``randomness`` (the COCO
    and ADE20K ones): MMEngine's ``set_randomness`` requires a seed, and the
    runner failed to build before 2026-11-25."""
    cfg = Config(dict(model=dict(type='DeterministicToy'), work_dir=str(tmp_path),
                      default_scope='mmengine'))
    set_randomness(cfg, deterministic=True)
    runner = build_runner(cfg)
    assert runner.seed is not None  # drawn by MMEngine
    assert torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize('runner_cls', [ConvNeurRunner, Runner], ids=['ours', 'mmengine'])
def test_resuming_with_another_seed_keeps_warn_only(tmp_path, restore_modes, runner_cls):
    """MMEngine's ``resume`` sets the randomness again when the checkpoint's
    seed differs (always, for a config without a seed): its
    ``use_deterministic_algorithms(True)`` made the ops without a
    deterministic CUDA kernel raise for the rest of the run. Ours keeps
    warn_only; MMEngine's runner, the control, does not."""
    _toy_run(ConvNeurRunner, tmp_path / 'first', by_epoch=False, name='first')
    _toy_run(runner_cls, tmp_path / 'resumed', by_epoch=False, name='resumed',
             resume_from=str(tmp_path / 'first' / 'iter_9.pth'),
             randomness=dict(seed=None, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled() == (runner_cls is ConvNeurRunner)


def test_detectors_say_that_roi_align_is_not_deterministic_on_cuda(tmp_path, restore_modes,
                                                                   monkeypatch):
    """mmcv's RoIAlign backward accumulates with atomicAdd on CUDA and never
    reports it to torch's deterministic mode, so a deterministic detector run
    warned of nothing and was not bit-exact. On CUDA the run now says so; the
    segmentors and classifiers use no such op, and a CPU runs it serially."""
    import os.path as osp

    from convneur_mm.apis import launch
    from ..paths import REPO
    detector = Config.fromfile(osp.join(REPO, 'configs', 'cascade_rcnn_convneur_m3_1x_coco.py'))
    warned = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda msg, **kw: warned.append(msg))
    assert launch.warn_silent_nondeterminism(detector, cuda=True) == ['RoIAlign']
    assert len(warned) == 1 and 'RoIAlign' in warned[0] and 'not bit-exact' in warned[0]
    assert launch.warn_silent_nondeterminism(detector, cuda=False) == []
    for name in ('upernet_convneur_m4_80k_ade20k.py', 'cls_convneur_m3_300e_in1k.py'):
        cfg = Config.fromfile(osp.join(REPO, 'configs', name))
        assert launch.warn_silent_nondeterminism(cfg, cuda=True) == [], name
    assert len(warned) == 1
    # build_runner asks, with the device it will train on
    asked = []
    monkeypatch.setattr(launch, 'warn_silent_nondeterminism',
                        lambda cfg, cuda: asked.append(cuda) or [])
    _runner(tmp_path, deterministic=True)
    _runner(tmp_path, deterministic=False)
    assert asked == [torch.cuda.is_available()]
    build_runner(Config(dict(  # tools/test.py: no backward runs
        model=dict(type='DeterministicToy'), work_dir=str(tmp_path), default_scope='mmengine',
        randomness=dict(seed=0, deterministic=True))), training=False)
    assert len(asked) == 1
    # scoped names and classes (mmdet's Python-style configs) are found too
    from mmcv.ops import RoIAlign
    for op in ('mmcv.RoIAlign', RoIAlign):
        model = dict(roi_head=dict(roi_extractor=[dict(roi_layer=dict(type=op))]))
        assert launch.silently_nondeterministic_ops(model) == ['RoIAlign']
