"""NonFiniteStopHook: a run stops within one iteration of its first non-finite
loss or gradient, names the iteration, the loss terms and the module group,
never applies the poisoned step and writes no checkpoint after it; every
shipped config carries the hook; a 2-process launch exits non-zero."""
import glob
import os.path as osp
import re
import subprocess
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import default_collate
from torch import nn

from convneur_mm.engine.finite_check import (NonFiniteStopHook, NonFiniteTrainingError,
                                             module_group, module_groups)
from convneur_mm.engine.runner import ConvNeurRunner
from ..paths import REPO
from .test_dist_launch import TOOLS, ade20k_tiny, _run_env  # noqa: F401  (fixture)
from .test_resume import NoisyData, NoisyModel

DEMO_ADE20K = osp.join(REPO, 'configs', 'demo', 'fpn_convneur_m2_ade20k_tiny.py')


class TwoGroupModel(NoisyModel):
    """A 'backbone' and a 'head'; from iteration ``bad_at`` on, the loss (or
    only the backbone's gradient) is NaN."""

    def __init__(self, bad_at: int = 10 ** 9, what: str = 'loss'):
        super().__init__()
        self.backbone = nn.ModuleDict(dict(stages=nn.ModuleList([nn.Linear(2, 2)])))
        self.head = nn.Linear(2, 1)
        self.bad_at, self.what, self.calls = bad_at, what, 0

    def forward(self, inputs, labels=None, mode='loss'):
        if mode == 'predict':
            return [dict(pred=p) for p in self.head(inputs).squeeze(1)]
        self.calls += 1
        hidden = self.backbone['stages'][0](inputs)
        if self.calls >= self.bad_at and self.what == 'gradient':
            hidden.register_hook(lambda g: g * float('nan'))
        out = self.head(hidden).squeeze(1)
        loss = (out - labels).square().mean()
        bad = self.calls >= self.bad_at
        if bad and self.what in ('loss', 'levels'):
            extra = hidden.mean() * float('nan')
        elif bad and self.what == 'constant':  # a NaN term with no gradient
            extra = torch.tensor(float('nan'))
        else:
            extra = hidden.mean() * 0
        if self.what == 'levels':  # per-level terms in a list, as MMDetection's RPN head gives
            return dict(loss_fit=loss, loss_levels=[hidden.mean() * 0, extra])
        return dict(loss_fit=loss, loss_extra=extra)


def _run(work_dir, model, hooks=None, max_iters=8, optim_wrapper=None):
    data = dict(dataset=NoisyData(), batch_size=2, collate_fn=default_collate,
                sampler=dict(type='InfiniteSampler', shuffle=True))
    runner = ConvNeurRunner(
        model=model, work_dir=str(work_dir), experiment_name=f'run_{time.time()}',
        train_dataloader=data,
        optim_wrapper=optim_wrapper or dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        custom_hooks=hooks if hooks is not None else [NonFiniteStopHook()],
        randomness=dict(seed=0), default_scope='mmengine')
    runner.train()
    return runner


@pytest.mark.parametrize('name,group', [
    ('backbone.downsample_layers.0.0.weight', 'backbone.stem'),
    ('module.backbone.downsample_layers.2.1.bias', 'backbone.stage3.local'),
    ('backbone.stages.0.0.global_branch.memory.w1', 'backbone.stage1.global'),
    ('backbone.stages.1.2.local_branch.dwconv.weight', 'backbone.stage2.local'),
    ('backbone.norm3.weight', 'backbone.stage4.local'),
    ('backbone.layer2.0.conv1.weight', 'backbone.stage2'),  # ResNet
    ('backbone.conv1.weight', 'backbone.stem'),
    ('neck.lateral_convs.0.conv.weight', 'neck'),
    ('roi_head.bbox_head.0.fc_cls.weight', 'roi_head'),
    ('decode_head.conv_seg.weight', 'decode_head'),
    ('head.fc.weight', 'head'),
])
def test_module_group(name, group):
    assert module_group(name) == group


@pytest.mark.parametrize('config', ['demo/cascade_rcnn_convneur_m3_coco_tiny.py',
                                    'demo/fpn_convneur_m2_ade20k_tiny.py',
                                    'demo/cls_convneur_m1_imagenet_tiny.py'])
def test_the_demo_models_split_into_the_documented_groups(config):
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    model = build_model(load_config(osp.join(REPO, "configs", config)), init=False)
    groups = set(module_groups(model))
    stages = {f'backbone.stage{i}.{part}' for i in range(1, 5) for part in ('local', 'global')}
    assert {'backbone.stem'} | stages <= groups
    assert groups - stages - {'backbone.stem'} and 'backbone' not in groups


def test_every_shipped_training_config_carries_the_hook():
    configs = [c for c in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
               if '/metafiles/' not in c and '/recipes/' not in c]
    assert len(configs) > 20
    for path in configs:
        hooks = Config.fromfile(path).get('custom_hooks') or []
        assert any(h.get('type') == 'convneur_mm.NonFiniteStopHook' for h in hooks), path


def test_a_healthy_run_trains_to_the_end_and_logs_group_norms(tmp_path):
    runner = _run(tmp_path, TwoGroupModel(), [NonFiniteStopHook(log_group_norms=True)])
    assert runner.iter == 8
    scalars = runner.message_hub.log_scalars
    assert {'train/grad_norm.backbone.stage1.local', 'train/grad_norm.head'} <= set(scalars)
    assert scalars['train/grad_norm.head'].current() > 0


