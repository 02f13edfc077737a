"""The set-up's decisions, without network or GPU: which torch
build, which CUDA compiler pieces, the CUDA_HOME made of the venv's CUDA
tree, the arch list, and when an installed mmcv must be rebuilt."""
import json
import os
from importlib import metadata

import pytest
import torch

from convneur_mm.utils.cuda_env import NvidiaInfo, torch_cuda_archs
from tests.paths import REPO, import_setup_helper

cuda_setup = import_setup_helper()
SetupError = cuda_setup.SetupError
assemble_cuda_home, compiler_requirements = cuda_setup.assemble_cuda_home, cuda_setup.compiler_requirements
covers, default_arch_list, read_pins = cuda_setup.covers, cuda_setup.default_arch_list, cuda_setup.read_pins
toolkit_problems, torch_requirements = cuda_setup.toolkit_problems, cuda_setup.torch_requirements
wanted_flavor = cuda_setup.wanted_flavor

PINS = read_pins(os.path.join(REPO, 'requirements', 'torch.txt'))
TORCH_13 = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']
DEFAULT = '7.5;8.0;8.6;9.0;10.0;12.0+PTX'


def test_pins_come_from_requirements():
    assert PINS == {'torch': '2.13.0', 'torchvision': '0.28.0'}


@pytest.mark.parametrize('installed,build,expect_lines,expect_index', [
    ({}, None, ['torch===2.13.0', 'torchvision===0.28.0'], None),
    ({'torch': '2.13.0', 'torchvision': '0.28.0'}, None,  # PyPI's build, installed
     ['torch===2.13.0', 'torchvision===0.28.0'], None),
    ({'torch': '2.12.0+cu126'}, None,  # another version: the pin wins
     ['torch===2.13.0', 'torchvision===0.28.0'], None),
    ({'torch': '2.13.0+cu126', 'torchvision': '0.28.0+cu126'}, None,  # kept, not replaced
     ['torch==2.13.0+cu126', 'torchvision==0.28.0+cu126'], 'https://download.pytorch.org/whl/cu126'),
    ({'torch': '2.13.0'}, 'cu128',
     ['torch==2.13.0+cu128', 'torchvision==0.28.0+cu128'], 'https://download.pytorch.org/whl/cu128'),
])
def test_torch_build_choice(installed, build, expect_lines, expect_index):
    lines, index, note = torch_requirements(PINS, installed, build)
    assert lines == expect_lines and index == expect_index
    if installed.get('torch') == '2.13.0+cu126':
        assert 'keeping the installed torch 2.13.0+cu126' in note


def test_torch_build_mirror_and_bad_tag():
    _, index, _ = torch_requirements(PINS, {}, 'cu126', index='https://mirror/cu126')
    assert index == 'https://mirror/cu126'
    with pytest.raises(SetupError, match='not a PyTorch build tag'):
        torch_requirements(PINS, {}, '12.6')


def test_compiler_is_pinned_to_torchs_cuda():
    assert compiler_requirements('13.0', {'cuda-toolkit': '13.0.3.0'}) == \
        ['cuda-toolkit[nvcc,cccl]==13.0.3.0']
    assert compiler_requirements('12.6', {'nvidia-cuda-runtime-cu12': '12.6.77'}) == \
        ['nvidia-cuda-nvcc-cu12==12.6.*', 'nvidia-cuda-cccl-cu12==12.6.*']
    with pytest.raises(SetupError, match='built for CUDA 13.0'):
        compiler_requirements('13.0', {'cuda-toolkit': '12.9.1'})
    with pytest.raises(SetupError, match='CUDA_HOME'):
        compiler_requirements('13.0', {})


def test_installed_toolkit_pins_every_compiler_piece():
    """torch's own cuda-toolkit pins nvcc, nvvm and crt to one version: an
    unpinned nvvm resolves to a newer CUDA whose PTX ptxas rejects."""
    version = metadata.version('cuda-toolkit')
    assert version.split('.')[:2] == torch.version.cuda.split('.')
    nvcc_extra = [r for r in metadata.requires('cuda-toolkit') if "extra == 'nvcc'" in r]
    pinned = {r.split('==')[0]: r.split('==')[1].split(';')[0] for r in nvcc_extra}
    assert {'nvidia-cuda-nvcc', 'nvidia-nvvm', 'nvidia-cuda-crt'} <= set(pinned)
    assert all(v.startswith(torch.version.cuda + '.') for v in pinned.values()), pinned


def _fake_tree(root, files, nvcc_release='13.0'):
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('')
    nvcc = root / 'bin' / 'nvcc'
    if nvcc.exists():
        nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {nvcc_release}, V0"\n')
        nvcc.chmod(0o755)
    return str(root)


HEADERS = ['include/cuda_runtime.h', 'include/cusparse.h', 'include/cublas_v2.h',
           'include/cusolverDn.h']


