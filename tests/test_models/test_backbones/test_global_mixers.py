"""Every global-branch type of Table 5 in the backbone: any input size, every
parameter learns, batch independence, bf16 autocast, 2-process DDP without
find_unused_parameters, and the classification / detection / segmentation
configs."""
import pytest
import torch
from torch import nn

from convneur_mm.models import ConvNeur
from convneur_mm.models.layers.mixers import MIXERS
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model, dummy_batch
from convneur_mm.testing.errors import worst
from ...test_engine.dist_utils import ddp_sgd_steps, run_distributed
from ...devices import DEVICES, on_cuda
from .learning import dead_parameters

TINY = dict(depths=[1, 2, 1, 1], dims=[8, 16, 24, 32], memory_dim=8)
NEW = ['cbam', 'nonlocal', 'rwkv', 'titans']
# narrowed to the tiny width (C_m = 8), the structure is the default one: CBAM's
# MLP keeps 4 hidden units (1 at r = 16, a ReLU that can be dead for a batch)
MIXER_CFG = dict(cbam=dict(reduction=2), titans=dict(heads=2, head_dim=4))


def _tiny(mixer, **kwargs):
    torch.manual_seed(0)
    model = ConvNeur(arch=TINY, global_mixer=mixer, mixer_cfg=MIXER_CFG.get(mixer),
                     memory_cfg=dict(chunk_size=5), out_indices=(0, 1, 2, 3),
                     gap_before_final_norm=False, **kwargs)
    model.init_weights()
    return model


def _perturb(model):
    """Move every parameter off its init: zero-initialized outputs (Non-local's
    W_z, Titans' persistent tokens) would otherwise hide their inputs' gradients."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize('mixer', NEW)
@pytest.mark.parametrize('size', [(37, 53), (7, 3)])
def test_any_input_size(mixer, size):
    outs = _tiny(mixer)(torch.randn(1, 3, *size))
    for stage, out in enumerate(outs):
        stride = 4 * 2 ** stage
        assert out.shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('mixer', NEW)
def test_every_parameter_learns(mixer):
    # 128x128: stage 4 has 16 tokens, i.e. four memory chunks of 5 (Titans)
    model = _perturb(_tiny(mixer)).train()
    outs = model(torch.randn(2, 3, 128, 128))
    sum(o.square().mean() for o in outs).backward()
    assert dead_parameters(model) == []
    assert hasattr(model.stages[0][0].global_branch, MIXERS[mixer].attribute)


@pytest.mark.parametrize('mixer', NEW)
def test_outputs_do_not_depend_on_batch_mates(mixer):
    model = _perturb(_tiny(mixer)).eval()
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        batch = model(x)
        for i in range(3):
            for a, b in zip(batch, model(x[i:i + 1])):
                torch.testing.assert_close(a[i:i + 1], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mixer', NEW)
def test_bf16_autocast_trains_close_to_float32(mixer):
    model = _perturb(_tiny(mixer)).train()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    sum(o.float().square().mean() for o in outs).backward()
    # stage 0 runs in float32 after the stem, as CUDA's float32 LayerNorm
    # leaves it; the stages after a 16-bit downsampling conv in bfloat16
    assert [o.dtype for o in outs] == [torch.float32] + [torch.bfloat16] * (len(outs) - 1)
    for out, ref in zip(outs, reference):
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 0.05, err
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('mixer', list(MIXERS))
@pytest.mark.parametrize('dtype,tol', [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)],
                         ids=['half', 'bfloat16'])
@pytest.mark.parametrize('device', DEVICES)
def test_a_model_cast_to_16_bits_runs_and_trains(mixer, dtype, tol, device):
    """``model.half()`` / ``.bfloat16()`` without autocast (16-bit inference):
    the float32 pieces (stem conv, input projection, memory) keep float32
    weights and cast at their borders; the rest runs in the model's dtype.
    It crashed with a dtype mismatch in the stem before 2026-11-25."""
    model = _perturb(_tiny(mixer)).to(device)
    x = torch.randn(2, 3, 64, 48, device=device)
    with torch.no_grad():
        reference = model.eval()(x)
    model.to(dtype)
    with torch.no_grad():
        outs = model(x.to(dtype))
    for out, ref in zip(outs, reference):
        assert out.dtype == dtype
        err = (out.float() - ref).abs().max() / ref.abs().max()
        assert err < tol, err
    outs = model.train()(x.to(dtype))
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all(), name


FSDP_KINDS = ['fully_shard', 'fully_shard per layer', 'FSDP1', 'FSDP1 orig params',
              'FSDP1 per layer']
LAYERS = (nn.Linear, nn.Conv2d, nn.RMSNorm)  # units of their own, 'per layer'


def _sharded(model, kind, dtype, device):
    """``model`` under FSDP2 (``fully_shard``) or FSDP1 (MMEngine's
    ``MMFullyShardedDataParallel`` and ``FSDPStrategy``), 16-bit
    ``param_dtype``; 'per layer': every Linear, Conv2d and RMSNorm its own
    unit (as an auto-wrap policy makes them), handing over its 16-bit weights
    only when it is called, inside the float32 pieces' forward."""
    from torch.distributed import fsdp
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    if kind.startswith('fully_shard'):
        policy = fsdp.MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if kind.endswith('per layer'):
            for m in list(model.modules()):
                if isinstance(m, LAYERS) and any(True for _ in m.parameters()):
                    fsdp.fully_shard(m, mp_policy=policy)
        return fsdp.fully_shard(model, mp_policy=policy)
    return fsdp.FullyShardedDataParallel(
        model, device_id=torch.device(device), use_orig_params=kind == 'FSDP1 orig params',
        auto_wrap_policy=ModuleWrapPolicy(set(LAYERS)) if kind.endswith('per layer') else None,
        mixed_precision=fsdp.MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32))


