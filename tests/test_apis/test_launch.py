"""convneur_mm.apis.launch: what tools/train.py and test.py share."""
import os
import os.path as osp
import sys

import pytest
import torch.distributed as dist
from mmengine.config import Config

from convneur_mm.apis.exit import shutdown_distributed
from convneur_mm.apis.launch import (check_data_paths, load_config, set_local_rank,
                                       set_randomness)
from tests.paths import REPO, import_tool


def test_shutdown_destroys_the_process_group_once(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        shutdown_distributed()
        assert not dist.is_initialized()
        shutdown_distributed()  # nothing left to destroy: a no-op, not an error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_seed_alone_keeps_the_configs_deterministic_setting():
    cfg = Config(dict(randomness=dict(seed=1, deterministic=True)))
    set_randomness(cfg, seed=7)
    assert cfg.randomness == dict(seed=7, deterministic=True)
    set_randomness(cfg)
    assert cfg.randomness == dict(seed=7, deterministic=True)
    bare = Config(dict())
    set_randomness(bare, deterministic=True)
    assert bare.randomness == dict(seed=None, deterministic=True)  # a seed MMEngine draws
    set_randomness(bare, seed=3)
    assert bare.randomness == dict(deterministic=True, seed=3)


def test_local_rank_is_set_only_when_given(monkeypatch):
    """Slurm's and MPI's ranks keep their own local rank for the probe of
    ``check_cuda`` (a default of 0 sent every rank's probe to GPU 0)."""
    import torch
    from convneur_mm.utils import cuda_env
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.setenv('SLURM_LOCALID', '3')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    set_local_rank(None)  # tools/train.py and test.py without --local_rank
    assert 'LOCAL_RANK' not in os.environ
    assert cuda_env._probe_device() == torch.device('cuda', 3)
    set_local_rank(5)  # torch.distributed.launch's --local_rank
    assert os.environ['LOCAL_RANK'] == '5'


def test_an_mpi_launchs_local_rank_becomes_local_rank(monkeypatch):
    """MMEngine's MPI set-up leaves LOCAL_RANK unset, which its DDP wrapper
    reads for the rank's GPU: Open MPI's local rank stands in, and never
    over a launcher's own."""
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.setenv('OMPI_COMM_WORLD_LOCAL_RANK', '2')
    set_local_rank(None)
    assert os.environ['LOCAL_RANK'] == '2'
    monkeypatch.setenv('LOCAL_RANK', '6')  # torchrun's
    set_local_rank(None)
    assert os.environ['LOCAL_RANK'] == '6'


def test_amp_dtype_without_amp_is_refused(monkeypatch, capsys):
    module = import_tool('train')
    monkeypatch.setattr(sys, 'argv', ['train.py', 'config.py', '--amp-dtype', 'bfloat16'])
    with pytest.raises(SystemExit) as stop:
        module.parse_args()
    assert stop.value.code == 2 and 'add --amp' in capsys.readouterr().err
    monkeypatch.setattr(sys, 'argv', ['train.py', 'config.py', '--amp', '--amp-dtype',
                                      'bfloat16'])
    assert module.parse_args().amp_dtype == 'bfloat16'


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_the_tools_local_rank_defaults_to_none(tool, monkeypatch):
    module = import_tool(tool)
    positional = {'train': ['config.py'], 'test': ['config.py', 'checkpoint.pth']}[tool]
    monkeypatch.setattr(sys, 'argv', [f'{tool}.py', *positional])
    assert module.parse_args().local_rank is None


@pytest.mark.parametrize('config, variable', [
    ('cls_convneur_m2_300e_in1k.py', 'IMAGENET_ROOT'),  # set in the M1 config it inherits
    ('upernet_convneur_m2_80k_ade20k.py', 'ADE20K_ROOT'),
    ('demo/cascade_rcnn_convneur_m3_coco_tiny.py', 'COCO_TINY_ROOT'),  # not its base's COCO_ROOT
])
def test_missing_data_names_the_configs_variable_and_split(config, variable, tmp_path):
    """The hint names the variable that sets this config's data root and the
    split that failed (it named COCO_ROOT and train_dataloader for any config)."""
    cfg = load_config(osp.join(REPO, 'configs', config),
                      {'test_dataloader.dataset.data_root': str(tmp_path / 'none')})
    with pytest.raises(FileNotFoundError) as error:
        check_data_paths(cfg, ['test_dataloader'])
    hint = str(error.value).splitlines()[-1]
    assert hint == (f'Point the config at your data: {variable}=/path/to/data/ or '
                    '--cfg-options test_dataloader.dataset.data_root=...')


def test_a_data_root_variable_used_twice_is_named_once(tmp_path):
    """A user's config that sets two splits' roots from one variable."""
    from convneur_mm.apis.launch import data_root_variables
    config = tmp_path / 'mine.py'
    config.write_text("train_root = '{{$MY_ROOT:data/}}train'\n"
                      "val_root = '{{$MY_ROOT:data/}}val'\nother = '{{$OTHER_ROOT:x}}'\n")
    assert data_root_variables(str(config)) == ['MY_ROOT', 'OTHER_ROOT']


def test_pytorch_launcher_outside_torchrun_is_a_clear_error(monkeypatch):
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    config = osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py')
    with pytest.raises(RuntimeError, match='--launcher pytorch runs under torchrun, which sets '
                       'RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT'):
        load_config(config, launcher='pytorch')
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT='29500').items():
        monkeypatch.setenv(name, value)
    assert load_config(config, launcher='pytorch').launcher == 'pytorch'


