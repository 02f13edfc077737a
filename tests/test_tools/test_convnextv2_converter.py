"""ConvNeXt-V2 checkpoints into ConvNeur (tools/model_converters/convnextv2_to_convneur.py).

The sources are the real models with random weights: MMPretrain's ``ConvNeXt``
(GRN, no layer scale) in an ``ImageClassifier``, timm's ``convnextv2_*``
(``pretrained=False``), and the official repository's layout, built here from
its published definition (``OfficialConvNeXtV2``). Each is saved in its own
format, converted, loaded through ConvNeur's ``init_cfg`` and compared on the
same images: the four stage outputs and the logits. Random weights: PyTorch's
init plus N(0, 0.1) on every tensor, GRN's zeros included. The default suite
runs atto in every format and MMPretrain's pico; the other sizes are ``slow``.
Also: the warm start keeps every key and trains every global parameter from
step 1 on, refuses trained global branches, and reads the checkpoint once; the
converter refuses other sizes, the wrong arch, ConvNeXt-V1, crafted pickles and
unknown layouts.
"""
import os
import os.path as osp
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import convneur_mm  # noqa: F401  (registry, weights-only loader)
from convneur_mm.models.converters.convnextv2 import (KEY_TABLE, ConvNeXtV2CheckpointError, SIZES,
                                                      backbone_cfg, convert, source_arch,
                                                      to_convneur_keys)
from convneur_mm.testing.errors import worst
from convneur_mm.utils.paths import tools_dir
from ..paths import import_file

TOOL = osp.join(tools_dir(), 'model_converters', 'convnextv2_to_convneur.py')
ARCH = {'atto': 'm1', 'femto': 'm2', 'pico': 'm3', 'nano': 'm4'}
NUM_CLASSES = 10
TOLERANCE = 1e-5  # relative L2 error, local-only and warm start alike


tool = import_file('convnextv2_to_convneur', TOOL)


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


# ------------------------------------------------- the official definition
class OfficialGRN(nn.Module):
    """facebookresearch/ConvNeXt-V2 ``models/utils.py`` GRN: (1, 1, 1, C)
    parameters on a channels-last map."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ChannelsFirstLN(nn.Module):
    """The official ``LayerNorm(data_format='channels_first')``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class OfficialBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = OfficialGRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXtV2(nn.Module):
    """``models/convnextv2.py`` ConvNeXtV2: downsample_layers (stem: conv,
    LN; then LN, conv), stages of Blocks, ``norm`` after pooling, ``head``."""

    def __init__(self, depths: List[int], dims: List[int], num_classes: int):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLN(dims[0]))] +
            [nn.Sequential(ChannelsFirstLN(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, 2))
             for i in range(1, 4)])
        self.stages = nn.ModuleList(
            [nn.Sequential(*[OfficialBlock(d) for _ in range(n)]) for n, d in zip(depths, dims)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


# ------------------------------------------------------------ the sources
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (GRN's zeros included) so no tensor is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def build_source(fmt: str, size: str) -> Tuple[nn.Module, list, dict]:
    """(model, the modules whose outputs are the four stage outputs, checkpoint)."""
    depths, dims = SIZES[size]
    if fmt == 'official':
        model = _randomize(OfficialConvNeXtV2(depths, dims, NUM_CLASSES))
        return model, [s[-1] for s in model.stages], {'model': model.state_dict(), 'epoch': 5}
    if fmt == 'mmpretrain':
        from mmpretrain.registry import MODELS
        model = _randomize(MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ConvNeXt', arch=size, use_grn=True, layer_scale_init_value=0.),
            head=dict(type='LinearClsHead', num_classes=NUM_CLASSES, in_channels=dims[-1]))))
        checkpoint = dict(meta=dict(epoch=5, mmpretrain_version='1.2.0'),
                          state_dict=model.state_dict())
        return model, [s[-1] for s in model.backbone.stages], checkpoint
    timm = pytest.importorskip('timm')
    model = _randomize(timm.create_model(f'convnextv2_{size}', pretrained=False,
                                         num_classes=NUM_CLASSES))
    return model, [s.blocks[-1] for s in model.stages], model.state_dict()


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    if hasattr(model, 'data_preprocessor'):  # an MMPretrain/ConvNeur ImageClassifier
        return model(x, mode='tensor')
    return model(x)


def run_with_stages(model: nn.Module, stage_modules: list, x: Tensor) -> Tuple[list, Tensor]:
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in stage_modules]
    try:
        with torch.no_grad():
            logits = logits_of(model, x)
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def convneur_classifier(checkpoint: str, size: str, placement: str = 'none',
                        global_init: str = 'paper') -> nn.Module:
    """ConvNeur as the MMPretrain configs build it, weights from ``checkpoint``
    through the backbone's and the head's init_cfg."""
    from mmpretrain.registry import MODELS
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='convneur_mm.ConvNeur', arch=ARCH[size], memory_placement=placement,
                      out_indices=(3, ), gap_before_final_norm=True, global_init=global_init,
                      init_cfg=dict(type='Pretrained', checkpoint=checkpoint,
                                    prefix='backbone.')),
        head=dict(type='LinearClsHead', num_classes=NUM_CLASSES, in_channels=SIZES[size][1][-1],
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='head.'))))
    model.init_weights()
    return model.eval()


