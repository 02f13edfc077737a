"""convneur_mm/analysis/before_checkout.py: an analysis of this tree run
against another checkout's package."""
import os.path as osp

import pytest

import convneur_mm
from convneur_mm.analysis.before_checkout import run_in_checkout
from convneur_mm.analysis.op_counts import OWN_MODULES, count_ops
from . import checkout_probe
from ..paths import REPO


@pytest.fixture
def checkout(tmp_path):
    """A checkout whose package has a module of its own and a dispatch_probes
    that is not this tree's."""
    for name, text in (('__init__.py', ''), ('marker.py', ''),
                       ('testing/__init__.py', ''),
                       ('testing/dispatch_probes.py', 'OLD = True\n')):
        path = tmp_path / 'convneur_mm' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_package_is_the_checkouts_and_own_modules_are_this_trees(checkout):
    assert run_in_checkout(str(checkout), checkout_probe.module_file,
                           dict(name='convneur_mm.marker')) == \
        str(checkout / 'convneur_mm' / 'marker.py')
    probes = 'convneur_mm.testing.dispatch_probes'
    assert run_in_checkout(str(checkout), checkout_probe.module_file, dict(name=probes)) == \
        str(checkout / 'convneur_mm' / 'testing' / 'dispatch_probes.py')
    here = osp.join(osp.dirname(convneur_mm.__file__), 'testing', 'dispatch_probes.py')
    assert run_in_checkout(str(checkout), checkout_probe.module_file, dict(name=probes),
                           own_modules=[probes]) == here


def test_a_directory_without_the_package_and_a_failing_child_are_errors(checkout, tmp_path):
    with pytest.raises(ValueError, match='has no convneur_mm/__init__.py'):
        run_in_checkout(str(tmp_path / 'nothing'), checkout_probe.module_file, dict(name='os'))
    with pytest.raises(RuntimeError, match='fails on purpose'):
        run_in_checkout(str(checkout), checkout_probe.fail, {})


def test_counting_ops_against_this_tree_as_a_checkout_counts_the_same():
    kwargs = dict(arch='m1', size=64, batch=2, device='meta')
    assert run_in_checkout(REPO, count_ops, kwargs, OWN_MODULES) == count_ops(**kwargs)
