"""One measurement in a fresh process: its result comes back, its failure says why."""
import pytest

from convneur_mm.analysis.isolated import run_isolated

MODULE = '''
import os

def where(a, b):
    return dict(sum=a + b, pid=os.getpid())

def fails():
    print('noise on stdout')
    raise ValueError('the reason')
'''


def test_runs_the_function_in_another_process(tmp_path):
    import os
    path = tmp_path / 'probe.py'
    path.write_text(MODULE)
    got = run_isolated(str(path), 'where', dict(a=2, b=3))
    assert got['sum'] == 5 and got['pid'] != os.getpid()


def test_a_failure_raises_with_the_childs_error(tmp_path):
    path = tmp_path / 'probe.py'
    path.write_text(MODULE)
    with pytest.raises(RuntimeError, match='probe.py:fails') as info:
        run_isolated(str(path), 'fails', {})
    assert 'ValueError: the reason' in str(info.value)
