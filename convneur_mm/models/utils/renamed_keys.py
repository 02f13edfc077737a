"""Renamed configuration keys: an old name keeps working, as an argument
and as an attribute, with a ``FutureWarning`` naming the new one (as
MMEngine's ``deprecated_api_warning`` does), and an old name given beside
its new one is an error."""
import functools
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Type


def with_renamed_keys(kwargs: Mapping[str, Any], renamed: Mapping[str, str], owner: str,
                      stacklevel: int = 2) -> Dict[str, Any]:
    """A copy of ``kwargs`` with each old key of ``renamed`` under its new
    name, warning once for each old key found.

    Args:
        kwargs: keyword arguments, or a config dict.
        renamed: old key -> new key.
        owner: what takes the keys, for the messages ('NeuralMemory',
            'memory_cfg').
        stacklevel: ``warnings.warn``'s, counted from this function (2: its
            caller).

    Raises:
        ValueError: an old key and its new key are both given.
    """
    out = dict(kwargs)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f'{owner} got both {old!r} and {new!r}: {old!r} is the '
                             f'deprecated name of {new!r}; give {new!r} alone')
        warnings.warn(f'{owner}: {old!r} is deprecated; use {new!r} (the same values)',
                      FutureWarning, stacklevel=stacklevel)
        out[new] = out.pop(old)
    return out


def accepts_renamed_keys(renamed: Mapping[str, str]) -> Callable[[Type], Type]:
    """Decorate a class so that its constructor takes the old keyword names
    of ``renamed`` (``with_renamed_keys``) and its instances read and write
    the old attribute names as the new ones, each with a
    ``FutureWarning``: a script that sets the old attribute keeps
    working instead of setting an attribute nothing reads.

    Args:
        renamed: old name -> new name (a constructor parameter, kept as an
            attribute of the same name).
    """
    def decorate(cls: Type) -> Type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            # stacklevel 3: the warning points at whoever built the instance
            init(self, *args, **with_renamed_keys(kwargs, renamed, cls.__name__, stacklevel=3))

        cls.__init__ = __init__
        for old, new in renamed.items():
            setattr(cls, old, _RenamedAttribute(cls.__name__, old, new))
        return cls
    return decorate


class _RenamedAttribute:
    """An instance attribute's old name: reads and writes the new one, with
    a ``FutureWarning``."""

    def __init__(self, owner: str, old: str, new: str):
        self.owner, self.old, self.new = owner, old, new

    def _warn(self, stacklevel: int) -> None:
        warnings.warn(f'{self.owner}.{self.old} is deprecated; use {self.owner}.{self.new}',
                      FutureWarning, stacklevel=stacklevel)

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        if instance is None:
            return self
        self._warn(stacklevel=3)
        return getattr(instance, self.new)

    def __set__(self, instance: Any, value: Any) -> None:
        # stacklevel 4: past the ``__setattr__`` of an ``nn.Module``
        self._warn(stacklevel=4)
        setattr(instance, self.new, value)
