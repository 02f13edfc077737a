"""ONNX export (tools/deployment/pytorch2onnx.py, convneur_mm.deployment):
ONNX Runtime reproduces PyTorch, including the memory's closed-form write path
at token counts other than the traced one; the exported preprocessing is the
toolbox's; a failed check fails the tool.

The memory's write path (closed-form gradients, ATen's ``gelu_backward``
included) is run in ONNX Runtime, not only exported: a memory exported with a
symbolic token count is compared with PyTorch at 1, 4, 9 and ragged chunk
counts (<= 1e-5), and editing the first chunk must change what later chunks
read."""
import importlib.util
import os.path as osp

import pytest
import torch
from torch import nn

from convneur_mm.deployment import (DeployableModel, ExportCheckError, check_onnx,
                                    export_onnx, memory_chunk_counts, onnx_outputs)
from convneur_mm.deployment.export import adaptive_avg_pool2d, shape_generic_patches
from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.apis.launch import load_config
from convneur_mm.apis.toolbox import build_model
from ..paths import REPO

TOOL = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')


def _tool():
    spec = importlib.util.spec_from_file_location('pytorch2onnx', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Memory(nn.Module):
    """A perturbed memory with strong writes: what it reads depends on them."""

    def __init__(self, **settings):
        super().__init__()
        torch.manual_seed(0)
        self.memory = NeuralMemory(16, chunk_size=8, max_lr=2.0, **settings)
        with torch.no_grad():
            for p in self.memory.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def forward(self, x):
        return self.memory(x)


@pytest.fixture(scope='module')
def memory_onnx(tmp_path_factory):
    """One dynamic export shared by the tests below. It is this file's cost
    (about 1-4 minutes on the shared 2-core VM, mostly torch.export's and the
    ONNX exporter's symbolic-shape reasoning): the only test of the memory's
    closed-form write path in ONNX Runtime at token counts not traced."""
    module = _Memory().eval()
    path = str(tmp_path_factory.mktemp('onnx') / 'memory.onnx')
    # traced with 4 chunks; the token count is symbolic
    export_onnx(module, torch.randn(2, 32, 16), path, dynamic_dims=(1, ))
    return module, path


@pytest.mark.slow
def test_exported_memory_matches_pytorch_at_any_number_of_chunks(memory_onnx):
    module, path = memory_onnx
    # 4 chunks (traced), 1 chunk (reads W_0 only), 1 partial chunk, 3 chunks
    # and a ragged last one, 9 chunks
    inputs = [torch.randn(2, n, 16) for n in (32, 8, 5, 21, 72)]
    results = check_onnx(path, module, inputs, atol=1e-5)
    assert [r['shape'][1] for r in results] == [32, 8, 5, 21, 72]


@pytest.mark.slow
def test_the_tanh_form_of_gelu_exports(tmp_path):
    """``gelu_approximate='tanh'`` in the shape-generic graph: ONNX Runtime
    computes what PyTorch does, not the exact GELU's outputs."""
    module = _Memory(gelu_approximate='tanh').eval()
    path = str(tmp_path / 'tanh.onnx')
    export_onnx(module, torch.randn(2, 32, 16), path, dynamic_dims=(1, ))
    inputs = [torch.randn(2, n, 16) for n in (32, 21)]
    check_onnx(path, module, inputs, atol=1e-5)
    module.memory.gelu_approximate = 'none'
    with pytest.raises(ExportCheckError, match='differs from PyTorch'):
        check_onnx(path, module, inputs, atol=1e-5)


@pytest.mark.slow
def test_exported_write_path_is_live(memory_onnx):
    """The last chunk reads what the first one wrote, in ONNX Runtime too:
    the closed-form gradients (gelu_backward included) are in the graph."""
    module, path = memory_onnx
    x = torch.randn(2, 24, 16)  # the batch size is the traced one
    edited = x.clone()
    edited[:, :8] += 1.0
    before, after = onnx_outputs(path, x)[0], onnx_outputs(path, edited)[0]
    assert (after[:, 16:] - before[:, 16:]).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(after, module(edited), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('spinning', [True, False])
def test_ort_session_spins_only_when_asked(memory_onnx, spinning):
    """``benchmark.py --task onnx`` times ONNX Runtime between PyTorch calls: its threads
    must not spin after a run there, and the answers must not change."""
    from convneur_mm.deployment import ort_session
    module, path = memory_onnx
    session = ort_session(path, threads=2, spinning=spinning)
    entries = session.get_session_options().get_session_config_entry
    if spinning:
        with pytest.raises(Exception):  # not set: ONNX Runtime's default (spin)
            entries('session.intra_op.allow_spinning')
    else:
        assert entries('session.intra_op.allow_spinning') == '0'
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        torch.testing.assert_close(onnx_outputs(session, x)[0], module(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_check_fails_loudly_on_a_different_model(memory_onnx):
    module, path = memory_onnx
    other = _Memory().eval()
    with torch.no_grad():
        other.memory.init_w1.mul_(1.01)
    with pytest.raises(ExportCheckError, match='differs from PyTorch'):
        check_onnx(path, other, [torch.randn(2, 24, 16)])


@pytest.mark.parametrize('config,size', [('cls_convneur_m1_300e_in1k.py', (64, 64)),
                                         ('fpn_convneur_m2_80k_ade20k.py', (64, 96))])
def test_exported_preprocessing_is_the_toolboxes(config, size):
    """Raw BGR pixels through DeployableModel = the data preprocessor, then
    the network in tensor mode."""
    cfg = load_config(config)
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=[raw]), False)
        want = model(batch['inputs'], mode='tensor')
        got = DeployableModel(model, 'model', cfg.default_scope)(raw[None].float())
    torch.testing.assert_close(got, want)


def test_whole_detectors_are_refused_with_the_reason():
    with pytest.raises(ValueError, match='RoI heads.*--backbone-only'):
        DeployableModel(nn.Module(), 'model', 'mmdet')


def test_chunk_counts_follow_the_stage_sizes():
    model = build_model(load_config('cls_convneur_m1_300e_in1k.py'), init=False)
    # 224: stages 56^2, 28^2, 14^2, 7^2 tokens in chunks of 196
    assert memory_chunk_counts(model.backbone, (224, 224)) == [16, 4, 1, 1]
    assert memory_chunk_counts(model.backbone, (339, 285)) == [32, 8, 3, 1]


def test_tool_exits_non_zero_when_the_check_fails(monkeypatch, tmp_path, capsys):
    tool = _tool()
    calls = []
    monkeypatch.setattr(tool, 'export_onnx', lambda *a, **k: calls.append(k))

    def failing_check(path, module, inputs, atol):
        calls.append(tuple(inputs[0].shape))
        raise ExportCheckError('ONNX Runtime differs from PyTorch by 0.5')
    monkeypatch.setattr(tool, 'check_onnx', failing_check)
    status = tool.main(['cls_convneur_m1_300e_in1k.py', '--out', str(tmp_path / 'm1.onnx'),
                        '--dynamic'])
    assert status == 1
    assert calls[0]['dynamic_dims'] == (2, 3)
    assert calls[1:] == [(1, 3, 224, 224), (1, 3, 339, 285)]  # the second size checked too
    err = capsys.readouterr().err
    assert 'CHECK FAILED' in err and 'do not deploy it' in err


@pytest.mark.parametrize('options, message', [
    (['--check-shape', '96', '96'], '--check-shape is the second check size of a --dynamic'),
    (['--batch', '0'], 'must be a positive integer, got 0'),
    (['--shape', '0', '224'], 'argument --shape: must be a positive integer, got 0'),
    (['--dynamic', '--check-shape', '64', '-1'], 'argument --check-shape: must be a positive'),
    (['--out', '/nonexistent/folder/m1.onnx'], 'the directory /nonexistent/folder does not exist'),
])
def test_impossible_options_stop_before_the_export(options, message, monkeypatch, tmp_path,
                                                   capsys):
    """They were ignored (--check-shape without --dynamic) or failed after
    the export's minutes (a missing --out folder)."""
    tool = _tool()
    monkeypatch.setattr(tool, 'export_onnx', lambda *a, **k: pytest.fail('exported'))
    with pytest.raises(SystemExit) as exit_:
        tool.main(['cls_convneur_m1_300e_in1k.py', '--out', str(tmp_path / 'm1.onnx'),
                   *options])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_opset_the_exporter_did_not_write_fails(monkeypatch, tmp_path, capsys):
    """torch's exporter writes opset 18 when asked for an older one, with a
    warning in the log: the tool said "check passed" and exited 0."""
    tool = _tool()
    monkeypatch.setattr(tool, 'export_onnx', lambda *a, **k: None)
    monkeypatch.setattr(tool, 'written_opset', lambda path: 18)
    status = tool.main(['cls_convneur_m1_300e_in1k.py', '--out', str(tmp_path / 'm1.onnx'),
                        '--opset', '11'])
    assert status == 1 and 'has opset 18, not the --opset 11' in capsys.readouterr().err


@pytest.mark.parametrize('size', [(16, 16), (25, 21), (7, 5), (1, 3)])
@pytest.mark.parametrize('output_size', [1, 2, 3, 6, (2, None)])
def test_shape_generic_adaptive_pooling_is_torchs(size, output_size):
    """UperNet's pyramid pooling as exported (its bins computed in the graph)."""
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool2d(x, output_size),
                               torch.nn.functional.adaptive_avg_pool2d(x, output_size))


def test_patches_hold_only_while_tracing():
    from mmseg.models.utils import Upsample
    pool, upsample = nn.AdaptiveAvgPool2d.forward, Upsample.forward
    up = Upsample(scale_factor=2, mode='bilinear', align_corners=False)
    x = torch.randn(1, 2, 5, 7)
    with shape_generic_patches():
        assert nn.AdaptiveAvgPool2d.forward is not pool
        patched = up(x)
    assert (nn.AdaptiveAvgPool2d.forward, Upsample.forward) == (pool, upsample)
    torch.testing.assert_close(patched, up(x))
