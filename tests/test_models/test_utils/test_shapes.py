"""Size arithmetic: exact ceilings, also for the sizes the export and the
detection buckets use."""
import math

import pytest

from convneur_mm.models.utils.shapes import ceil_div, ceil_to


@pytest.mark.parametrize('size', [0, 1, 6, 7, 8, 9, 799, 800, 801, 1333])
@pytest.mark.parametrize('divisor', [1, 4, 7, 32])
def test_ceil_div_and_ceil_to_are_ceilings(size, divisor):
    assert ceil_div(size, divisor) == math.ceil(size / divisor)
    assert ceil_to(size, divisor) == divisor * math.ceil(size / divisor)
    assert ceil_to(size, divisor) % divisor == 0 and 0 <= ceil_to(size, divisor) - size < divisor
