"""Reading the Markdown tables that tools print, whatever their padding."""
import re
from typing import List, Tuple

_SEPARATOR = re.compile(r'^\|[\s:|-]+\|$')


def table_rows(text: str) -> List[Tuple[str, ...]]:
    """The cells, stripped, of every Markdown table line in ``text`` (headers
    included, separator lines skipped)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('|') and line.endswith('|') and not _SEPARATOR.match(line):
            rows.append(tuple(cell.strip() for cell in re.split(r'(?<!\\)\|', line[1:-1])))
    return rows
