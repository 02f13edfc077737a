"""convneur_mm.engine.launch: what tools/train.py and test.py share."""
import torch.distributed as dist
from mmengine.config import Config

from convneur_mm.engine.exit import shutdown_distributed
from convneur_mm.engine.launch import set_randomness


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
