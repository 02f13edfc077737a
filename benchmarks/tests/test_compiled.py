"""Eager against compiled: the where-the-time-goes table."""
from benchmarks.training import compiled as bench
from tests.markdown import table_rows


def test_compile_breakdown_table_gives_seconds_and_shares():
    seconds = {'convolutions': 3.0, 'matrix products': 2.0, 'other': 2.0}
    table = bench.breakdown_table('train', seconds, dict(seconds, convolutions=1.0))
    assert ('convolutions', '3.000 s (43%)', '1.000 s (20%)', '-2.000 s') in table_rows(table)
