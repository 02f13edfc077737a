"""The package's one config loader (``load_config``, for every tool, the
analysis library and the tests), and what ``tools/train.py`` and
``tools/test.py`` share around the runner: their launch options, checks that
fail early with the offending path, AMP selection and the runner."""
import argparse
import contextlib
import logging
import os
import os.path as osp
import re
import traceback
import warnings
from typing import Iterable, Iterator, List, Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS

from convneur_mm.utils.config_metafiles import metafiles_read_once
from convneur_mm.utils.paths import config_dir, export_config_dir, is_remote

SPLITS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def load_config(config: str, cfg_options: Optional[dict] = None,
                launcher: str = 'none', work_dir: Optional[str] = None) -> Config:
    """The one config loader of the tools, the analysis library and the tests.

    Args:
        config: a config file's path; else a file name under the shipped
            configs (``cls_convneur_m3_300e_in1k.py``, ``demo/...``); or a
            toolbox's own config as ``mmpretrain::path/to/config.py``.
        cfg_options: ``--cfg-options`` overrides, merged last.
        launcher: ``--launcher``; ``pytorch`` outside torchrun is refused.
        work_dir: ``--work-dir``; else the config's, else
            ``./work_dirs/<config name>`` (MMDetection's default).

    Returns:
        The config, with ``launcher`` and ``work_dir`` set.
    """
    check_launcher(launcher)
    export_config_dir()  # lets `{{$CONVNEUR_CONFIGS:}}` bases resolve
    if '::' not in config:
        if not osp.isfile(config) and osp.isfile(osp.join(config_dir(), config)):
            config = osp.join(config_dir(), config)
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config} (neither a path nor '
                                    f'a file under the shipped configs, {config_dir()})')
    with metafiles_read_once():  # MMEngine parsed them again for each `mmdet::` base
        if '::' in config:
            from mmengine.hub import get_config
            cfg = get_config(config)
        else:
            cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        name = osp.splitext(osp.basename(config.split('::')[-1]))[0]
        cfg.work_dir = osp.join('./work_dirs', name)
    return cfg


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local_rank``, as tools/train.py
    and tools/test.py share them (``load_config`` and ``set_local_rank`` take
    their values)."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int)


