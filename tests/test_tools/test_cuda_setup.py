"""The set-up's decisions, without network or GPU: which torch
build, which CUDA compiler pieces, the CUDA_HOME made of the venv's CUDA
tree, the arch list, when an installed mmcv must be rebuilt, and what mmcv's
ops were built with (asked in a child process, else read from their ELF file).

The installer's modules are scripts beside each other in ``tools/setup/``,
imported here as the script run by path sees them."""
import importlib
import json
import os
import os.path as osp
import struct
import sys
from importlib import metadata

import pytest
import torch

from tests.paths import REPO

SETUP = osp.join(REPO, 'tools', 'setup')


def _import_installer(*names):
    sys.path.insert(0, SETUP)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(SETUP)


cuda_setup, cuda_archs, cuda_toolkit, mmcv_check, elf_reader = _import_installer(
    'cuda_setup', 'cuda_archs', 'cuda_toolkit', 'mmcv_check', 'elf_reader')
SetupError = cuda_setup.SetupError
assemble_cuda_home, compiler_requirements = (cuda_toolkit.assemble_cuda_home,
                                             cuda_toolkit.compiler_requirements)
covers, read_pins, torch_requirements = (cuda_setup.covers, cuda_setup.read_pins,
                                         cuda_setup.torch_requirements)
default_arch_list, torch_cuda_archs = cuda_archs.default_arch_list, cuda_archs.torch_cuda_archs
toolkit_problems, wanted_flavor = cuda_toolkit.toolkit_problems, cuda_setup.wanted_flavor

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
        ['cuda-toolkit[nvcc,cccl,crt,nvvm]==13.0.3.0']
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
    home = assemble_cuda_home(cuda_toolkit.cuda_trees(str(tmp_path), '13.0'),
                              str(tmp_path / 'venv' / 'cuda'))
    assert os.path.realpath(os.path.join(home, 'lib64', 'libcudart.so')) == \
        os.path.join(tree, 'lib', 'libcudart.so.13')
    assert not os.path.exists(os.path.join(tree, 'lib', 'libcudart.so'))  # site-packages untouched
    assert cuda_toolkit.nvcc_version(home) == '13.0'
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
    home = assemble_cuda_home(cuda_toolkit.cuda_trees(str(tmp_path), '12.6'),
                              str(tmp_path / 'cuda'))
    assert toolkit_problems(home, '12.6', cuda_toolkit.nvcc_version(home)) == []
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
    assert wanted_flavor({}, nvidia=False) == dict(kind='cpu', torch=metadata.version('torch'))
    forced = wanted_flavor({'FORCE_CUDA': '1'}, nvidia=False)
    assert forced['kind'] == 'cuda' and forced['cuda'] == torch.version.cuda
    assert forced['archs'] == default_arch_list(archs)
    assert wanted_flavor({'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'},
                         nvidia=False)['archs'] == '9.0'
    # NVIDIA hardware this torch cannot use (it sees no GPU here): stop, or the CPU on request
    with pytest.raises(SetupError, match='cannot use it.*CONVNEUR_TORCH_BUILD=cu126.*'
                                         'CONVNEUR_ALLOW_CPU=1'):
        wanted_flavor({}, nvidia=True)
    assert wanted_flavor({'CONVNEUR_ALLOW_CPU': '1'}, nvidia=True)['kind'] == 'cpu'
    assert wanted_flavor({'CUDA_VISIBLE_DEVICES': ''}, nvidia=True)['kind'] == 'cpu'


def test_stamp_records_the_flavor(tmp_path, monkeypatch):
    """A second set-up is a no-op only if the requirements and the flavor match."""
    monkeypatch.setattr(cuda_setup, 'nvidia_present', lambda *a: False)
    for var in ('FORCE_CUDA', 'TORCH_CUDA_ARCH_LIST'):
        monkeypatch.delenv(var, raising=False)
    stamp = tmp_path / 'stamp'
    stamp.write_text('abc\n' + json.dumps(dict(kind='cpu', torch=torch.__version__)) + '\n')
    assert cuda_setup.main(['stamp-ok', str(stamp), 'abc']) == 0
    assert cuda_setup.main(['stamp-ok', str(stamp), 'other']) == 1
    monkeypatch.setenv('FORCE_CUDA', '1')  # now a CUDA build is wanted: rebuild
    assert cuda_setup.main(['stamp-ok', str(stamp), 'abc']) == 1


def test_max_jobs():
    assert cuda_toolkit.max_jobs({'MAX_JOBS': '3'}) == '3'
    assert 1 <= int(cuda_toolkit.max_jobs({})) <= os.cpu_count()


# ---- the version query of mmcv's ops runs in a child process: it can
# segfault while mmcv's CUDA kernels work
SEGFAULT = 'import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n'


