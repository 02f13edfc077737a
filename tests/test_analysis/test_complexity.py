"""The paper's Table 1 and Table 5 (parameters and FLOPs) from our configs.

Paper FLOPs are MACs counted the way ptflops-style module hooks count them
(convolutions, linear and norm layers); the memory read and inner loop are
invisible to that convention. Non-local's row also needs the products of its
explicit torch.matmul calls, which ptflops' PyTorch backend patches
('paper_matmul'). The paper's parameter counts also include 8*C_m^2 + C_m
unused template weights per memory module, which we do not allocate, so
params are compared with the issue's "without unused weights" column.
"""
import pytest
import torch
from torch import nn

from convneur_mm.models.layers.neural_memory import NeuralMemory
from convneur_mm.analysis.complexity import count_macs, measure_config

CLS = 'cls_convneur_{}_300e_in1k.py'
# arch: (paper GFLOPs, params in M without the unused template weights)
TABLE1 = {'m1': (0.71, 4.12), 'm2': (1.01, 5.82), 'm3': (1.77, 10.11), 'm4': (3.06, 17.25)}
M3_DIMS = (64, 128, 256, 512)
STAGE_TOKENS_224 = (56 * 56, 28 * 28, 14 * 14, 7 * 7)


def _rel(value, reference):
    return abs(value - reference) / reference


@pytest.mark.parametrize('arch', sorted(TABLE1))
def test_table1_params_and_paper_flops(arch):
    flops, params = TABLE1[arch]
    result = measure_config(CLS.format(arch))['whole']
    assert _rel(result['params'] / 1e6, params) < 0.03, result
    assert _rel(result['paper'] / 1e9, flops) < 0.03, result
    # the full count adds the memory read and inner loop
    assert result['full'] > 1.5 * result['paper']


@pytest.mark.parametrize('override,paper_gflops', [
    (dict(memory_placement='none'), 1.4),
    (dict(memory_cfg=dict(dim=64)), 1.5),
])
def test_table5_ablation_flops(override, paper_gflops):
    result = measure_config(CLS.format('m3'), cfg_options={'model.backbone': override})
    assert _rel(result['whole']['paper'] / 1e9, paper_gflops) < 0.03


@pytest.mark.parametrize('override,memories_per_stage,memory_dim,paper_gflops', [
    (dict(memory_placement='block'), (2, 2, 6, 2), 128, 2.3),
    (dict(memory_cfg=dict(dim=256)), (1, 1, 1, 1), 256, 2.7),
])
def test_table5_ablations_that_differ_by_one_projection(override, memories_per_stage,
                                                         memory_dim, paper_gflops):
    """Two ablations count 6-8% below the paper with our hooks. Adding one
    more C x C_m pointwise projection per memory module (sum C * C_m * H * W)
    lands every Table 1 and Table 5 number within 3%: the paper's counter
    evidently sees one such projection more than our module graph has (the
    parameter counts match exactly, so it is a second call, not a layer)."""
    paper = measure_config(CLS.format('m3'), cfg_options={'model.backbone': override})
    ours = paper['whole']['paper']
    extra = sum(n * c * memory_dim * hw
                for n, c, hw in zip(memories_per_stage, M3_DIMS, STAGE_TOKENS_224))
    assert 0.05 < (paper_gflops * 1e9 - ours) / (paper_gflops * 1e9) < 0.09
    assert _rel((ours + extra) / 1e9, paper_gflops) < 0.03


def test_concat_fusion_adds_0_7m_params():
    base = measure_config(CLS.format('m3'))['whole']['params']
    concat = measure_config(CLS.format('m3'), cfg_options={'model.backbone.fusion': 'concat'})
    assert _rel((concat['whole']['params'] - base) / 1e6, 0.7) < 0.03


def test_paper_convention_counts_modules_not_functional_code():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.norm(self.conv(x)).mean((2, 3))
            return self.fc(x) @ torch.ones(4, 4)  # a functional matmul

    x = torch.randn(2, 3, 5, 5)
    conv = 2 * 25 * 8 * 27 + 2 * 25 * 8  # weights + bias per output element
    norm = 2 * 8 * 25 * 2  # affine norm: 2 per element
    fc = 2 * 8 * 4 + 2 * 4
    net = Net().eval()
    macs = count_macs(net, lambda: net(x))
    assert macs['paper'] == conv + norm + fc
    assert macs['full'] == 2 * 25 * 8 * 27 + 2 * 8 * 4 + 2 * 4 * 4 + norm


@pytest.mark.parametrize('shape', [(224, 224, 3), (0, 224), ()])
def test_a_bad_shape_is_refused(shape):
    with pytest.raises(ValueError, match='shape must be H W'):
        measure_config(CLS.format('m1'), shape=shape or [-1])


def _m3(global_mixer):
    return measure_config(CLS.format('m3'),
                          cfg_options={'model.backbone.global_mixer': global_mixer})['whole']


@pytest.mark.parametrize('mixer,paper_gflops,tolerance', [
    ('cbam', 1.5, 0.03), ('nonlocal', 3.0, 0.03), ('attention', 1.8, 0.03),
    ('rwkv', 2.0, 0.10), ('titans', 3.1, 0.10)])
def test_table5_branch_types_under_the_matmul_convention(mixer, paper_gflops, tolerance):
    """Every global-branch type of Table 5 at ConvNeur-M3, 224x224. IR-RWKV
    (1.91) and Titans (2.82) count 5% and 9% low: the WKV kernel and the
    titans-pytorch extras (long-term memory tokens, hyper-connections) are
    the candidates (docs/notes/benchmarks.md#flop-counts)."""
    result = _m3(mixer)
    assert _rel(result['paper_matmul'] / 1e9, paper_gflops) < tolerance, result
    if mixer == 'nonlocal':  # module hooks alone miss the quadratic affinities
        assert result['paper'] / 1e9 < 0.6 * paper_gflops
    else:
        assert result['paper_matmul'] == result['paper']


def test_full_count_includes_attention_products():
    """SDPA's two products per stage: 2 * N^2 * C_m MACs (torch's counter has
    no formula for the CPU flash kernel; we register one)."""
    attention = _m3('attention')
    products = 2 * sum(n * n for n in STAGE_TOKENS_224) * 128
    # full = paper + the products - the bias additions the hooks count (~0.5%)
    assert abs(attention['full'] - attention['paper'] - products) < 0.02 * products


def test_matmul_convention_sees_explicit_matmul_only_outside_the_memory():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.memory = NeuralMemory(8, chunk_size=4)

        def forward(self, x):  # x: (2, 12, 8)
            a = torch.matmul(x, x.transpose(1, 2))  # seen: 2 * 12 * 12 * 8
            b = x.bmm(x.transpose(1, 2))  # seen: the same
            c = x @ x.transpose(1, 2)  # the operator: not seen, as in ptflops
            return self.memory(x), a + b + c

    net = Net().eval()
    macs = count_macs(net, lambda: net(torch.randn(2, 12, 8)))
    assert macs['paper_matmul'] - macs['paper'] == 2 * (2 * 12 * 12 * 8)
    assert macs['full'] > macs['paper_matmul']  # the memory's products and the operator
