"""Packaging of ConvNeur-MM.

Like the OpenMMLab packages, the wheel carries ``configs/`` and ``tools/``
under ``convneur_mm/.mim/`` so that an installed (non-editable) package has its
configs; ``convneur_mm.utils.paths`` finds them in both layouts.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
MIM_DIRS = ('configs', 'tools')


class BuildPyWithMim(build_py):
    """Copy configs/ and tools/ into the built package as ``.mim/``."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return  # an editable install reads them from the repository
        for name in MIM_DIRS:
            target = os.path.join(self.build_lib, 'convneur_mm', '.mim', name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(HERE, name), target,
                            ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


def read_version():
    scope = {}
    with open(os.path.join(HERE, 'convneur_mm', 'version.py')) as f:
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
    python_requires='>=3.9',
    packages=find_packages(include=['convneur_mm', 'convneur_mm.*']),
    cmdclass={'build_py': BuildPyWithMim},
    # The stack is installed by tools/setup_env.sh in the order its builds
    # need (see requirements/). mmcv is deliberately not listed: pip would
    # build it in an isolated environment, silently without its C++ ops.
    install_requires=['torch>=2.1', 'mmengine>=0.10.0,<1.0'],
    extras_require={'tools': read_requirements('openmmlab.txt')},
    zip_safe=False,
)