TORCHRUN_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def check_launcher(launcher: str) -> None:
    """``--launcher pytorch`` outside torchrun: a clear error, not MMEngine's
    ``KeyError: 'RANK'`` from deep inside the runner."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if launcher == 'pytorch' and missing:
        raise RuntimeError(
            f'--launcher pytorch runs under torchrun, which sets {", ".join(missing)}: '
            'start it with tools/dist_train.sh / dist_test.sh CONFIG [CKPT] GPUS, or drop '
            '--launcher for one process')


def _datasets(dataset_cfg) -> Iterable[dict]:
    """The leaf dataset configs under wrappers such as RepeatDataset."""
    if dataset_cfg is None:
        return
    if 'datasets' in dataset_cfg:
        for sub in dataset_cfg['datasets']:
            yield from _datasets(sub)
    elif 'dataset' in dataset_cfg:
        yield from _datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _evaluators(evaluator_cfg) -> Iterable[dict]:
    if isinstance(evaluator_cfg, dict):
        yield evaluator_cfg
    elif isinstance(evaluator_cfg, (list, tuple)):
        for item in evaluator_cfg:
            yield from _evaluators(item)


def missing_data_paths(cfg: Config, splits: Iterable[str] = SPLITS) -> List[str]:
    """Data roots, annotation files and image folders named by the config that
    do not exist (checked before minutes of model building and worker start-up),
    including the split's evaluator's annotation file (COCO's). Remote paths
    are not checked."""
    missing = []
    for split in splits:
        loader = cfg.get(split)
        if not loader:
            continue
        evaluator = cfg.get(split.replace('_dataloader', '_evaluator'))
        for ev in _evaluators(evaluator):
            ann = ev.get('ann_file')
            if isinstance(ann, str) and not is_remote(ann) and not osp.isfile(ann):
                missing.append(f'{split}: the evaluator\'s ann_file {ann!r} does not exist')
        for ds in _datasets(loader.get('dataset')):
            root = ds.get('data_root') or ''
            if is_remote(root):
                continue
            if root and not osp.isdir(root):
                missing.append(f'{split}: data_root {root!r} does not exist')
                continue
            ann = ds.get('ann_file')
            if ann and not osp.isfile(osp.join(root, ann)):
                missing.append(f'{split}: ann_file {osp.join(root, ann)!r} does not exist')
            prefix = ds.get('data_prefix') or {}
            prefixes = [prefix] if isinstance(prefix, str) else list(prefix.values())
            for sub in prefixes:
                if isinstance(sub, str) and sub and not osp.isdir(osp.join(root, sub)):
                    missing.append(f'{split}: folder {osp.join(root, sub)!r} does not exist')
    return missing


def check_data_paths(cfg: Config, splits: Iterable[str] = SPLITS) -> None:
    missing = missing_data_paths(cfg, splits)
    if missing:
        split = missing[0].split(':')[0]
        ways = [f'{name}=/path/to/data/' for name in data_root_variables(cfg.filename)]
        ways.append(f'--cfg-options {split}.dataset.data_root=...')
        raise FileNotFoundError(
            'the dataset named by the config is not there:\n  ' + '\n  '.join(missing) +
            f'\nPoint the config at your data: {" or ".join(ways)}')


# what MMEngine's dataset raises where it holds no sample (numpy, concatenating none)
_EMPTY_DATASET = 'need at least one array to concatenate'


@contextlib.contextmanager
def empty_datasets_explained() -> Iterator[None]:
    """A run's datasets are built inside: one that holds no sample stops
    with what to check, not numpy's words about concatenating."""
    try:
        yield
    except ValueError as error:
        frames = traceback.extract_tb(error.__traceback__)
        if _EMPTY_DATASET not in str(error) or not any(
                frame.name == '_serialize_data' for frame in frames):
            raise  # numpy's words from elsewhere (an evaluator's) are no empty dataset
        raise ValueError(
            'a dataset of the config holds no sample: check its data_root, ann_file and '
            'data_prefix (or img_suffix), and that its metainfo classes name the '
            "annotations' categories (filter_cfg=dict(filter_empty_gt=True) drops every "
            f'image without one). MMEngine said: {error}') from error


_VARIABLE = re.compile(r'\{\{\s*\$(\w+)\s*(?::([^}]*))?\}\}')


def data_root_variables(filename: Optional[str]) -> List[str]:
    """The environment variables that set data roots (``{{$COCO_ROOT:...}}``)
    in a config file, else in the nearest local files it inherits from (a
    file's own roots override its bases')."""
    seen, level = set(), [filename] if filename else []
    while level:
        names, bases = [], []
        for path in level:
            if path in seen or not osp.isfile(path):
                continue
            seen.add(path)
            with open(path) as f:
                names += [name for name, _ in _VARIABLE.findall(f.read())
                          if name.endswith('_ROOT')]
            for base in Config._get_base_files(path):
                base = _VARIABLE.sub(lambda m: os.environ.get(m[1], m[2] or ''), base)
                if '::' not in base:
                    bases.append(osp.join(osp.dirname(path), base))
        if names:
            return list(dict.fromkeys(names))  # a variable used twice is named once
        level = bases
    return []


def enable_amp(cfg: Config, dtype: Optional[str] = None) -> None:
    """Mixed precision: MMEngine's AmpOptimWrapper on GPU, bf16 autocast on CPU.
    A config that has an AmpOptimWrapper keeps its dtype and loss scale but
    for ``dtype``, where given (as MMDetection's ``--amp`` keeps it)."""
    if torch.cuda.is_available():
        wrapper = cfg.optim_wrapper
        if wrapper.get('type') == 'AmpOptimWrapper':
            if dtype is not None:
                wrapper.dtype = dtype
            if wrapper.get('dtype', 'float16') in (None, 'float16'):
                wrapper.setdefault('loss_scale', 'dynamic')
            return
        wrapper.type = 'AmpOptimWrapper'
        wrapper.dtype = dtype or 'float16'
        if wrapper.dtype == 'float16':
            wrapper.loss_scale = 'dynamic'
    else:
        if dtype not in (None, 'bfloat16'):
            raise ValueError(f'--amp on the CPU supports bfloat16 only, got {dtype}')
        cfg.optim_wrapper.type = 'convneur_mm.CpuAmpOptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)


def set_randomness(cfg: Config, seed: Optional[int] = None, deterministic: bool = False) -> None:
    """``--seed`` / ``--deterministic``: each overrides the config only when given."""
    if seed is None and not deterministic:
        return
    cfg.setdefault('randomness', {})
    cfg.randomness.setdefault('seed', None)  # MMEngine's set_randomness requires one
    if seed is not None:
        cfg.randomness.seed = seed
    if deterministic:
        cfg.randomness.deterministic = True
        prepare_deterministic()


# torch's message for an op without a deterministic kernel, under warn_only
NONDETERMINISTIC_OP = r'.* does not have a deterministic implementation'


def prepare_deterministic() -> None:
    """What deterministic CUDA needs before CUDA starts. cuBLAS GEMMs are
    deterministic only with a fixed workspace: without CUBLAS_WORKSPACE_CONFIG
    the first Linear or bmm raises under ``use_deterministic_algorithms``. A
    value the user set is kept. Ops without a deterministic kernel warn once
    per op name (see ``build_runner``)."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    warnings.filterwarnings('once', message=NONDETERMINISTIC_OP, category=UserWarning)


# mmcv ops whose CUDA backward accumulates with atomicAdd without telling
# torch's deterministic mode (no alert: no warning, no error): RoIAlign's
# (``roi_align_backward_cuda_kernel``) in every RoI head of our detectors
SILENTLY_NONDETERMINISTIC = ('RoIAlign', )


def silently_nondeterministic_ops(node) -> List[str]:
    """The ``SILENTLY_NONDETERMINISTIC`` op types a (model) config uses, named
    as a string (``'RoIAlign'``, ``'mmcv.RoIAlign'``) or by the class."""
    if isinstance(node, dict):
        op = node.get('type')
        op = getattr(op, '__name__', str(op)).rsplit('.', 1)[-1] if op is not None else None
        found = [op] if op in SILENTLY_NONDETERMINISTIC else []
        children = node.values()
    elif isinstance(node, (list, tuple)):
        found, children = [], node
    else:
        return []
    found += [op for child in children for op in silently_nondeterministic_ops(child)]
    return sorted(set(found))


def warn_silent_nondeterminism(cfg: Config, cuda: bool) -> List[str]:
    """Deterministic mode cannot vouch for ops that never report to it: on
    CUDA, say which the model uses (a detector's training is then not
    bit-exact from run to run; on a CPU these kernels are serial and it is)."""
    ops = silently_nondeterministic_ops(cfg.get('model')) if cuda else []
    if ops:
        from mmengine.logging import print_log
        print_log(f'--deterministic: mmcv\'s {", ".join(ops)} backward accumulates with '
                  'atomicAdd on CUDA and does not report it to torch\'s deterministic mode: '
                  'training is not bit-exact from run to run (docs/user_guides/cuda.md)',
                  logger='current', level=logging.WARNING)
    return ops


def _deterministic(cfg: Config) -> bool:
    return bool((cfg.get('randomness') or {}).get('deterministic'))


def build_runner(cfg: Config, training: bool = True):
    """The config's runner, or ours (MMEngine's Runner plus CPU distributed).

    With ``randomness.deterministic`` MMEngine calls
    ``torch.use_deterministic_algorithms(True)``, under which the backward
    passes of bilinear ``interpolate`` (MMSeg's heads) and adaptive average
    pooling (UperNet's PPM) raise on CUDA: they have no deterministic kernel.
    Those ops warn instead (once per op name); everything else stays
    deterministic. (``ConvNeurRunner`` keeps it so when MMEngine sets the
    randomness again, as ``resume`` does for a checkpoint of another seed.)
    mmcv's RoIAlign never reports (``warn_silent_nondeterminism``, said where
    the runner will train: ``tools/test.py`` passes ``training=False``)."""
    cfg.setdefault('runner_type', 'convneur_mm.ConvNeurRunner')
    if _deterministic(cfg):
        prepare_deterministic()
    runner = RUNNERS.build(cfg)
    if _deterministic(cfg):
        torch.use_deterministic_algorithms(True, warn_only=True)
        if training:
            warn_silent_nondeterminism(cfg, cuda=torch.cuda.is_available())
    return runner


# where Open MPI puts a process's local rank (MMEngine's MPI set-up reads Open MPI's only)
MPI_LOCAL_RANKS = ('OMPI_COMM_WORLD_LOCAL_RANK', )


def set_local_rank(local_rank: Optional[int]) -> None:
    """``--local_rank`` (``torch.distributed.launch``) as ``LOCAL_RANK``, when
    given: a default of 0 would send Slurm's and MPI's ranks, whose local
    rank is in ``SLURM_LOCALID`` / ``OMPI_COMM_WORLD_LOCAL_RANK``, to GPU 0
    for ``check_cuda``'s probe. An Open MPI launch's local rank becomes
    ``LOCAL_RANK`` too: MMEngine's MPI set-up leaves it unset, and its DDP
    wrapper reads it for the rank's GPU."""
    if local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(local_rank))
    for name in MPI_LOCAL_RANKS:
        if name in os.environ:
            os.environ.setdefault('LOCAL_RANK', os.environ[name])
            break
