"""Size arithmetic that stays simple under symbolic shapes (torch.compile's
dynamic shapes, torch.export)."""
from torch.fx.experimental.symbolic_shapes import statically_known_true


def known_zero(*sizes) -> bool:
    """Whether every size is zero without a guard: True for plain ints that
    are 0, False for a symbolic size even where its value is 0, so that code
    which skips work for zero sizes takes, for symbolic ones, the path that
    serves every value instead of guarding (a recompilation per outcome)."""
    return all(statically_known_true(s == 0) for s in sizes)


def ceil_div(size: int, divisor: int) -> int:
    """``ceil(size / divisor)`` in integers (exact for any size, symbolic too)."""
    return (size + divisor - 1) // divisor


def ceil_to(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``size``, written as
    a ceiling: under symbolic sizes nested ceilings stay small expressions,
    nested remainders (size + (-size) % multiple) do not."""
    return ceil_div(size, multiple) * multiple