def ours_stages(model: nn.Module) -> list:
    return [stage[-1] for stage in model.backbone.stages]


def save_source(fmt: str, checkpoint: dict, tmp_path, name: str = 'src') -> str:
    path = str(tmp_path / f'{name}_{fmt}.pth')
    torch.save(checkpoint, path)
    return path


def compare(fmt: str, size: str, tmp_path, placement: str, global_init: str,
            source: tuple = None) -> Dict[str, float]:
    """Relative errors of ConvNeur's four stage outputs and logits against the
    source's (``source``: a ``build_source`` result to reuse)."""
    if source is None:
        torch.manual_seed(0)
        source = build_source(fmt, size)
    model, source_stages, checkpoint = source
    src = save_source(fmt, checkpoint, tmp_path)
    dst = str(tmp_path / f'convneur_{fmt}_{size}_{placement}.pth')
    tool.convert_file(src, dst, task='cls', memory_placement=placement)
    ours = convneur_classifier(dst, size, placement, global_init)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref_stages, ref_logits = run_with_stages(model, source_stages, x)
    our_stages, our_logits = run_with_stages(ours, ours_stages(ours), x)
    errors = {f'stage{i}': rel_err(o, r) for i, (o, r) in enumerate(zip(our_stages, ref_stages))}
    errors['logits'] = rel_err(our_logits, ref_logits)
    return errors


# ------------------------------------------------------------- equivalence
# atto in every format and MMPretrain's pico by default; the other sizes `slow`
CASES = [(fmt, size) if size == 'atto' or (fmt, size) == ('mmpretrain', 'pico') else
         pytest.param(fmt, size, marks=pytest.mark.slow)
         for fmt in ('official', 'mmpretrain', 'timm') for size in ARCH]


@pytest.mark.parametrize('fmt,size', CASES)
def test_local_only_and_warm_start_compute_the_source(fmt, size, tmp_path):
    """ConvNeur local-only (memory_placement='none') and the full ConvNeur
    under the warm start, each loaded from its conversion of the same source."""
    torch.manual_seed(0)
    source = build_source(fmt, size)
    local = compare(fmt, size, tmp_path, 'none', 'paper', source)
    warm = compare(fmt, size, tmp_path, 'stage', 'warm', source)
    print(f'relative errors {fmt} {size}: local-only {worst(local.values()):.2e}, warm start '
          f'{worst(warm.values()):.2e} (logits {local["logits"]:.2e}, {warm["logits"]:.2e})')
    assert len(local) == 5 and worst(local.values()) < TOLERANCE, local
    assert worst(warm.values()) < TOLERANCE, warm


@pytest.mark.parametrize('placement', ['stage', pytest.param('block', marks=pytest.mark.slow)])
def test_the_papers_init_does_not(placement, tmp_path):
    """Without the warm start the fresh gates (~0.5) change the function: the
    test above could fail."""
    errors = compare('timm', 'atto', tmp_path, placement=placement, global_init='paper')
    assert errors['logits'] > 1e-2 and errors['stage3'] > 1e-2, errors


