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


def run_distributed(fn, world_size: int = 2, *args, backend: str = 'gloo'):
    """``fn(rank, world_size, *args)`` in each process; returns their results.
    ``backend='nccl'``: one GPU per process (GPU tests)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir, backend),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f'{r}.pt'), weights_only=False)
                for r in range(world_size)]