def test_cuda_home_from_one_tree_gets_the_link_libcudart(tmp_path):
    tree = _fake_tree(tmp_path / 'nvidia' / 'cu13',
                      ['bin/nvcc', 'lib/libcudart.so.13', 'nvvm/bin/cicc'] + HEADERS)
    home = assemble_cuda_home(cuda_setup.cuda_trees(str(tmp_path), '13.0'),
                              str(tmp_path / 'venv' / 'cuda'))
    assert os.path.realpath(os.path.join(home, 'lib64', 'libcudart.so')) == \
        os.path.join(tree, 'lib', 'libcudart.so.13')
    assert not os.path.exists(os.path.join(tree, 'lib', 'libcudart.so'))  # site-packages untouched
    assert cuda_setup.nvcc_version(home) == '13.0'
    assert toolkit_problems(home, '13.0', '13.0') == []


def test_cuda_home_from_one_folder_per_library(tmp_path):
    """The CUDA 12 wheels' layout: nvidia/cuda_nvcc, nvidia/cuda_runtime, ..."""
    _fake_tree(tmp_path / 'nvidia' / 'cuda_nvcc', ['bin/nvcc', 'include/crt/host_config.h'],
               nvcc_release='12.6')
    _fake_tree(tmp_path / 'nvidia' / 'cuda_runtime',
               ['include/cuda_runtime.h', 'lib/libcudart.so.12'])
    _fake_tree(tmp_path / 'nvidia' / 'cusparse', ['include/cusparse.h', 'lib/libcusparse.so.12'])
    _fake_tree(tmp_path / 'nvidia' / 'cublas', ['include/cublas_v2.h'])
    _fake_tree(tmp_path / 'nvidia' / 'cusolver', ['include/cusolverDn.h'])
    home = assemble_cuda_home(cuda_setup.cuda_trees(str(tmp_path), '12.6'),
                              str(tmp_path / 'cuda'))
    assert toolkit_problems(home, '12.6', cuda_setup.nvcc_version(home)) == []
    assert os.path.exists(os.path.join(home, 'include', 'crt', 'host_config.h'))
    assert os.path.exists(os.path.join(home, 'lib', 'libcusparse.so.12'))


def test_a_toolkit_without_cusparse_or_of_another_version_is_refused(tmp_path):
    """The system toolkit on our machines: nvcc 13.0 but no cusparse.h."""
    home = _fake_tree(tmp_path / 'usr-local-cuda', ['bin/nvcc', 'lib64/libcudart.so'] +
                      [h for h in HEADERS if 'cusparse' not in h])
    assert toolkit_problems(home, '13.0', '13.0') == [f'{home} has no include/cusparse.h']
    assert 'its nvcc is CUDA 12.4' in toolkit_problems(home, '13.0', '12.4')[-1]


