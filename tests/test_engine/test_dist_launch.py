"""The launch scripts: tools/dist_train.sh and tools/slurm_test.sh
start real 2-process gloo runs on this CPU-only machine, and all four scripts
build the command lines of MMDetection's conventions from NNODES, NODE_RANK,
MASTER_ADDR, PORT, GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS and PYTHON.

Slurm is not installed here: a stand-in ``srun`` starts the ``--ntasks`` tasks
on this machine with the SLURM_* variables a real one sets, and a stand-in
``scontrol`` names this machine as the first node, so the tasks go through
``--launcher slurm`` exactly as on a cluster.
"""
import os
import os.path as osp
import re
import shutil
import stat
import subprocess
import sys

import pytest

from convneur_mm.demo_data.ade20k import generate_ade20k_tiny
from .dist_utils import free_port
from ..paths import REPO

TOOLS = osp.join(REPO, 'tools')
DEMO = osp.join(REPO, 'configs', 'demo', 'fpn_convneur_m2_ade20k_tiny.py')

FAKE_SRUN = r'''#!/usr/bin/env bash
# srun stand-in: logs its options, then runs the command as --ntasks local tasks
ntasks=1
while [[ $# -gt 0 && $1 == -* ]]; do
    if [[ $1 == -p ]]; then echo "-p $2" >> "$SRUN_LOG"; shift 2; continue; fi
    echo "$1" >> "$SRUN_LOG"
    [[ $1 == --ntasks=* ]] && ntasks=${1#--ntasks=}
    shift
done
echo "command: $*" >> "$SRUN_LOG"
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks SLURM_NODELIST=node[01] "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
'''
FAKE_SCONTROL = '#!/bin/sh\necho 127.0.0.1\n'  # `scontrol show hostname node[01]`
ECHO = '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n'  # one argument per line


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    _script(bin_dir / 'srun', FAKE_SRUN)
    _script(bin_dir / 'scontrol', FAKE_SCONTROL)
    return dict(PATH=f'{bin_dir}:{os.environ["PATH"]}', SRUN_LOG=str(tmp_path / 'srun.log'))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('MASTER_ADDR', 'MASTER_PORT', 'PORT', 'NNODES', 'NODE_RANK', 'GPUS',
                        'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS', 'GRES', 'RANK',
                        'WORLD_SIZE', 'LOCAL_RANK') and not k.startswith('SLURM_')}
    env.update(extra)
    return env


# ------------------------------------------------------------ real runs
@pytest.fixture(scope='module')
def ade20k_tiny(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('ade20k_tiny'))
    generate_ade20k_tiny(root, num_train=4, num_val=2)
    return root


def _run_env(data_root, **extra):
    return _clean_env(ADE20K_TINY_ROOT=data_root, OMP_NUM_THREADS='1', PYTHON=sys.executable,
                      PORT=str(free_port()), **extra)


def test_dist_train_with_two_gloo_processes(ade20k_tiny, tmp_path):
    """S-FPN demo, 2 processes x 1 image, 2 iterations. Memory chunks of 256
    tokens: on the 128x128 crops stage 1 (32x32 tokens) writes 3 times and
    stages 2-4 hold a single chunk each, so DDP (find_unused_parameters=False)
    sees parameters with zero gradients (the memory's zero-tie); the second
    iteration would fail if any went unused in the first."""
    work_dir = tmp_path / 'work'
    train = subprocess.run(
        [osp.join(TOOLS, 'dist_train.sh'), DEMO, '2', '--work-dir', str(work_dir),
         '--cfg-options', 'model.backbone.memory_cfg.chunk_size=256',
         'train_dataloader.batch_size=1', 'train_cfg.max_iters=2', 'train_cfg.val_begin=3',
         'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1'],
        cwd=REPO, env=_run_env(ade20k_tiny), capture_output=True, text=True, timeout=300)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-4000:]
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert re.search(r'Iter\(train\) \[2/2\]', log), log[-2000:]
    assert (work_dir / 'iter_2.pth').is_file()


