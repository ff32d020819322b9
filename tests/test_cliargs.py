"""The argparse types the command lines share (vfsdrv.cliargs)."""

from __future__ import annotations

import argparse

import pytest
from vfsdrv.cliargs import notify_code, seconds


@pytest.mark.parametrize("text,value", [("2", 2.0), ("0.5", 0.5), ("1e3", 1000.0)])
def test_seconds_takes_positive_finite_numbers(text: str, value: float) -> None:
    assert seconds(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "1e400", "4294967296", "x",
                                  ""])
def test_seconds_refuses_the_rest(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        seconds(text)


def test_notify_code_is_a_positive_i32() -> None:
    assert notify_code("7") == 7
    assert notify_code("2147483647") == 2**31 - 1
    for bad in ("0", "-5", "2147483648", "99999999999", "7.0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            notify_code(bad)


def test_int_range() -> None:
    from vfsdrv.cliargs import int_range

    queues = int_range(1, 64)
    assert queues("1") == 1 and queues("64") == 64
    for bad in ("0", "65", "-1", "99999999999999999999", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            queues(bad)
