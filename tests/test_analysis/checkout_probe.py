"""Functions that ``run_isolated`` runs in its child (standard library at
the top only: the child loads this file before it imports any package)."""
import importlib


def module_file(name: str) -> str:
    """Where the child imports module ``name`` from."""
    return importlib.import_module(name).__file__


def fail() -> None:
    print("noise on stdout")
    raise RuntimeError('the probe fails on purpose')


def where(a: int, b: int) -> dict:
    """Their sum and the process that computed it (printing on the way)."""
    import os
    print('noise on stdout')
    return dict(sum=a + b, pid=os.getpid())