def _write_path_names(model) -> set:
    from convneur_mm.models.layers.neural_memory import NeuralMemory
    return {f'{prefix}.{name}' for prefix, m in model.named_modules()
            if isinstance(m, NeuralMemory) for name, p in m.named_parameters()
            if any(p is q for q in m.update_parameters())}


def _fsdp_mixed_precision_step(rank, world_size, cuda=False):
    """Each FSDP kind, mixer and 16-bit dtype: the float32 model's outputs,
    then two forward and backward passes of the same weights under FSDP with
    ``param_dtype`` 16-bit, which hands every module its parameters in that
    dtype during the forward (FSDP2 as registered parameters, FSDP1 as plain
    attributes; FSDP1 frees a unit's after its call: the second pass of
    'FSDP1 per layer' crashed in the memory)."""
    errors = {}
    for kind in FSDP_KINDS:
        for mixer in MIXERS:
            for dtype in (torch.float16, torch.bfloat16):
                device = f'cuda:{rank}' if cuda else 'cpu'
                model = _perturb(_tiny(mixer)).to(device)
                x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(rank))
                x = x.to(device)
                with torch.no_grad():
                    reference = model(x)
                write_path = _write_path_names(model)
                model = _sharded(model, kind, dtype, device)
                for _ in range(2):
                    outs = model(x)
                    sum(o.float().square().mean() for o in outs).backward()
                for name, p in model.named_parameters():
                    if not p.numel():  # FSDP1's original parameters: this rank's shard
                        continue
                    # no zero tie for FSDP2 units of their own: a one-chunk
                    # memory's write path may get no gradient there
                    assert p.grad is not None or (kind == 'fully_shard per layer'
                                                  and name in write_path), (kind, mixer, name)
                    if p.grad is not None:
                        grad = p.grad.full_tensor() if kind.startswith('fully_shard') else p.grad
                        assert torch.isfinite(grad).all(), (kind, mixer, dtype, name)
                errors[kind, mixer, dtype] = worst(
                    ((o.float() - r).abs().max() / r.abs().max()).item()
                    for o, r in zip(outs, reference))
    return errors


@pytest.mark.parametrize('world_size,backend', [
    pytest.param(2, 'gloo', id='cpu-gloo', marks=pytest.mark.slow), on_cuda(1, 'nccl', id='cuda-nccl')])
def test_fsdp_mixed_precision_runs_and_trains(world_size, backend):
    """The float32 pieces (stem conv, input projection, memory) get 16-bit
    parameters from FSDP's mixed precision and still compute in float32; it
    crashed in the stem as ``.half()`` did, and under FSDP1 in the memory
    (its parameters, plain attributes there, went unseen). Two gloo
    processes."""
    results = run_distributed(_fsdp_mixed_precision_step, world_size, backend == 'nccl',
                              backend=backend)
    for errors in results:
        assert len(errors) == len(FSDP_KINDS) * len(MIXERS) * 2
        for (kind, mixer, dtype), err in errors.items():
            assert err < (5e-3 if dtype == torch.float16 else 4e-2), (kind, mixer, dtype, err)


def _two_ddp_steps(rank, world_size, mixer):
    size = (32, 32) if rank == 0 else (48, 32)  # ranks see different token counts
    return ddp_sgd_steps(_tiny(mixer), rank, size)


def _ddp_every_mixer(rank, world_size):
    return {mixer: _two_ddp_steps(rank, world_size, mixer) for mixer in NEW}


def test_two_process_ddp_without_unused_parameter_search():
    """Two gloo processes, find_unused_parameters=False: DDP raises if any
    parameter got no gradient; the replicas must stay identical."""
    rank0, rank1 = run_distributed(_ddp_every_mixer, 2)
    for mixer in NEW:
        for key in rank0[mixer]:
            torch.testing.assert_close(rank0[mixer][key], rank1[mixer][key],
                                       msg=f'{mixer}: {key}')


@pytest.mark.parametrize('config,scope,size,strides', [
    ('cls_convneur_m3_300e_in1k.py', 'mmpretrain', (64, 64), None),
    ('cascade_rcnn_convneur_m3_1x_coco.py', 'mmdet', (96, 128), (4, 8, 16, 32, 64)),
    ('fpn_convneur_m3_80k_ade20k.py', 'mmseg', (64, 96), (4, 8, 16, 32)),
])
def test_every_task_config_builds_and_runs_with_each_mixer(config, scope, size, strides):
    cfg = load_config(config)
    for mixer in NEW:
        cfg.model.backbone.global_mixer = mixer
        model = build_model(cfg, init=False).eval()
        with torch.no_grad():
            feats = model.extract_feat(dummy_batch(model, scope, size)['inputs'])
        if strides is None:  # classification: one pooled vector
            assert feats[0].shape == (1, 512), mixer
        else:
            assert [f.shape[-2:] for f in feats] == [
                (-(-size[0] // s), -(-size[1] // s)) for s in strides], mixer
