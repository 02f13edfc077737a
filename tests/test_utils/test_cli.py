"""convneur_mm.utils.cli: the argument types and output check the tools share."""
import argparse
import math

import pytest

from convneur_mm.utils.cli import (check_writable, non_negative_float, positive_float,
                                   positive_int, writable_dir, writable_file)


def test_positive_int():
    assert positive_int('1') == 1 and positive_int(' 16 ') == 16
    for text, message in (('0', 'got 0'), ('-2', 'got -2'), ('1.5', 'not an integer'),
                          ('', 'not an integer')):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)


def test_floats():
    assert positive_float('0.5') == 0.5 and non_negative_float('0') == 0
    for text in ('0', '-1', 'nan', 'x'):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(text)
    assert non_negative_float('inf') == math.inf
    for text in ('-0.1', 'nan'):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_float(text)


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / 'new.json'))  # a new file in an existing directory
    assert not list(tmp_path.iterdir())  # the check leaves nothing behind
    (tmp_path / 'file').write_text('')
    check_writable(str(tmp_path / 'file'))
    with pytest.raises(ValueError, match='does not exist'):
        check_writable(str(tmp_path / 'missing' / 'x.json'))
    with pytest.raises(ValueError, match='is a directory'):
        check_writable(str(tmp_path))
    check_writable(str(tmp_path / 'a' / 'b'), directory=True)  # made later, by the tool
    assert not (tmp_path / 'a').exists()
    with pytest.raises(ValueError, match='not a directory'):
        check_writable(str(tmp_path / 'file'), directory=True)
    with pytest.raises(ValueError, match='not a directory'):
        check_writable(str(tmp_path / 'file' / 'sub'), directory=True)
    with pytest.raises(ValueError, match='cannot write in /proc'):  # also as root
        check_writable('/proc/x.json')


def test_argparse_types_report_why(tmp_path):
    assert writable_file(str(tmp_path / 'x')) == str(tmp_path / 'x')
    assert writable_dir(str(tmp_path / 'd')) == str(tmp_path / 'd')
    with pytest.raises(argparse.ArgumentTypeError, match='does not exist'):
        writable_file('/nonexistent/x.json')
    with pytest.raises(argparse.ArgumentTypeError, match='cannot write in /proc'):
        writable_dir('/proc/new')