def fake_elf(path, needed):
    """A minimal 64-bit little-endian ELF file whose dynamic section names
    ``needed`` (its string table at an address other than its file offset)."""
    strtab, offsets = b'\0', []
    for name in needed:
        offsets.append(len(strtab))
        strtab += name.encode() + b'\0'
    base, dyn_off = 0x1000, 64 + 2 * 56
    str_off = dyn_off + 16 * (len(needed) + 3)
    dynamic = b''.join(struct.pack('<qQ', 1, o) for o in offsets)  # DT_NEEDED
    dynamic += struct.pack('<qQqQqQ', 5, base + str_off, 10, len(strtab), 0, 0)
    size = str_off + len(strtab)
    header = b'\x7fELF\x02\x01\x01' + bytes(9) + struct.pack(
        '<HHIQQQIHHHHHH', 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack('<IIQQQQQQ', 1, 5, 0, base, base, size, size, 0x1000)
    dyn = struct.pack('<IIQQQQQQ', 2, 6, dyn_off, base + dyn_off, base + dyn_off, len(dynamic),
                      len(dynamic), 8)
    path.write_bytes(header + load + dyn + dynamic + strtab)
    return str(path)


def test_version_query_survives_a_segfault(monkeypatch):
    monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: None)
    found = mmcv_check.mmcv_ops_version(SEGFAULT)
    assert found.cuda is None and found.compiler is None
    assert found.error == 'mmcv.ops.get_compiling_cuda_version() crashed (signal 11: SIGSEGV)'
    assert "_ext library was not found" in found.elf


def test_version_query_answers_from_the_child():
    assert mmcv_check.mmcv_ops_version('print("13.0")\nprint("GCC 12.2")') == \
        mmcv_check.MmcvOpsVersion('13.0', 'GCC 12.2')
    # the CUDA version answered, then get_compiler_version() crashed: keep the answer
    found = mmcv_check.mmcv_ops_version('print("13.0", flush=True)\n' + SEGFAULT)
    assert (found.cuda, found.compiler, found.elf) == ('13.0', None, None)
    assert 'get_compiler_version() crashed (signal 11: SIGSEGV)' in found.error


def test_version_query_failure_and_timeout(monkeypatch):
    monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: None)
    failed = mmcv_check.mmcv_ops_version('raise ImportError("no mmcv._ext")')
    assert 'failed (exit status 1: ImportError: no mmcv._ext)' in failed.error
    assert 'timed out after 1 s' in mmcv_check.mmcv_ops_version('import time; time.sleep(30)',
                                                                timeout=1).error


def test_version_falls_back_to_the_elf_file(tmp_path, monkeypatch):
    """The query crashed: the CUDA major comes from _ext's NEEDED libcudart.so.N."""
    ext = fake_elf(tmp_path / '_ext.so', ['libc10.so', 'libcudart.so.13', 'libc.so.6'])
    assert elf_reader.elf_needed(ext) == ['libc10.so', 'libcudart.so.13', 'libc.so.6']
    assert elf_reader.cudart_major(ext) == '13'
    monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: ext)
    found = mmcv_check.mmcv_ops_version(SEGFAULT)
    assert found.cuda == '13' and 'SIGSEGV' in found.error
    assert found.elf == f'major only, read from {ext}: NEEDED libcudart.so.13'
    cpu = fake_elf(tmp_path / 'cpu.so', ['libc10.so'])  # a CPU build links no libcudart
    monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: cpu)
    assert mmcv_check.mmcv_ops_version(SEGFAULT).cuda == 'not available'
    (tmp_path / 'junk.so').write_bytes(b'libcudart.so.13')  # not ELF: unknown, not guessed
    monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: str(tmp_path / 'junk.so'))
    found = mmcv_check.mmcv_ops_version(SEGFAULT)
    assert found.cuda is None and 'could not be read' in found.elf


def test_elf_reader_on_real_libraries():
    """What the linker wrote: mmcv's _ext and torch's CUDA library."""
    assert 'libc10.so' in elf_reader.elf_needed(mmcv_check.mmcv_ext_path())
    c10_cuda = os.path.join(os.path.dirname(torch.__file__), 'lib', 'libc10_cuda.so')
    if torch.version.cuda and os.path.exists(c10_cuda):
        assert elf_reader.cudart_major(c10_cuda) == torch.version.cuda.split('.')[0]


@pytest.fixture
def mmcv_ext(tmp_path, monkeypatch):
    """Make the version query crash, and mmcv's _ext a fake ELF file that
    NEEDs these libraries."""
    monkeypatch.setattr(mmcv_check, 'VERSION_QUERY', SEGFAULT)

    def link(*needed):
        path = fake_elf(tmp_path / '_ext.so', list(needed))
        monkeypatch.setattr(mmcv_check, 'mmcv_ext_path', lambda: path)
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
        mmcv_check.check_install(CUDA)


