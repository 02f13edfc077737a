"""Combining errors so that a NaN cannot pass a bound: Python's ``max`` and
``min`` keep whichever of a NaN and a number comes first, so a NaN error (an
unwritten tile, a diverged output) would slip past ``max(errors) < tol``
unless it came first. ``worst`` and ``least`` are NaN when any error is."""
import math
from typing import Iterable, List


def _floats(errors: Iterable) -> List[float]:
    return [float(e.detach()) if hasattr(e, 'detach') else float(e) for e in errors]


def worst(errors: Iterable) -> float:
    """The largest of ``errors`` (0 for none), or NaN if any is NaN: for a
    bound every error must stay below.

    Args:
        errors: numbers, or tensors of one element.
    """
    values = _floats(errors)
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)


def least(errors: Iterable) -> float:
    """The smallest of ``errors`` (infinity for none), or NaN if any is NaN:
    for a bound every error must exceed (results that must differ).

    Args:
        errors: numbers, or tensors of one element.
    """
    values = _floats(errors)
    return math.nan if any(math.isnan(v) for v in values) else min(values, default=math.inf)