def test_one_loader_for_paths_shipped_names_and_toolbox_configs(tmp_path, monkeypatch):
    """What the tools' and the analysis library's loaders did, in one: a
    shipped config by name or by path, a toolbox's own ``scope::`` config,
    ``--cfg-options``, ``--work-dir`` and its default, a clear error."""
    monkeypatch.chdir(tmp_path)  # a shipped name resolves from any directory
    by_name = load_config('demo/cls_convneur_m1_imagenet_tiny.py',
                          {'train_cfg.max_epochs': 7})
    by_path = load_config(osp.join(REPO, 'configs', 'demo', 'cls_convneur_m1_imagenet_tiny.py'))
    assert osp.samefile(by_name.filename, by_path.filename)
    assert by_name.train_cfg.max_epochs == 7 != by_path.train_cfg.max_epochs
    assert by_name.work_dir == by_path.work_dir == './work_dirs/cls_convneur_m1_imagenet_tiny'
    assert by_name.launcher == 'none'
    assert load_config('cls_convneur_m1_300e_in1k.py', work_dir='out').work_dir == 'out'
    toolbox = load_config('mmpretrain::resnet/resnet18_8xb32_in1k.py')
    assert toolbox.model.backbone.type == 'ResNet' and toolbox.model.backbone.depth == 18
    assert toolbox.work_dir == './work_dirs/resnet18_8xb32_in1k'
    with pytest.raises(FileNotFoundError, match='no_such.py .neither a path nor a file under'):
        load_config('no_such.py')


def test_a_dataset_without_samples_says_what_to_check(tmp_path):
    """COCO's classes over annotations that name none of them: every image
    filtered out, and the error names the settings to check."""
    import mmdet.datasets  # noqa: F401  (registers CocoDataset)
    from mmdet.registry import DATASETS
    from mmengine.registry import DefaultScope

    from convneur_mm.apis.launch import empty_datasets_explained
    from convneur_mm.demo_data.coco import generate_coco_tiny
    generate_coco_tiny(str(tmp_path), num_train=2, num_val=2)
    dataset = dict(type='CocoDataset', data_root=str(tmp_path),
                   ann_file='annotations/instances_train2017.json',
                   data_prefix=dict(img='train2017/'), metainfo=dict(classes=('unicorn', )),
                   filter_cfg=dict(filter_empty_gt=True), pipeline=[])
    # the scope whose registry builds it, whatever an earlier test in this process left
    with pytest.raises(ValueError, match='holds no sample: check its data_root') as error:
        with empty_datasets_explained(), DefaultScope.overwrite_default_scope('mmdet'):
            DATASETS.build(dataset)
    assert 'need at least one array' in str(error.value)
    for elsewhere in ('other', 'need at least one array to concatenate'):  # not a dataset's
        with pytest.raises(ValueError, match=f'^{elsewhere}$'):
            with empty_datasets_explained():
                raise ValueError(elsewhere)