@pytest.mark.parametrize('answer,ok', [('13.0', True), ('12.6', False), ('not available', False)])
def test_check_compares_major_and_minor_when_the_query_works(monkeypatch, answer, ok):
    monkeypatch.setattr(mmcv_check, 'VERSION_QUERY', f'print({answer!r})\nprint("GCC")')
    if ok:
        assert f'mmcv ops compiled with CUDA 13.0 for archs {DEFAULT}' in \
            mmcv_check.check_install(CUDA)
    else:
        with pytest.raises(SetupError, match=f"get_compiling_cuda_version\\(\\) is '{answer}', "
                                             "not torch's CUDA 13.0"):
            mmcv_check.check_install(CUDA)


def test_probe_survives_a_crashing_version_query(mmcv_ext):
    mmcv_ext('libcudart.so.13')
    assert mmcv_check.probe_mmcv() == dict(kind='cuda', torch=torch.__version__, cuda='13',
                                           archs=None)
    mmcv_ext('libc10.so')
    assert mmcv_check.probe_mmcv() == dict(kind='cpu', torch=torch.__version__)


def test_torch_archs_without_a_gpu(monkeypatch):
    """Before torch 2.13 get_arch_list() is empty without a usable GPU (a
    build host): the archs still come from torch's compiled flags."""
    if getattr(torch._C, '_cuda_getArchFlags', None) is None or torch.version.cuda is None:
        pytest.skip('torch without CUDA archs')
    compiled = torch._C._cuda_getArchFlags().split()
    assert compiled and all(a.startswith(('sm_', 'compute_')) for a in compiled)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: [])
    assert torch_cuda_archs() == compiled


@pytest.mark.parametrize('capability,runs', [
    ((7, 0), False),  # V100: below CUDA 13's sm_75
    ((7, 5), True), ((8, 9), True),  # L40 / RTX 4090: runs sm_86 code
    ((12, 1), True),  # runs sm_120 code
])
def test_gpus_torch_has_no_kernels_for_stop_the_setup(monkeypatch, capability, runs):
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: TORCH_13)
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    problem = cuda_setup.torch_cannot_use_gpus([capability])
    if runs:
        assert problem is None
    else:
        assert f'not for sm_{capability[0]}{capability[1]}' in problem
        assert 'CONVNEUR_TORCH_BUILD=cu126' in problem


def test_a_cpu_only_torch_beside_nvidia_hardware(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', None)
    assert 'CPU-only build' in cuda_setup.torch_cannot_use_gpus([])


def test_nvidia_hardware_is_found_by_its_driver_or_nvidia_smi(tmp_path):
    proc = tmp_path / 'version'
    assert not cuda_setup.nvidia_present(str(proc), None)
    proc.write_text('NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n')
    assert cuda_setup.nvidia_present(str(proc), None)
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\nexit 9\n')  # installed, but no driver to ask
    smi.chmod(0o755)
    assert not cuda_setup.nvidia_present(str(tmp_path / 'missing'), str(smi))
    smi.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3"\n')
    assert cuda_setup.nvidia_present(str(tmp_path / 'missing'), str(smi))


@pytest.mark.parametrize('version,existing_venv', [('3.9.18', False), ('3.13.1', False),
                                                   ('3.9.18', True)])
def test_an_interpreter_the_pins_have_no_wheels_for_is_refused_up_front(tmp_path, version,
                                                                         existing_venv):
    """The pins (torch 2.13, numpy < 2) have wheels for Python 3.10 to 3.12:
    another interpreter stops the set-up before it makes or touches a venv,
    saying which Python to use; a venv made with one is named for removal."""
    import subprocess
    major_minor = tuple(int(part) for part in version.split('.')[:2])
    fake = tmp_path / 'python_fake'
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "Python {version}"; exit 0; }}\n'
                    f'[ "$1" = -c ] && exec {sys.executable} -c "import sys; '
                    f'sys.version_info = {major_minor}; $2"\nexit 97\n')
    fake.chmod(0o755)
    venv = tmp_path / 'venv'
    env = dict(os.environ, VENV=str(venv), PYTHON=str(fake if not existing_venv else 'python3'))
    if existing_venv:
        (venv / 'bin').mkdir(parents=True)
        (venv / 'bin' / 'python').symlink_to(fake)
    run = subprocess.run(['bash', osp.join(SETUP, 'setup_env.sh')], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert 'needs Python 3.10 to 3.12' in run.stderr and f'Python {version}' in run.stderr
    assert ('remove ' + str(venv)) in run.stderr if existing_venv else not venv.exists()
    assert 'preparing' not in run.stdout
