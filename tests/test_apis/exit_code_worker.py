"""A 2-rank gloo program shaped like the end of ``tools/test.py``, started by
torchrun from ``test_exit_codes.py``: a DDP-wrapped model (which keeps the
gloo group and its worker threads alive past ``destroy_process_group``, as the
runner's model does), the metrics broadcast of MMEngine's Evaluator, the
table printed by rank 0, then the tool's ending.

    torchrun --nproc_per_node=2 exit_code_worker.py ENDING [--fail F]

ENDING  ``exit_successfully`` (the tools' ending) or ``shutdown_only`` (the
        ending before ``exit_successfully``: destroy the group and return).
--fail  how a run fails before its work is done: ``exception`` on rank 1,
        ``abort`` (rank 1 dies of SIGABRT), ``peer-dies`` (rank 1 leaves
        while rank 0 waits for it in a collective), or ``late`` (rank 1 raises
        after rank 0 has printed the metrics, before the group is destroyed).
"""
import argparse
import importlib.util
import os
import signal

import torch
import torch.distributed as dist


def _load_exit_module():
    """convneur_mm/apis/exit.py by its path: importing the package would
    import MMEngine, seconds of CPU per rank for nothing used here."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                        'convneur_mm', 'apis', 'exit.py')
    spec = importlib.util.spec_from_file_location('convneur_exit', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exit_successfully = _load_exit_module().exit_successfully


def fail(how: str, rank: int) -> None:
    if how == 'peer-dies':
        if rank == 1:
            os._exit(0)  # leaves quietly: only rank 0's failed collective reports it
        dist.all_reduce(torch.ones(1))
    elif rank == 1:
        if how == 'exception':
            raise RuntimeError('a failure inside the run')
        os.kill(os.getpid(), signal.SIGABRT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('ending', choices=['exit_successfully', 'shutdown_only'])
    parser.add_argument('--fail', choices=['exception', 'abort', 'peer-dies', 'late'])
    args = parser.parse_args()
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model.cycle = [model]  # like MMEngine's runner: freed by the garbage collector
    model(torch.randn(3, 4)).sum().backward()
    if args.fail and args.fail != 'late':
        fail(args.fail, rank)
    metrics = [{'mIoU': 88.0} if rank == 0 else None]
    dist.broadcast_object_list(metrics, src=0)  # the Evaluator's last collective
    if rank == 0:
        print(f'metrics: {metrics[0]}', flush=True)
    if args.fail == 'late' and rank == 1:
        raise RuntimeError('a failure after the metrics, before the end')
    if args.ending == 'exit_successfully':
        exit_successfully()
    else:
        dist.destroy_process_group()  # the tools' ending before exit_successfully


if __name__ == '__main__':
    main()