def test_a_nan_loss_stops_at_that_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    model = TwoGroupModel(bad_at=5)
    with pytest.raises(NonFiniteTrainingError) as error:
        _run(tmp_path, model)
    message = str(error.value)
    assert 'iteration 5:' in message and 'loss_extra=nan' in message, message
    assert 'loss_fit' not in message  # only the non-finite terms are named
    assert "first non-finite gradient in group 'backbone.stage1.local'" in message
    assert '1 of 3 groups' in message  # the head's gradient does not see the NaN term
    assert model.calls == 5
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the step was never applied
    state = torch.load(tmp_path / 'iter_4.pth', weights_only=False)['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values())


def test_a_nan_in_a_list_of_loss_terms_is_named_with_their_sum(tmp_path):
    model = TwoGroupModel(bad_at=4, what='levels')
    with pytest.raises(NonFiniteTrainingError, match=r'iteration 4: loss terms loss_levels=nan;'):
        _run(tmp_path, model)


def test_a_nan_loss_term_without_gradient_stops_after_its_iteration(tmp_path):
    model = TwoGroupModel(bad_at=5, what='constant')
    with pytest.raises(NonFiniteTrainingError, match=r'iteration 5: loss terms loss_extra=nan;'):
        _run(tmp_path, model)
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']


def test_a_nan_gradient_with_a_finite_loss_names_its_group(tmp_path):
    model = TwoGroupModel(bad_at=3, what='gradient')
    with pytest.raises(NonFiniteTrainingError) as error:
        _run(tmp_path, model)
    message = str(error.value)
    assert 'iteration 3:' in message and 'all finite on this rank' in message, message
    assert "group 'backbone.stage1.local'" in message and '1 of 3 groups' in message


def test_without_the_hook_the_nan_run_goes_on_to_the_end(tmp_path):
    """The control: MMEngine alone trains through the NaN and exits normally."""
    model = TwoGroupModel(bad_at=5)
    assert _run(tmp_path, model, hooks=[]).iter == 8
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_clipped_gradients_are_checked_too(tmp_path):
    """clip_grad turns NaN gradients into NaN, not into a finite step."""
    with pytest.raises(NonFiniteTrainingError, match='iteration 3'):
        _run(tmp_path, TwoGroupModel(bad_at=3, what='gradient'),
             optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01), clip_grad=dict(max_norm=1)))


def test_accumulated_iterations_check_the_loss(tmp_path):
    """With accumulative_counts the optimizer steps every 4th iteration: a NaN
    loss at iteration 2 still stops the run at iteration 2."""
    with pytest.raises(NonFiniteTrainingError, match='iteration 2'):
        _run(tmp_path, TwoGroupModel(bad_at=2), optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.01), accumulative_counts=4))


def test_a_collapsed_fp16_loss_scale_stops_the_run(tmp_path):
    class Scaler:
        def is_enabled(self):
            return True

        def get_scale(self):
            return 2.0 ** -3

    runner = type('Runner', (), dict(iter=6, epoch=0))()
    runner.optim_wrapper = type('Wrapper', (), dict(loss_scaler=Scaler()))()
    hook = NonFiniteStopHook()
    hook._runner, hook._params = runner, []
    with pytest.raises(NonFiniteTrainingError, match='loss scale fell to 0.125'):
        hook.after_train_iter(runner, 0, outputs=dict(loss=torch.tensor(1.0)))


def test_a_loss_not_finite_on_another_rank_is_named_and_logged(monkeypatch, caplog):
    """Every rank stops; the message names the rank whose loss was not finite
    (it said 'another rank'), and the work dir's log gets it, where the
    traceback goes to stderr only."""
    from convneur_mm.engine import finite_check
    monkeypatch.setattr(finite_check, 'is_distributed', lambda: True)
    monkeypatch.setattr(finite_check, 'all_gather',  # ranks 0 (this one), 1 and 2
                        lambda flags: [flags, torch.tensor([1.0, 0.0]), flags.clone()])
    runner = type('Runner', (), dict(iter=6, epoch=0, optim_wrapper=None))()
    hook = NonFiniteStopHook()
    hook._runner, hook._params = runner, []
    logged = []
    monkeypatch.setattr(finite_check, 'print_log',
                        lambda message, **kwargs: logged.append((message, kwargs['level'])))
    with pytest.raises(NonFiniteTrainingError, match='a loss term on rank 1;'):
        hook.after_train_iter(runner, 0, outputs=dict(loss=torch.tensor(1.0)))
    assert logged and 'a loss term on rank 1' in logged[0][0] and logged[0][1] == 40


def test_a_diverging_two_process_launch_exits_non_zero_naming_the_group(ade20k_tiny, tmp_path):
    """The S-FPN demo through tools/dist_train.sh (2 gloo processes), its loss
    weighted by NaN: both ranks stop at iteration 1, the launcher fails."""
    work_dir = tmp_path / 'work'
    train = subprocess.run(
        [osp.join(TOOLS, 'dist_train.sh'), DEMO_ADE20K, '2', '--work-dir', str(work_dir),
         '--cfg-options', 'model.backbone.memory_cfg.chunk_size=256',
         'model.decode_head.loss_decode.loss_weight=nan',
         'train_dataloader.batch_size=1', 'train_cfg.max_iters=2', 'train_cfg.val_begin=3'],
        cwd=REPO, env=_run_env(ade20k_tiny), capture_output=True, text=True, timeout=300)
    log = train.stdout + train.stderr
    assert train.returncode != 0, log[-3000:]
    assert re.search(r"NonFiniteTrainingError: non-finite training at iteration 1\b", log), \
        log[-3000:]
    assert "first non-finite gradient in group 'backbone.stem'" in log
    assert 'decode_head' in log and 'loss_ce=nan' in log
    assert not list(work_dir.glob('*.pth'))
