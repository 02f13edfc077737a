"""Whether a demo's evaluation landed in its acceptance band.

    python tools/demo/check_band.py {detection,segmentation,classification} TEST_LOG

Reads the last metrics table ``tools/test.py`` printed into TEST_LOG and
checks each banded metric; exit 1 naming what is missing or outside, so that
a run that trained into NaN (an empty COCO table) fails the main job instead
of ending it quietly. The bands are docs/user_guides/demos.md's (a test checks
that the two agree).
"""
import argparse
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# demo -> metric (as the table names it) -> (low, high), both inclusive
BANDS: Dict[str, Dict[str, Tuple[float, float]]] = {
    'classification': {'accuracy/top1': (30, 100), 'accuracy/top5': (90, 100)},
    'segmentation': {'mIoU': (84, 92), 'mAcc': (88, 97), 'aAcc': (95, 98)},
    'detection': {'bbox AP': (75, 95), 'segm AP': (80, 98)},
}


def read_metrics(text: str) -> Dict[str, float]:
    """The metrics of the last ``## CONFIG @ CHECKPOINT`` section: ``| name |
    value |`` rows by name, and the COCO rows (``| bbox | AP | AP50 | ...``)
    as ``'bbox AP'`` etc."""
    sections = re.split(r'^## .*$', text, flags=re.M)
    if len(sections) < 2:
        return {}
    rows = [[c.strip() for c in line.strip().strip('|').split('|')]
            for line in sections[-1].splitlines() if line.startswith('|')]
    metrics, header = {}, None
    for cells in rows:
        if set(''.join(cells)) <= set('-:'):
            continue
        if cells[0] in ('task', 'metric'):
            header = cells
            continue
        if header and header[0] == 'task':
            for name, value in zip(header[1:], cells[1:]):
                number = _number(value)
                if number is not None:
                    metrics[f'{cells[0]} {name}'] = number
        elif len(cells) == 2 and _number(cells[1]) is not None:
            metrics[cells[0]] = _number(cells[1])
    return metrics


def _number(cell: str) -> Optional[float]:
    try:
        return float(cell)
    except ValueError:
        return None


def problems(demo: str, metrics: Dict[str, float]) -> List[str]:
    """What is missing from ``metrics`` or outside ``demo``'s band (empty: in band)."""
    found = []
    for name, (low, high) in BANDS[demo].items():
        if name not in metrics:
            found.append(f'{name}: not in the evaluation output')
        elif not low <= metrics[name] <= high:
            found.append(f'{name} {metrics[name]:g} is outside its band {low:g}-{high:g}')
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('demo', choices=sorted(BANDS))
    parser.add_argument('test_log', help="the demo's tools/test.py output")
    args = parser.parse_args(argv)
    with open(args.test_log, encoding='utf-8', errors='replace') as f:
        found = problems(args.demo, read_metrics(f.read()))
    if found:
        print(f'[{args.demo} demo] outside its acceptance band (docs/user_guides/demos.md): '
              + '; '.join(found), file=sys.stderr)
        return 1
    print(f'[{args.demo} demo] inside its acceptance band')
    return 0


if __name__ == '__main__':
    sys.exit(main())
