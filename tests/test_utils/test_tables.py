"""The one Markdown table printer."""
import pytest

from convneur_mm.utils.tables import markdown_table
from tests.markdown import table_rows


def test_cells_are_printed_as_given_one_line_per_row():
    table = markdown_table(('model', 'top-1'), [('ConvNeur-M3', '80.0'), ('R50', '-')])
    # '80.0' stays '80.0' (no number parsing: 80), '-' stays a cell, no padding
    assert table.splitlines() == ['| model | top-1 |', '|---|---|', '| ConvNeur-M3 | 80.0 |',
                                  '| R50 | - |']
    assert table_rows(table) == [('model', 'top-1'), ('ConvNeur-M3', '80.0'), ('R50', '-')]
    assert markdown_table(('a', 'b'), []) == '| a | b |\n|---|---|'


def test_a_pipe_inside_a_cell_is_escaped():
    table = markdown_table(('a', 'b'), [('x | y', 1)])
    assert table_rows(table)[1] == (r'x \| y', '1')


@pytest.mark.parametrize('rows, match', [([('only one', )], 'row 0 has 1 cells for 2'),
                                         ([('a\nb', 'c')], 'line break')])
def test_bad_rows_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        markdown_table(('a', 'b'), rows)
