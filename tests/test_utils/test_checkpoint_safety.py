"""Weights-only loading: Runner checkpoints resume, code-carrying pickles do not."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint
from mmengine.model import BaseModel
from torch import nn

from convneur_mm.utils.checkpoint_safety import CorruptCheckpointError, UnsafeCheckpointError


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='loss'):
        out = self.linear(inputs).squeeze(1)  # default_collate stacked the batch
        return dict(loss=(out - labels).square().mean())


class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([i, 1.0]), labels=torch.tensor(i * 0.5))


def _runner(work_dir, max_iters, resume=False):
    from mmengine.dataset import default_collate
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler'),
                              batch_size=2, collate_fn=default_collate),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2,
                                           by_epoch=False)),
        resume=resume, default_scope='mmengine')


def test_runner_checkpoint_resumes(tmp_path):
    _runner(tmp_path, max_iters=2).train()
    ckpt = tmp_path / 'iter_2.pth'
    assert ckpt.is_file()
    resumed = _runner(tmp_path, max_iters=4, resume=True)
    resumed.train()
    assert resumed.iter == 4
    from mmengine.logging import HistoryBuffer
    scalars = _load_checkpoint(str(ckpt))['message_hub']['log_scalars']
    assert isinstance(scalars['train/loss'], HistoryBuffer)
    assert scalars['train/loss'].statistics('mean') == pytest.approx(
        scalars['train/loss'].data[0].mean())


def test_allow_list_is_what_makes_runner_checkpoints_load(tmp_path):
    _runner(tmp_path, max_iters=2).train()
    # plain torch >= 2.6 (weights_only=True) refuses MMEngine's HistoryBuffer
    code = ('import torch, sys; torch.load(sys.argv[1])')
    result = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'iter_2.pth')],
                            capture_output=True, text=True)
    assert result.returncode != 0 and 'HistoryBuffer' in result.stderr


PLAIN_MMENGINE_CHECKPOINT = """
import sys, torch
from mmengine.logging import MessageHub
hub = MessageHub.get_instance('plain')
hub.update_scalar('train/loss', 1.5)
torch.save(dict(state_dict={'w': torch.zeros(2)}, message_hub=hub.state_dict()), sys.argv[1])
"""


def test_a_runner_checkpoint_written_without_convneur_mm_loads(tmp_path):
    """Its statistics table pickles as getattr(HistoryBuffer, 'min'): that
    getattr, and no other, is allowed."""
    path = tmp_path / 'plain.pth'
    subprocess.run([sys.executable, '-c', PLAIN_MMENGINE_CHECKPOINT, str(path)], check=True)
    scalars = _load_checkpoint(str(path))['message_hub']['log_scalars']
    assert scalars['train/loss'].statistics('mean') == 1.5
    from mmengine.logging import HistoryBuffer
    import collections
    # getattr(cls, name) of another method, or of another allowed class
    for other in ({'f': HistoryBuffer.update}, {'f': collections.OrderedDict.fromkeys}):
        torch.save(other, str(tmp_path / 'other.pth'))
        with pytest.raises(UnsafeCheckpointError, match='only HistoryBuffer.s statistics'):
            _load_checkpoint(str(tmp_path / 'other.pth'))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_malicious_pickle_is_refused_clearly(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': _Exploit(marker)}, str(path))
    with pytest.raises(UnsafeCheckpointError, match='Refusing to load .*evil.pth'):
        _load_checkpoint(str(path))
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)


def test_malicious_pickle_is_refused_on_resume(tmp_path):
    marker = tmp_path / 'pwned'
    work = tmp_path / 'work'
    work.mkdir()
    torch.save({'state_dict': {}, 'meta': _Exploit(marker)}, str(work / 'iter_2.pth'))
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    with pytest.raises(UnsafeCheckpointError):
        _runner(work, max_iters=4, resume=True).train()
    assert not marker.exists()


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'garbage', 'overwritten', 'legacy-cut'])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    """What a run killed while writing leaves, or a file that is no checkpoint:
    one error naming the file, instead of a KeyError, EOFError or miniz message."""
    whole = tmp_path / 'whole.pth'
    legacy = damage == 'legacy-cut'
    torch.save({'state_dict': nn.Linear(32, 32).state_dict(), 'meta': {'iter': 2}}, whole,
               _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    damaged = {'truncated': data[:len(data) // 2], 'empty': b'', 'garbage': b'not a checkpoint',
               'overwritten': data[:100] + b'x' * 200 + data[300:],
               'legacy-cut': data[:len(data) // 2]}[damage]
    path = tmp_path / 'iter_2.pth'
    path.write_bytes(damaged)
    with pytest.raises(CorruptCheckpointError, match=f'{path} is not a complete checkpoint'):
        _load_checkpoint(str(path))
    # the whole files, zip and legacy, load
    assert _load_checkpoint(str(whole))['meta'] == {'iter': 2}
