"""Functions that ``run_in_checkout`` runs in its child (standard library at
the top only: the child loads this file before it imports any package)."""
import importlib


def module_file(name: str) -> str:
    """Where the child imports module ``name`` from."""
    return importlib.import_module(name).__file__


def fail() -> None:
    raise RuntimeError('the probe fails on purpose')