@pytest.mark.slow
def test_slurm_test_with_two_tasks(ade20k_tiny, tmp_path, fake_slurm):
    """tools/slurm_test.sh on a CPU partition (GRES empty): 2 tasks, one gloo
    process group through ``--launcher slurm``, one metrics table."""
    from mmengine.runner import save_checkpoint
    from convneur_mm.apis.launch import load_config
    from convneur_mm.apis.toolbox import build_model
    checkpoint = str(tmp_path / 'init.pth')
    save_checkpoint(dict(meta={}, state_dict=build_model(load_config(DEMO)).state_dict()),
                    checkpoint)
    test = subprocess.run(
        [osp.join(TOOLS, 'slurm_test.sh'), 'cpu', 'test-job', DEMO, checkpoint,
         '--work-dir', str(tmp_path / 'test'), '--cfg-options',
         'test_dataloader.dataset.indices=2'],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=_run_env(ade20k_tiny, **fake_slurm, GPUS='2', GPUS_PER_NODE='2',
                     CPUS_PER_TASK='1', GRES=''))
    log = test.stdout + test.stderr
    assert test.returncode == 0, log[-4000:]
    assert 'Distributed launcher: slurm' in log and 'Distributed training: True' in log
    assert re.search(r'^\| mIoU \| [\d.]+ \|$', test.stdout, re.M), test.stdout[-2000:]
    assert len(re.findall(r'^\| mIoU', test.stdout, re.M)) == 1  # printed by rank 0 only
    options = open(fake_slurm['SRUN_LOG']).read().splitlines()
    assert '--ntasks=2' in options and '--ntasks-per-node=2' in options
    assert not any(o.startswith('--gres') for o in options)  # GRES='': a CPU partition


# ------------------------------------------------------- command lines
def _lines(text):
    return [line for line in text.splitlines() if line]