def test_the_table_maps_every_tensor_of_each_format_once():
    torch.manual_seed(0)
    counts = {}
    for fmt in ('official', 'mmpretrain', 'timm'):
        _, _, checkpoint = build_source(fmt, 'atto')
        state = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
        renamed, found = to_convneur_keys(state)
        assert found == fmt and len(renamed) == len(state)
        counts[fmt] = sorted(renamed)
    assert counts['official'] == counts['mmpretrain'] == counts['timm']
    assert len(counts['timm']) == 136 + 2 + 2  # local network, output norm, head
    assert all(len(row) == 4 for row in KEY_TABLE)


def test_safetensors_and_dense_output_load_in_the_detection_layout(tmp_path):
    """timm's hub files are safetensors; the dense output loads strictly into a
    four-output backbone with the warm start, the global branches left at init
    and named."""
    safetensors = pytest.importorskip('safetensors.torch')
    torch.manual_seed(0)
    source, source_stages, state = build_source('timm', 'atto')
    src = str(tmp_path / 'model.safetensors')
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, src)
    dst = str(tmp_path / 'dense.pth')
    meta = tool.convert_file(src, dst, arch='m1')
    assert meta['left_at_init'] == [f'backbone.stages.{i}.0.global_branch' for i in range(4)]
    assert sorted(k for k in meta['initialized_keys'] if 'global_branch' not in k) == sorted(
        f'backbone.norm{i}.{p}' for i in range(3) for p in ('weight', 'bias'))
    assert meta['dropped_keys'] == ['head.fc.bias', 'head.fc.weight']
    from convneur_mm.models.backbones.convneur import ConvNeur
    backbone = ConvNeur('m1', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                        global_init='warm',
                        init_cfg=dict(type='Pretrained', checkpoint=dst, prefix='backbone.'))
    backbone.init_weights()
    x = torch.randn(1, 3, 64, 64)
    ref, _ = run_with_stages(source, source_stages, x)
    outs, _ = run_with_stages(backbone, [s[-1] for s in backbone.stages], x)
    assert worst(rel_err(o, r) for o, r in zip(outs, ref)) < TOLERANCE


# -------------------------------------------------------------- the CLI
def test_cli_names_the_global_branches_left_at_init(tmp_path, capsys):
    torch.manual_seed(0)
    _, _, checkpoint = build_source('mmpretrain', 'atto')
    src = save_source('mmpretrain', checkpoint, tmp_path)
    tool.main([src, str(tmp_path / 'out.pth'), '--arch', 'm1'])
    out = capsys.readouterr().out
    assert 'ConvNeXt-V2-atto, mmpretrain format' in out and 'ConvNeur-M1' in out
    assert ('4 global branches: backbone.stages.0.0.global_branch, backbone.stages.1.0.'
            'global_branch, backbone.stages.2.0.global_branch, backbone.stages.3.0.'
            'global_branch') in out
    assert 'missing' not in out


def test_cli_says_when_a_classifiers_source_has_no_head(tmp_path, capsys):
    torch.manual_seed(0)
    _, _, checkpoint = build_source('mmpretrain', 'atto')
    headless = dict(checkpoint, state_dict={k: v for k, v in checkpoint['state_dict'].items()
                                            if not k.startswith('head.')})
    for name, state, note in (('whole', checkpoint, False), ('headless', headless, True)):
        src = save_source('mmpretrain', state, tmp_path, name)
        tool.main([src, str(tmp_path / f'{name}.pth'), '--task', 'cls'])
        assert ('holds no head' in capsys.readouterr().out) == note, name


def _fails(argv: list) -> str:
    with pytest.raises(SystemExit) as err:
        tool.main(argv)
    return str(err.value)


def test_refuses_a_size_convneur_does_not_have(tmp_path):
    timm = pytest.importorskip('timm')
    src = save_source('timm', timm.create_model('convnextv2_tiny', pretrained=False)
                      .state_dict(), tmp_path)
    message = _fails([src, str(tmp_path / 'out.pth')])
    assert 'found depths [3, 3, 9, 3] and dims [96, 192, 384, 768] (ConvNeXt-V2-tiny)' in message
    assert 'atto -> ConvNeur-M1' in message and 'nano -> ConvNeur-M4' in message
    assert not (tmp_path / 'out.pth').exists()


def test_refuses_the_wrong_arch(tmp_path):
    torch.manual_seed(0)
    src = save_source('official', build_source('official', 'atto')[2], tmp_path)
    assert "ConvNeXt-V2-atto, whose local network is ConvNeur-M1's, not M3's" in _fails(
        [src, str(tmp_path / 'out.pth'), '--arch', 'm3'])


