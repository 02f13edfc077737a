"""requirements.txt installs the stack of tools/setup/setup_env.sh.

requirements.txt includes what pip can install from a requirements file and
names, in its header, the commands for the rest (flags pip takes only on its
command line). These tests compare it with whatever requirements/ holds and
tools/setup/setup_env.sh installs, so a new requirements file, a changed pin or a
changed build flag in one place and not the other fails here.
"""
import glob
import json
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, Set, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .paths import REPO

FLAGS = ('--no-deps', '--no-build-isolation', 'MMCV_WITH_OPS=1')
# `-r FILE`, `-e .`, or the set-up's torch line: it installs requirements/torch.txt
# through a copy that may name another torch build (CONVNEUR_TORCH_BUILD)
TARGET = re.compile(r'(?:-r|torch-requirements\s+\S+)\s+(requirements/[\w.-]+\.txt)'
                    r'|-e\s+(\.)(?=\s|$)')


def _install_lines(path: str, commented: bool):
    """The lines that install a requirements file or the package: a shell
    script's commands, or the ``pip install`` commands in a file's comments."""
    with open(path) as f:
        for line in f:
            text = line.strip()
            if text.startswith('#') != commented or not TARGET.search(text):
                continue
            if not commented or 'pip install' in text:
                yield text.lstrip('# ')


def _targets(lines) -> Dict[str, Tuple[str, ...]]:
    """{requirements file or '.': every flag it is installed with, over all its lines}."""
    targets: Dict[str, Set[str]] = {}
    for line in lines:
        flags = {flag for flag in FLAGS if flag in line.split()}
        for match in TARGET.finditer(line):
            targets.setdefault(match.group(1) or match.group(2), set()).update(flags)
    return {target: tuple(sorted(flags)) for target, flags in targets.items()}


def _requirement_lines(path: str):
    with open(path) as f:
        for line in f:
            text = line.split('#')[0].strip()
            if text and not text.startswith('-'):
                yield text


def test_requirements_txt_and_setup_env_install_the_same_files_the_same_way():
    setup_env = _targets(_install_lines(osp.join(REPO, 'tools', 'setup', 'setup_env.sh'), False))
    assert {'requirements/torch.txt', 'requirements/mmcv.txt', '.'} <= set(setup_env), setup_env
    requirements_txt = osp.join(REPO, 'requirements.txt')
    with open(requirements_txt) as f:
        included = {m.group(1): () for m in re.finditer(r'^-r\s+(\S+)$', f.read(), re.M)}
    header = _targets(_install_lines(requirements_txt, True))
    assert not set(included) & set(header)
    assert {**included, **header} == setup_env


def test_every_requirements_file_parses_and_pins_agree_across_files():
    specs: Dict[str, Set[Tuple[str, str]]] = {}
    files = sorted(glob.glob(osp.join(REPO, 'requirements', '*.txt')))
    assert files
    for path in files:
        for line in _requirement_lines(path):
            requirement = Requirement(line)  # raises on a malformed line
            specs.setdefault(canonicalize_name(requirement.name), set()).add(
                (str(requirement.specifier), osp.basename(path)))
    conflicts = {name: found for name, found in specs.items()
                 if len({spec for spec, _ in found}) > 1}
    assert not conflicts, conflicts


def test_this_environment_satisfies_requirements_txt():
    """pip resolves requirements.txt against what is installed (the stack
    setup_env.sh built) and would install or change nothing."""
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index', '--quiet',
         '--disable-pip-version-check', '--report', '-', '-r', 'requirements.txt'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [item['metadata']['name'] for item in report['install']] == []
