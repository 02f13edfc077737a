"""Packaging of ConvNeur-MM.

Like the OpenMMLab packages, the installed package carries ``.mim/`` with
``configs/``, ``tools/`` and ``model-index.yml``: MIM (``mim run / train / test
/ search convneur_mm``), MMPretrain's model hub (``convneur_mm.model_index``)
and ``convneur_mm.utils.paths`` read them there.

* A wheel (``pip install .``) gets copies.
* An editable install (``pip install -e .``) gets relative symlinks in the
  repository, ``convneur_mm/.mim/configs -> ../../configs`` and so on, so that
  edits show at once (copies where the file system refuses symlinks), as
  MMDetection's ``setup.py`` does in develop mode. It also writes
  ``convneur_mm.egg-info`` to the repository root, as ``setup.py develop``
  did before PEP 660: MIM 0.3.9 looks a package up as
  ``<pkg_resources location>/convneur_mm``, and a PEP 660 editable install
  keeps its metadata in site-packages, where there is no ``convneur_mm/``.
  Found first on ``sys.path`` (``python -m mim`` from the repository root, or
  the repository on ``PYTHONPATH``), this metadata leads MIM to the repository.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = 'convneur_mm'
MIM_ITEMS = ('configs', 'tools', 'model-index.yml')
# the repository's own development scripts (GPU-machine helpers): not for MIM users
DEV_ONLY = (os.path.join('tools', 'setup'), )  # run from a checkout only


def _remove(path: str) -> None:
    """Remove a file, a symlink (never what it points to) or a directory."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _ignored(directory: str, names: list) -> set:
    rel = os.path.relpath(directory, HERE)
    return ({n for n in names if os.path.join(rel, n) in DEV_ONLY}
            | set(shutil.ignore_patterns('__pycache__', '*.pyc')(directory, names)))


def _copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, ignore=_ignored)
    else:
        shutil.copy2(src, dst)


def add_mim_items(package_dir: str, link: bool) -> None:
    """Put MIM_ITEMS into ``package_dir/.mim``: relative symlinks to the
    repository's files if ``link`` (and the file system allows), else copies."""
    mim_dir = os.path.join(package_dir, '.mim')
    _remove(mim_dir)  # build/ persists between builds: nothing stale may remain
    os.makedirs(mim_dir)
    for name in MIM_ITEMS:
        src, dst = os.path.join(HERE, name), os.path.join(mim_dir, name)
        if link:
            try:
                os.symlink(os.path.relpath(src, mim_dir), dst)
                continue
            except OSError:
                pass
        _copy(src, dst)


def write_repository_egg_info(distribution) -> None:
    """The metadata ``setup.py develop`` left in the repository root (see the
    module docstring): PKG-INFO and top_level.txt are what pkg_resources reads."""
    egg_info = os.path.join(HERE, f'{PACKAGE}.egg-info')
    os.makedirs(egg_info, exist_ok=True)
    with open(os.path.join(egg_info, 'PKG-INFO'), 'w', encoding='utf-8') as f:
        distribution.metadata.write_pkg_file(f)
    with open(os.path.join(egg_info, 'top_level.txt'), 'w', encoding='utf-8') as f:
        f.write(PACKAGE + '\n')


def prepare_editable(distribution) -> None:
    add_mim_items(os.path.join(HERE, PACKAGE), link=True)
    write_repository_egg_info(distribution)


class BuildPyWithMim(build_py):
    """A wheel gets copies in ``.mim``; a PEP 660 editable install (which runs
    build_py in editable mode) gets the links in the repository."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            prepare_editable(self.distribution)
        else:
            add_mim_items(os.path.join(self.build_lib, PACKAGE), link=False)


class DevelopWithMim(develop):
    """``python setup.py develop`` with setuptools < 80 (later ones run pip's
    PEP 660 install, i.e. BuildPyWithMim)."""

    def run(self):
        prepare_editable(self.distribution)
        super().run()


def read_version():
    scope = {}
    with open(os.path.join(HERE, PACKAGE, 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(name):
    with open(os.path.join(HERE, 'requirements', name)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


setup(
    name='convneur-mm',
    version=read_version(),
    description='ConvNeur backbone (global-local decoupling with neural memory) '
                'for MMDetection, MMSegmentation and MMPretrain',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    cmdclass={'build_py': BuildPyWithMim, 'develop': DevelopWithMim},
    # The stack is installed by tools/setup/setup_env.sh (or requirements.txt plus
    # the two commands in its header) in the order its builds need. mmcv is
    # deliberately not listed: pip would build it in an isolated environment,
    # silently without its C++ ops.
    install_requires=['torch>=2.1', 'mmengine>=0.10.0,<1.0'],
    extras_require={'tools': read_requirements('openmmlab.txt')},
    zip_safe=False,
)