@pytest.mark.parametrize('fmt', ['mmpretrain', 'timm'])
def test_refuses_convnext_v1(fmt, tmp_path):
    if fmt == 'mmpretrain':
        from mmpretrain.models import ConvNeXt
        state = {'backbone.' + k: v for k, v in ConvNeXt(arch='atto').state_dict().items()}
        checkpoint = dict(state_dict=state)
    else:
        checkpoint = pytest.importorskip('timm').create_model(
            'convnext_atto', pretrained=False).state_dict()
    message = _fails([save_source(fmt, checkpoint, tmp_path), str(tmp_path / 'out.pth')])
    assert 'ConvNeXt-V1 checkpoint (layer scale, no GRN)' in message
    assert 'stages.0' in message and 'gamma' in message


class _Payload:
    def __reduce__(self):
        return os.system, ('touch pwned',)


def test_refuses_a_crafted_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'stem.0.weight': torch.zeros(1)}, 'x': _Payload()}, src)
    message = _fails([src, str(tmp_path / 'out.pth')])
    assert 'UnsafeCheckpointError' in message and 'Refusing to load' in message
    assert not (tmp_path / 'pwned').exists()


def test_refuses_an_unknown_layout_and_unknown_tensors(tmp_path):
    with pytest.raises(ConvNeXtV2CheckpointError, match='not a ConvNeXt-V2 checkpoint'):
        source_arch({'state_dict': {'conv1.weight': torch.zeros(1)}})
    torch.manual_seed(0)
    checkpoint = build_source('official', 'atto')[2]
    checkpoint['model']['decoder.pred.weight'] = torch.zeros(3)
    with pytest.raises(ConvNeXtV2CheckpointError, match='decoder.pred.weight'):
        source_arch(checkpoint)


def test_conversion_fills_the_target_it_is_given():
    """The conversion maps tensors onto a state dict the caller built: the
    local network from the source, everything else exactly as the target
    holds it; a target of another arch is refused."""
    from convneur_mm.models.backbones.convneur import ConvNeur
    torch.manual_seed(0)
    checkpoint = build_source('timm', 'atto')[2]
    cfg = backbone_cfg(source_arch(checkpoint), 'dense')
    target = ConvNeur(**cfg).state_dict()
    converted = convert(checkpoint, target, cfg)
    state, meta = converted['state_dict'], converted['meta']
    assert sorted(state) == sorted('backbone.' + k for k in target)
    assert torch.equal(state['backbone.downsample_layers.0.0.weight'], checkpoint['stem.0.weight'])
    kept = [k for k in target if '.global_branch.' in k]
    assert kept and all(torch.equal(state['backbone.' + k], target[k]) for k in kept)
    assert meta['backbone'] == dict(type='convneur_mm.ConvNeur', **cfg)
    with pytest.raises(ConvNeXtV2CheckpointError, match="ConvNeur-M1.*built as 'm2'"):
        convert(checkpoint, target, backbone_cfg('m2'))
    with pytest.raises(ValueError, match='task must be one of'):
        backbone_cfg('m1', task='seg')


# ------------------------------------------------------------ warm start
def _converted_m1(tmp_path) -> str:
    torch.manual_seed(0)
    src = save_source('official', build_source('official', 'atto')[2], tmp_path)
    dst = str(tmp_path / 'dense.pth')
    tool.convert_file(src, dst)
    return dst


def _m1(checkpoint: str, **kwargs) -> nn.Module:
    from convneur_mm.models.backbones.convneur import ConvNeur
    backbone = ConvNeur('m1', out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
                        init_cfg=dict(type='Pretrained', checkpoint=checkpoint,
                                      prefix='backbone.'), **kwargs)
    backbone.init_weights()
    return backbone


def _global_grads(backbone, steps: int) -> list:
    """Per step, {global-branch parameter: its gradient's max magnitude}."""
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        sum(o.pow(2).mean() for o in backbone(x)).backward()
        grads.append({n: (p.grad.abs().max().item() if p.grad is not None else 0.0)
                      for n, p in backbone.named_parameters() if '.global_branch.' in n})
        optimizer.step()
    return grads


