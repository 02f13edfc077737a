"""The interpreter runs that the memory ops' tests read, as session fixtures:
each run once per session, started early for the selected tests that use
it (``tests/interpreted.py``)."""
import pytest

from ... import interpreted as interpreted_runs

CASES_MODULE = 'tests.test_models.test_memory_ops.memory_cases'
interpreted_runs.FIXTURE_RUNS.update(
    forward_runs=('interpreter_results', CASES_MODULE),  # every op's kernels, forward
    backward_runs=('backward_results', CASES_MODULE),  # and their backward kernels
    custom_op_runs=('custom_op_results', CASES_MODULE))  # the custom operators


def _result(fixture: str) -> dict:
    return interpreted_runs.result(*interpreted_runs.FIXTURE_RUNS[fixture])


@pytest.fixture(scope='session')
def forward_runs() -> dict:
    return _result('forward_runs')


@pytest.fixture(scope='session')
def backward_runs() -> dict:
    return _result('backward_runs')


@pytest.fixture(scope='session')
def custom_op_runs() -> dict:
    return _result('custom_op_runs')
