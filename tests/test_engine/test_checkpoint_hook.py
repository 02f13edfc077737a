"""A run that dies while writing a checkpoint keeps a whole one to resume
from: ConvNeurRunner writes under a temporary name and renames, and
SafeCheckpointHook removes old checkpoints only after the new one is written
(MMEngine's Runner and CheckpointHook, the controls, lose it); old
checkpoints are still removed after each save."""
import os.path as osp
import time

import pytest
import torch
from mmengine.dataset import default_collate
from mmengine.evaluator import BaseMetric
from mmengine.hooks import CheckpointHook
from mmengine.runner import Runner

from convneur_mm.engine.checkpoint_hook import SafeCheckpointHook
from convneur_mm.apis.launch import build_runner, load_config
from convneur_mm.engine.runner import ConvNeurRunner
from convneur_mm.utils.checkpoint_safety import CorruptCheckpointError
from ..paths import REPO
from .test_resume import NoisyData, NoisyModel


class ToyModel(NoisyModel):
    def forward(self, inputs, labels=None, mode='loss'):
        loss = super().forward(inputs, labels)
        return loss if mode == 'loss' else [loss['loss']]


class RisingScore(BaseMetric):
    """Every evaluation is a new best: each one replaces the best checkpoint."""
    default_prefix = 'toy'

    def __init__(self):
        super().__init__()
        self.evaluations = 0

    def process(self, data_batch, data_samples):
        self.results.append(0)

    def compute_metrics(self, results):
        self.evaluations += 1
        return dict(score=float(self.evaluations))


def _dies_writing(monkeypatch, nth: int, prefix: str) -> None:
    """The ``nth`` checkpoint file named ``prefix...`` that MMEngine writes
    gets its first bytes, then the write raises: a run killed while writing
    (the file is opened and written in place, as MMEngine's LocalBackend does)."""
    import mmengine.runner.runner as mmengine_runner
    save = mmengine_runner.save_checkpoint
    saves = []

    def dies_writing(checkpoint, filename, *args, **kwargs):
        if osp.basename(filename).startswith(prefix):
            saves.append(filename)
            if len(saves) == nth:
                with open(filename, 'wb') as f:
                    f.write(b'PK\x03\x04 the first bytes of a zip archive')
                raise RuntimeError('killed while writing a checkpoint')
        save(checkpoint, filename, *args, **kwargs)

    monkeypatch.setattr(mmengine_runner, 'save_checkpoint', dies_writing)


def _toy_run(runner_cls, work_dir, resume=False, **checkpoint):
    data = dict(dataset=NoisyData(), batch_size=2, collate_fn=default_collate,
                sampler=dict(type='InfiniteSampler', shuffle=True))
    runner = runner_cls(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=f'run_{time.time()}',
        train_dataloader=data, optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=18, val_interval=3),
        val_dataloader={**data, 'sampler': dict(type='DefaultSampler', shuffle=False)},
        val_cfg=dict(), val_evaluator=[RisingScore()],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False,
                                           **checkpoint)),
        randomness=dict(seed=0), resume=resume, default_scope='mmengine')
    runner.train()
    return runner


def _files(work_dir):
    return sorted(osp.basename(p) for p in map(str, work_dir.glob('*.pth')))


def _last_checkpoint(work_dir):
    return osp.basename((work_dir / 'last_checkpoint').read_text().strip())


def _resumes_to_the_end(work_dir, **checkpoint):
    assert _toy_run(ConvNeurRunner, work_dir, resume=True, **checkpoint).iter == 18


@pytest.mark.parametrize('runner_cls,kept', [(ConvNeurRunner, True), (Runner, False)],
                         ids=['ours', 'mmengine'])
def test_dying_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch, runner_cls, kept):
    """max_keep_ckpts=1, killed while writing the second checkpoint."""
    _dies_writing(monkeypatch, 2, 'iter_')
    with pytest.raises(RuntimeError, match='killed while writing'):
        _toy_run(runner_cls, tmp_path, max_keep_ckpts=1)
    assert _last_checkpoint(tmp_path) == 'iter_3.pth'
    assert osp.isfile(tmp_path / 'iter_3.pth') == kept
    if not kept:  # MMEngine removed it before writing iter_6.pth
        return
    assert not osp.exists(tmp_path / 'iter_6.pth')  # only its .part was begun
    assert torch.load(tmp_path / 'iter_3.pth', weights_only=False)['meta']['iter'] == 3
    monkeypatch.undo()
    _resumes_to_the_end(tmp_path, max_keep_ckpts=1)
    assert _files(tmp_path) == ['iter_18.pth']


