"""convneur_mm/analysis/isolated.py: one function in a fresh process, of this
tree's package or of another checkout's."""
import os
import os.path as osp

import pytest

import convneur_mm
from convneur_mm.analysis.isolated import run_isolated
from . import checkout_probe


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


def test_runs_the_function_in_another_process_with_this_trees_package():
    got = run_isolated(checkout_probe.where, dict(a=2, b=3))
    assert got['sum'] == 5 and got['pid'] != os.getpid()
    assert run_isolated(checkout_probe.module_file, dict(name='convneur_mm')) == \
        convneur_mm.__file__


def test_a_failure_raises_with_the_childs_error():
    with pytest.raises(RuntimeError, match='checkout_probe.fail failed') as info:
        run_isolated(checkout_probe.fail, {})
    assert 'the probe fails on purpose' in str(info.value)


def test_the_package_is_the_checkouts_and_own_modules_are_this_trees(checkout):
    assert run_isolated(checkout_probe.module_file, dict(name='convneur_mm.marker'),
                        str(checkout)) == str(checkout / 'convneur_mm' / 'marker.py')
    probes = 'convneur_mm.testing.dispatch_probes'
    assert run_isolated(checkout_probe.module_file, dict(name=probes), str(checkout)) == \
        str(checkout / 'convneur_mm' / 'testing' / 'dispatch_probes.py')
    here = osp.join(osp.dirname(convneur_mm.__file__), 'testing', 'dispatch_probes.py')
    assert run_isolated(checkout_probe.module_file, dict(name=probes), str(checkout),
                        own_modules=[probes]) == here


def test_a_directory_without_the_package_and_a_failing_child_are_errors(checkout, tmp_path):
    with pytest.raises(ValueError, match='has no convneur_mm/__init__.py'):
        run_isolated(checkout_probe.module_file, dict(name='os'), str(tmp_path / 'nothing'))
    with pytest.raises(RuntimeError, match='fails on purpose'):
        run_isolated(checkout_probe.fail, {}, str(checkout))
