"""tests.interpreted: an interpreter run is made once per test run, whichever
pytest-xdist worker reads it, and a worker's end leaves the run to the others
(CPU)."""
import os
import time

import pytest

from ..interpreted import InterpreterRuns, main

SLEEP = 'CONVNEUR_TEST_RUN_SLEEP_S'  # how long the run below takes


def process_results() -> dict:
    """What the run reports: which process made it."""
    time.sleep(float(os.environ.get(SLEEP, '0')))
    return {'pid': os.getpid()}


KEY = ('process_results', __name__)


@pytest.fixture
def two_workers():
    workers = InterpreterRuns(), InterpreterRuns()
    yield workers
    for worker in workers:
        worker.stop_all()


def test_a_run_is_made_once_for_every_worker_that_reads_it(tmp_path, two_workers, monkeypatch):
    pytest.importorskip('triton')
    monkeypatch.setenv(SLEEP, '2')  # still going when the other worker asks
    maker, reader = two_workers
    maker.begin(tmp_path, [KEY])
    reader.begin(tmp_path, [])
    read_first = reader.result(*KEY)  # waits for the maker's run, or makes it first
    assert maker.result(*KEY) == read_first
    assert [path.name for path in tmp_path.glob('*.json')] == [f'{__name__}.process_results.json']


def test_a_run_ended_with_its_worker_is_made_by_the_next_reader(tmp_path, two_workers,
                                                                 monkeypatch):
    pytest.importorskip('triton')
    monkeypatch.setenv(SLEEP, '60')
    ending, reader = two_workers
    ending.begin(tmp_path, [KEY])
    deadline = time.monotonic() + 60
    while not ending._children:  # the run has started
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = ending._children[0].pid
    ending.stop_all()
    assert not list(tmp_path.glob('*.json'))
    monkeypatch.setenv(SLEEP, '0')
    reader.begin(tmp_path, [])
    assert reader.result(*KEY)['pid'] != killed
    with pytest.raises(pytest.fail.Exception, match='was stopped'):  # no run after the end
        ending.result('process_results', 'tests.test_helpers.another_module')


if __name__ == '__main__':  # the subprocess of InterpreterRuns
    main(globals())
