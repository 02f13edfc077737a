"""convneur_mm.testing.errors: errors combined so that a NaN fails a bound."""
import math

import torch

from convneur_mm.testing.errors import least, worst


def test_the_worst_error_is_nan_when_any_error_is():
    """A NaN output (an unwritten tile) must fail ``worst(errors) < tol``
    wherever it comes among the errors."""
    assert max([1e-7, float('nan')]) == 1e-7  # the pattern it replaces lets a NaN through
    assert math.isnan(worst([1e-7, float('nan'), 2e-7]))
    assert not worst([1e-7, float('nan')]) < 1.0
    assert worst(iter([1e-7, 3e-7])) == 3e-7
    assert worst([torch.tensor(2.0), 1.0]) == 2.0 and worst([]) == 0.0


def test_the_least_error_is_nan_when_any_error_is():
    """Results that must differ (``least(errors) > bound``) fail on a NaN too."""
    assert min([5.0, float('nan')]) == 5.0  # the pattern it replaces
    assert math.isnan(least([5.0, float('nan'), 4.0]))
    assert not least([5.0, float('nan')]) > 1.0
    assert least(iter([5.0, 4.0])) == 4.0 and least([]) == math.inf
