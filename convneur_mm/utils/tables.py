"""The one Markdown table printer of the package and its tools.

Cells are printed as given: callers format their numbers (precision, units,
'-' for a missing value), so tabulate's number parsing is off. Cells are not
padded to a column width: each row reads ``| a | b |`` whatever the other
rows hold, which keeps the output stable for the scripts and tests that read
it (the demos, CI logs) and renders the same.
"""
from typing import Iterable, List, Sequence

from tabulate import tabulate


def _cell(value: object) -> str:
    text = str(value)
    if '\n' in text:
        raise ValueError(f'a Markdown table cell cannot hold a line break: {text!r}')
    return text.replace('|', r'\|')  # a bare '|' would split the cell


def markdown_table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, one ``| a | b |`` line per row.

    Args:
        headers: the column names.
        rows: one sequence of cells per row, each as long as ``headers``;
            cells are turned into text with ``str``.

    Returns:
        The table, without a trailing newline.
    """
    headers = [_cell(h) for h in headers]
    body: List[List[str]] = []
    for i, row in enumerate(rows):
        row = [_cell(c) for c in row]
        if len(row) != len(headers):
            raise ValueError(f'table row {i} has {len(row)} cells for {len(headers)} '
                             f'columns: {row}')
        body.append(row)
    lines = tabulate(body, headers=headers, tablefmt='github', stralign=None,
                     disable_numparse=True).split('\n')
    lines[1] = '|' + '---|' * len(headers)  # tabulate's is as wide as padded columns
    return '\n'.join(lines)
