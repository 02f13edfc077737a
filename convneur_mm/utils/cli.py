"""Argument checks shared by the command-line tools.

An impossible option (a count of 0, an output nobody can write) is a usage
error at start: argparse prints the usage and exits 2, instead of a traceback
after minutes of measuring or a silent default (``--batch 0`` meaning 16).
"""
import argparse
import os
import os.path as osp
import tempfile


def positive_int(text: str) -> int:
    """argparse type of counts (iterations, repeats, batch sizes, GPUs): an
    integer >= 1; 0 and below divide by zero, index empty lists or fall back
    to defaults deep inside the tools."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not an integer: {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def positive_float(text: str) -> float:
    """argparse type of sizes and rates that must be above 0 (a GPU's GiB)."""
    value = _float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f'must be a number above 0, got {text}')
    return value


def non_negative_float(text: str) -> float:
    """argparse type of amounts that may be 0 but not negative (a reserve)."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be a number >= 0, got {text}')
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None


def check_writable(path: str, directory: bool = False) -> None:
    """Raise ValueError saying why ``path`` cannot be written: a file whose
    directory is missing or read-only, or (``directory``) a directory that
    cannot be made. Called at start, so that the results measured later are
    not lost to a typo in the output's path."""
    if directory:
        if osp.exists(path) and not osp.isdir(path):
            raise ValueError(f'{path} exists and is not a directory')
        parent = osp.abspath(path)  # the nearest existing ancestor gets the new directories
        while not osp.exists(parent):
            parent = osp.dirname(parent)
        if not osp.isdir(parent):
            raise ValueError(f'cannot make {path}: {parent} is not a directory')
    else:
        if osp.isdir(path):
            raise ValueError(f'{path} is a directory')
        parent = osp.dirname(osp.abspath(path))
        if not osp.isdir(parent):
            raise ValueError(f'the directory {parent} does not exist')
        if osp.exists(path) and not os.access(path, os.W_OK):
            raise ValueError(f'{path} is not writable')
    try:  # a file made and removed there: exact also for root and read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(f'cannot write in {parent}: {error.strerror or error}') from None


def writable_file(text: str) -> str:
    """argparse type of an output file: ``check_writable``'s error as a usage error."""
    try:
        check_writable(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def writable_dir(text: str) -> str:
    """argparse type of an output directory (made later if missing)."""
    try:
        check_writable(text, directory=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
