"""DDP without find_unused_parameters when some stages hold a single chunk."""
import torch

from convneur_mm.models import ConvNeur
from .dist_utils import ddp_sgd_steps, run_distributed

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], memory_dim=8)


def _train_two_steps(rank, world_size):
    torch.manual_seed(0)
    model = ConvNeur(arch=TINY, memory_cfg=dict(chunk_size=64), out_indices=(0, 1, 2, 3),
                     gap_before_final_norm=False)
    model.init_weights()
    # stage 1 has several chunks, stages 2-4 one each; ranks see different sizes
    return ddp_sgd_steps(model, rank, (64, 64) if rank == 0 else (96, 64))


def test_two_process_ddp_steps_with_single_chunk_stages():
    rank0, rank1 = run_distributed(_train_two_steps, 2)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], msg=key)