def test_default_arch_list_avoids_the_index_error(monkeypatch):
    """Without a GPU and without TORCH_CUDA_ARCH_LIST torch's extension
    builder fails; the set-up's default (torch's archs + PTX) builds."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    assert default_arch_list(TORCH_13) == DEFAULT
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST', raising=False)
    with pytest.raises(IndexError):
        _get_cuda_arch_flags()
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', default_arch_list(torch_cuda_archs()))
    flags = _get_cuda_arch_flags()
    assert '-gencode=arch=compute_75,code=sm_75' in flags
    assert '-gencode=arch=compute_120,code=compute_120' in flags  # PTX for newer GPUs


CPU = dict(kind='cpu', torch='2.13.0+cu130')
CUDA = dict(kind='cuda', torch='2.13.0+cu130', cuda='13.0', archs=DEFAULT)


@pytest.mark.parametrize('built,wanted,ok', [
    (CPU, CPU, True),
    (CUDA, CPU, True),  # CUDA-built ops run on the CPU too
    (dict(CPU, torch='2.12.0'), CPU, False),
    (CPU, CUDA, False),  # the CPU -> CUDA switch really rebuilds
    (dict(CUDA, archs=None), CUDA, False),  # an mmcv of unknown archs
    (dict(CUDA, archs='8.6'), CUDA, False),
    (CUDA, dict(CUDA, archs='8.6'), True),
    (dict(CUDA, cuda='12.6', torch='2.13.0+cu126'), CUDA, False),
    (CUDA, dict(CUDA, archs='8.9', devices=['8.9']), True),  # runs the sm_86 kernels
    (dict(CUDA, archs='8.0'), dict(CUDA, archs='8.6', devices=['8.6']), True),
    (dict(CUDA, archs='9.0'), dict(CUDA, archs='8.6', devices=['8.6']), False),
    (CUDA, dict(CUDA, archs='12.1', devices=['12.1']), True),
    (None, CPU, False),
])
def test_when_an_installed_mmcv_serves_the_wanted_flavor(built, wanted, ok):
    assert covers(built, wanted) == ok


@pytest.mark.parametrize('torch_2_11', [False, True], ids=['torch', 'torch-2.11-arch-list'])
def test_wanted_flavor_on_this_machine(monkeypatch, torch_2_11):
    """``torch_2_11``: get_arch_list() as torch < 2.13 answers without a GPU
    (empty), which stopped FORCE_CUDA=1 with "is it a CUDA build?"."""
    archs = torch_cuda_archs()
    if torch_2_11:
        monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: [])
    none = NvidiaInfo(None, [])
    assert wanted_flavor({}, none) == dict(kind='cpu', torch=metadata.version('torch'))
    forced = wanted_flavor({'FORCE_CUDA': '1'}, none)
    assert forced['kind'] == 'cuda' and forced['cuda'] == torch.version.cuda
    assert forced['archs'] == default_arch_list(archs)
    assert wanted_flavor({'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'}, none)['archs'] == '9.0'
    driver = NvidiaInfo('550.54.15', [])  # a driver torch cannot use: stop, or the CPU on request
    with pytest.raises(SetupError, match='550.54.15.*CONVNEUR_ALLOW_CPU=1'):
        wanted_flavor({}, driver)
    assert wanted_flavor({'CONVNEUR_ALLOW_CPU': '1'}, driver)['kind'] == 'cpu'
    assert wanted_flavor({'CUDA_VISIBLE_DEVICES': ''}, driver)['kind'] == 'cpu'


def test_stamp_records_the_flavor(tmp_path, monkeypatch):
    """A second set-up is a no-op only if the requirements and the flavor match."""
    monkeypatch.setattr(cuda_setup.cuda_env, 'detect_nvidia', lambda *a: NvidiaInfo(None, []))
    for var in ('FORCE_CUDA', 'TORCH_CUDA_ARCH_LIST'):
        monkeypatch.delenv(var, raising=False)
    stamp = tmp_path / 'stamp'
    stamp.write_text('abc\n' + json.dumps(dict(kind='cpu', torch=torch.__version__)) + '\n')
    assert cuda_setup.main(['stamp-ok', str(stamp), 'abc']) == 0
    assert cuda_setup.main(['stamp-ok', str(stamp), 'other']) == 1
    monkeypatch.setenv('FORCE_CUDA', '1')  # now a CUDA build is wanted: rebuild
    assert cuda_setup.main(['stamp-ok', str(stamp), 'abc']) == 1


def test_max_jobs():
    assert cuda_setup.max_jobs({'MAX_JOBS': '3'}) == '3'
    assert 1 <= int(cuda_setup.max_jobs({})) <= os.cpu_count()


# ---- the version query of mmcv's ops runs in a child process: on an H100
# (2026-11-24) get_compiling_cuda_version() segfaulted while the kernels worked
@pytest.fixture
def mmcv_ext(tmp_path, monkeypatch):
    """Make the version query crash, and mmcv's _ext a fake ELF file that
    NEEDs these libraries."""
    from tests.test_utils.test_cuda_env import SEGFAULT, fake_elf
    monkeypatch.setattr(cuda_setup.cuda_env, 'VERSION_QUERY', SEGFAULT)

    def link(*needed):
        path = fake_elf(tmp_path / '_ext.so', list(needed))
        monkeypatch.setattr(cuda_setup.cuda_env, 'mmcv_ext_path', lambda: path)
        return path
    return link


def test_check_survives_a_crashing_version_query(mmcv_ext, capsys):
    """The set-up checks the major version read from _ext, says so, and
    names the crash in a [setup] line."""
    ext = mmcv_ext('libc10.so', 'libcudart.so.13')
    assert cuda_setup.main(['check', json.dumps(CUDA)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ('[setup] mmcv.ops.get_compiling_cuda_version() crashed (signal 11: '
                      f'SIGSEGV); CUDA version major only, read from {ext}: NEEDED '
                      'libcudart.so.13')
    assert out[1] == f'[setup] mmcv ops compiled with CUDA 13 (major only, read from its _ext ' \
                     f'file) for archs {DEFAULT}'


@pytest.mark.parametrize('needed,match', [
    (['libcudart.so.12'], "is '12', not torch's CUDA 13: the CUDA ops were not compiled"),
    (['libc10.so'], "links no libcudart; .*SIGSEGV.* is 'not available', not torch's CUDA 13"),
])
def test_check_still_refuses_an_mmcv_without_torchs_cuda(mmcv_ext, needed, match):
    mmcv_ext(*needed)
    with pytest.raises(SetupError, match=match):
        cuda_setup.check_install(CUDA)


@pytest.mark.parametrize('answer,ok', [('13.0', True), ('12.6', False), ('not available', False)])
def test_check_compares_major_and_minor_when_the_query_works(monkeypatch, answer, ok):
    monkeypatch.setattr(cuda_setup.cuda_env, 'VERSION_QUERY', f'print({answer!r})\nprint("GCC")')
    if ok:
        assert f'mmcv ops compiled with CUDA 13.0 for archs {DEFAULT}' in \
            cuda_setup.check_install(CUDA)
    else:
        with pytest.raises(SetupError, match=f"get_compiling_cuda_version\\(\\) is '{answer}', "
                                             "not torch's CUDA 13.0"):
            cuda_setup.check_install(CUDA)


def test_probe_survives_a_crashing_version_query(mmcv_ext):
    mmcv_ext('libcudart.so.13')
    assert cuda_setup.probe_mmcv() == dict(kind='cuda', torch=torch.__version__, cuda='13',
                                           archs=None)
    mmcv_ext('libc10.so')
    assert cuda_setup.probe_mmcv() == dict(kind='cpu', torch=torch.__version__)
