"""convneur_mm.engine.launch: the distributed shut-down of tools/train.py and test.py."""
import torch.distributed as dist

from convneur_mm.engine.launch import shutdown_distributed


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