def test_warm_start_keeps_the_keys_and_trains_every_global_parameter(tmp_path):
    """The zero out-projection gets gradient at step 0 (its input, the memory's
    read-out, is not zero; the gate's slope sigmoid'(0) = 1/4 is the largest);
    the in-projection and the memory, behind it, from step 1 on: each
    parameter the paper's init trains at step 0 (the write path is idle where
    a stage has one chunk)."""
    converted = _converted_m1(tmp_path)
    backbone, paper = _m1(converted, global_init='warm'), _m1(converted)
    assert list(backbone.state_dict()) == list(paper.state_dict())
    branch = backbone.stages[1][0].global_branch
    assert branch.proj_out.weight.abs().max() == 0 and branch.proj_out.bias.abs().max() == 0
    step0, step1 = _global_grads(backbone, 2)
    trained_by_paper = {n for n, g in _global_grads(paper, 1)[0].items() if g > 0}
    assert len(trained_by_paper) > 8 * 4  # projections and most of each memory
    for i in range(4):
        prefix = f'stages.{i}.0.global_branch.'
        assert step0[prefix + 'proj_out.weight'] > 0 and step0[prefix + 'proj_out.bias'] > 0
        assert all(v == 0 for n, v in step0.items() if n.startswith(prefix)
                   and not n.startswith(prefix + 'proj_out.'))
    assert {n for n, g in step1.items() if g > 0} == trained_by_paper


def test_warm_start_refuses_trained_global_branches(tmp_path):
    """A checkpoint the converter did not write may hold trained global
    branches, which the warm start would overwrite."""
    plain = str(tmp_path / 'plain.pth')
    torch.save({'state_dict': torch.load(_converted_m1(tmp_path))['state_dict']}, plain)
    with pytest.raises(ConvNeXtV2CheckpointError, match="global_init='paper'"):
        _m1(plain, global_init='warm')


def test_warm_start_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """The converter's record of untouched global branches comes with the
    weights: one read of the file, not a second one for its ``meta``."""
    from mmengine.runner.checkpoint import CheckpointLoader
    converted = _converted_m1(tmp_path)
    reads = []
    load = CheckpointLoader.load_checkpoint  # what every checkpoint read goes through

    def counted(filename, *args, **kwargs):
        reads.append(filename)
        return load(filename, *args, **kwargs)
    monkeypatch.setattr(CheckpointLoader, 'load_checkpoint', counted)
    _m1(converted, global_init='warm')
    assert reads == [converted]


def test_warm_start_arguments():
    from convneur_mm.models.backbones.convneur import ConvNeur
    with pytest.raises(ValueError, match='global_init must be one of'):
        ConvNeur('m1', global_init='zero')
    with pytest.raises(ValueError, match="needs fusion 'gate' or 'add'"):
        ConvNeur('m1', global_init='warm', fusion='concat')


# ------------------------------------------------------ the COCO tiny demo
@pytest.mark.slow
def test_coco_tiny_demo_from_a_converted_checkpoint_runs_through_dist_train(tmp_path):
    """configs/demo/cascade_rcnn_convneur_m3_convnextv2_coco_tiny.py from a
    converted (random-weight) MMPretrain ConvNeXt-V2-P, two gloo processes,
    one epoch, to its last checkpoint."""
    import subprocess
    import sys
    from convneur_mm.demo_data.coco import generate_coco_tiny
    from ..paths import REPO
    from ..test_engine.dist_utils import free_port
    data = str(tmp_path / 'coco_tiny')
    generate_coco_tiny(data, num_train=8, num_val=4)
    torch.manual_seed(0)
    src = save_source('mmpretrain', build_source('mmpretrain', 'pico')[2], tmp_path)
    converted = str(tmp_path / 'm3.pth')
    tool.convert_file(src, converted, arch='m3')
    work_dir = tmp_path / 'work'
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(COCO_TINY_ROOT=data + '/', CONVNEUR_PRETRAINED=converted, PORT=str(free_port()),
               PYTHON=sys.executable, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [osp.join(REPO, 'tools', 'dist_train.sh'),
         osp.join(REPO, 'configs', 'demo', 'cascade_rcnn_convneur_m3_convnextv2_coco_tiny.py'),
         '2', '--work-dir', str(work_dir), '--auto-scale-lr',
         '--cfg-options', 'train_cfg.max_epochs=1', 'default_hooks.checkpoint.interval=1'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert 'warm start of 4 global branches' in log
    assert (work_dir / 'epoch_1.pth').is_file()