@pytest.mark.parametrize('runner_cls,whole', [(ConvNeurRunner, True), (Runner, False)],
                         ids=['ours', 'mmengine'])
def test_dying_while_rewriting_a_checkpoint_in_place(tmp_path, monkeypatch, runner_cls, whole):
    """After a new best MMEngine saves ``iter_6.pth`` again, the file that
    last_checkpoint names: killed during that second write."""
    _dies_writing(monkeypatch, 4, 'iter_')  # iter_3, iter_3 again, iter_6, iter_6 again
    with pytest.raises(RuntimeError, match='killed while writing'):
        _toy_run(runner_cls, tmp_path, max_keep_ckpts=1, save_best='toy/score',
                 rule='greater')
    assert _last_checkpoint(tmp_path) == 'iter_6.pth'
    monkeypatch.undo()
    if not whole:
        with pytest.raises(CorruptCheckpointError):  # the resume point is gone
            _toy_run(ConvNeurRunner, tmp_path, resume=True)
        return
    assert torch.load(tmp_path / 'iter_6.pth', weights_only=False)['meta']['iter'] == 6
    _resumes_to_the_end(tmp_path, max_keep_ckpts=1, save_best='toy/score', rule='greater')


@pytest.mark.parametrize('runner_cls,kept', [(ConvNeurRunner, True), (Runner, False)],
                         ids=['ours', 'mmengine'])
def test_dying_while_writing_the_best_keeps_the_previous_best(tmp_path, monkeypatch, runner_cls,
                                                              kept):
    _dies_writing(monkeypatch, 2, 'best_')
    with pytest.raises(RuntimeError, match='killed while writing'):
        _toy_run(runner_cls, tmp_path, save_best='toy/score', rule='greater')
    assert osp.isfile(tmp_path / 'best_toy_score_iter_3.pth') == kept


def test_old_checkpoints_are_removed_after_each_save(tmp_path):
    runner = _toy_run(ConvNeurRunner, tmp_path, max_keep_ckpts=2, save_best='toy/score',
                      rule='greater')
    assert SafeCheckpointHook in [type(h) for h in runner._hooks]
    assert _files(tmp_path) == ['best_toy_score_iter_18.pth', 'iter_15.pth', 'iter_18.pth']
    assert _last_checkpoint(tmp_path) == 'iter_18.pth'


@pytest.mark.parametrize('config', ['cascade_rcnn_convneur_m3_coco_tiny.py',
                                    'fpn_convneur_m2_ade20k_tiny.py',
                                    'cls_convneur_m1_imagenet_tiny.py'])
def test_every_toolbox_config_gets_it(tmp_path, config):
    """Their CheckpointHook is named in mmdet's, mmseg's, mmpretrain's scope."""
    cfg = load_config(osp.join(REPO, 'configs', 'demo', config))
    cfg.work_dir = str(tmp_path)
    hooks = [type(h) for h in build_runner(cfg)._hooks]
    assert SafeCheckpointHook in hooks and CheckpointHook not in hooks


def test_a_new_run_removes_what_a_killed_write_left(tmp_path, monkeypatch):
    _dies_writing(monkeypatch, 2, 'iter_')
    with pytest.raises(RuntimeError, match='killed while writing'):
        _toy_run(ConvNeurRunner, tmp_path, max_keep_ckpts=1)
    assert osp.isfile(tmp_path / 'iter_6.pth.part')
    monkeypatch.undo()
    _resumes_to_the_end(tmp_path, max_keep_ckpts=1)
    assert not list(tmp_path.glob('*.part'))


def test_an_empty_last_checkpoint_is_a_clear_error(tmp_path):
    """What a kill while MMEngine rewrites last_checkpoint (in place) leaves."""
    (tmp_path / 'last_checkpoint').write_text('')
    with pytest.raises(FileNotFoundError, match='last_checkpoint names no checkpoint'):
        _toy_run(ConvNeurRunner, tmp_path, resume=True)


def test_replace_durably_renames_the_whole_file(tmp_path):
    from convneur_mm.engine.checkpoint_hook import replace_durably
    (tmp_path / 'a.part').write_bytes(b'whole')
    (tmp_path / 'a').write_bytes(b'old')
    replace_durably(str(tmp_path / 'a.part'), str(tmp_path / 'a'))
    assert (tmp_path / 'a').read_bytes() == b'whole' and not (tmp_path / 'a.part').exists()
