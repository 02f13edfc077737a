"""Run a function in N gloo processes on this machine (or N NCCL processes,
one GPU each, in GPU tests)."""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, backend):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if backend == 'nccl':  # one GPU per process, as MMEngine's init_dist sets it
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


# gloo's processes fork from one server per test process that has imported
# these once: a spawned process spent 7 to 9 s of a CPU importing them
FORKSERVER_PRELOAD = ['torch', 'torch.distributed', 'mmengine.runner', 'convneur_mm.models',
                      __name__]


def _start_method(backend: str) -> str:
    if backend == 'nccl':  # CUDA processes start clean
        return 'spawn'
    mp.get_context('forkserver').set_forkserver_preload(FORKSERVER_PRELOAD)
    return 'forkserver'


def run_distributed(fn, world_size: int = 2, *args, backend: str = 'gloo'):
    """``fn(rank, world_size, *args)`` in each process; returns their results.
    ``backend='nccl'``: one GPU per process (GPU tests)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir, backend),
                           nprocs=world_size, join=True, start_method=_start_method(backend))
        return [torch.load(os.path.join(out_dir, f'{r}.pt'), weights_only=False)
                for r in range(world_size)]


def ddp_sgd_steps(model: torch.nn.Module, rank: int, size: tuple, steps: int = 2) -> dict:
    """``steps`` SGD steps of ``model`` under DDP without
    find_unused_parameters (DDP raises if a parameter gets no gradient), on
    random (2, 3, *size) inputs seeded by rank; returns the state dict."""
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model, device_ids=None, find_unused_parameters=False)
    optim = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(rank)
    for _ in range(steps):
        outs = ddp(torch.randn(2, 3, *size))
        optim.zero_grad()
        sum(o.square().mean() for o in outs).backward()
        optim.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