def test_dist_scripts_pass_the_multi_node_variables_to_torchrun(tmp_path):
    fake_python = _script(tmp_path / 'python', ECHO)
    env = _clean_env(PYTHON=fake_python, NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1',
                     PORT='29512')
    train = subprocess.run([osp.join(TOOLS, 'dist_train.sh'), 'cfg.py', '4', '--amp',
                            '--cfg-options', 'a=1'], env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert _lines(train.stdout) == [
        '-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
        '--master_addr=10.0.0.1', '--nproc_per_node=4', '--master_port=29512',
        osp.join(TOOLS, 'train.py'), 'cfg.py', '--launcher', 'pytorch', '--amp',
        '--cfg-options', 'a=1']
    test = subprocess.run([osp.join(TOOLS, 'dist_test.sh'), 'cfg.py', 'ckpt.pth', '2'],
                          env=_clean_env(PYTHON=fake_python), capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    assert _lines(test.stdout) == [  # single-node defaults
        '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
        '--master_addr=127.0.0.1', '--nproc_per_node=2', '--master_port=29500',
        osp.join(TOOLS, 'test.py'), 'cfg.py', 'ckpt.pth', '--launcher', 'pytorch']
    usage = subprocess.run([osp.join(TOOLS, 'dist_train.sh'), 'cfg.py'], env=env,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and 'usage:' in usage.stderr


def test_an_exported_master_port_is_taken_where_port_is_not_set(tmp_path):
    fake_python = _script(tmp_path / 'python', ECHO)
    for extra, port in (({'MASTER_PORT': '29600'}, '29600'),
                        ({'MASTER_PORT': '29600', 'PORT': '29512'}, '29512')):
        run = subprocess.run([osp.join(TOOLS, 'dist_train.sh'), 'cfg.py', '2'],
                             env=_clean_env(PYTHON=fake_python, **extra), capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        assert f'--master_port={port}' in _lines(run.stdout)


def test_slurm_scripts_build_mmdetection_srun_lines(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = _script(bin_dir / 'srun', '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n'
                                     'echo "MASTER_PORT=$MASTER_PORT"\n')
    assert osp.isfile(srun)
    env = _clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}', PYTHON='python3', GPUS='16',
                     GPUS_PER_NODE='8', CPUS_PER_TASK='4', SRUN_ARGS='--quotatype=auto -x n1',
                     PORT='29777')
    train = subprocess.run([osp.join(TOOLS, 'slurm_train.sh'), 'gpu', 'job', 'cfg.py', 'wd',
                            '--resume'], env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    assert _lines(train.stdout) == [
        '-p', 'gpu', '--job-name=job', '--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8',
        '--cpus-per-task=4', '--kill-on-bad-exit=1', '--quotatype=auto', '-x', 'n1',
        'python3', '-u', osp.join(TOOLS, 'train.py'), 'cfg.py', '--work-dir=wd',
        '--launcher=slurm', '--resume', 'MASTER_PORT=29777']
    test = subprocess.run([osp.join(TOOLS, 'slurm_test.sh'), 'cpu', 'job', 'cfg.py', 'c.pth'],
                          env=_clean_env(PATH=env['PATH']), capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    venv_python = osp.join(REPO, '.venv', 'bin', 'python')
    assert _lines(test.stdout) == [  # defaults: 8 GPUs on one node, 5 CPUs each
        '-p', 'cpu', '--job-name=job', '--gres=gpu:8', '--ntasks=8', '--ntasks-per-node=8',
        '--cpus-per-task=5', '--kill-on-bad-exit=1',
        venv_python if os.access(venv_python, os.X_OK) else 'python', '-u',
        osp.join(TOOLS, 'test.py'), 'cfg.py', 'c.pth', '--launcher=slurm', 'MASTER_PORT=']


# the interpreter that ran, then the cuBLAS workspace it saw
WHO = '#!/bin/sh\necho "$0"\necho "CUBLAS=${CUBLAS_WORKSPACE_CONFIG:-unset}"\n'


@pytest.mark.parametrize('script', ['dist_train.sh', 'slurm_train.sh'])
def test_scripts_default_to_the_project_venv(tmp_path, script):
    """No need to activate .venv: the scripts use it when it exists; PYTHON
    wins; without either, `python` from PATH. --deterministic exports the
    cuBLAS workspace to every process they start."""
    repo = tmp_path / 'repo'
    (repo / 'tools').mkdir(parents=True)
    for name in (script, 'launch_env.sh'):
        shutil.copy(osp.join(TOOLS, name), repo / 'tools' / name)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    path_python = _script(bin_dir / 'python', WHO)
    _script(bin_dir / 'srun', '#!/bin/bash\nwhile [[ $1 == -* ]]; do [[ $1 == -p ]] && shift; '
                              'shift; done\nexec "$@"\n')  # runs the task's command
    args = ['cfg.py', '2'] if script == 'dist_train.sh' else ['p', 'j', 'cfg.py', 'wd']
    run_script = [str(repo / 'tools' / script), *args, '--deterministic']
    env = _clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}')
    env.pop('PYTHON', None)
    env.pop('CUBLAS_WORKSPACE_CONFIG', None)

    def who(**extra):
        out = subprocess.run(run_script, env=dict(env, **extra), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return _lines(out.stdout)

    assert who() == [path_python, 'CUBLAS=:4096:8']
    (repo / '.venv' / 'bin').mkdir(parents=True)
    venv_python = _script(repo / '.venv' / 'bin' / 'python', WHO)
    assert who() == [venv_python, 'CUBLAS=:4096:8']
    other = _script(tmp_path / 'other-python', WHO)
    assert who(PYTHON=other, CUBLAS_WORKSPACE_CONFIG=':16:8') == [other, 'CUBLAS=:16:8']
