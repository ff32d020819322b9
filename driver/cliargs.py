"""argparse types shared by the command lines (vfsdrv's and the reference device's):
a bad value is a usage error naming the option, never a traceback later."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

#: the longest timeout or duration taken: 11 days is forever here, and four times it
#: still fits the clocks select() and friends take (a 32-bit second count does not)
MAX_SECONDS = 1_000_000


#: exit status of a command whose reader went away (128 + SIGPIPE, as a shell shows it)
BROKEN_PIPE_STATUS = 141


def broken_pipe_exit() -> int:
    """The reader of our output went away (`vfsdrv status | head`): no traceback.
    Standard output then goes nowhere, so that the flush at exit fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


def seconds(text: str) -> float:
    """A positive, finite number of seconds (2, 0.5, 1e3)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: seconds must be more than 0 and at most {MAX_SECONDS}")
    return value


def fs_tag(text: str) -> str:
    """A virtio-fs tag: 1 to 36 bytes of UTF-8 without NUL (what config space holds)."""
    from .errors import ConfigError
    from .fs.config import encode_tag

    try:
        encode_tag(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def nonempty_path(text: str) -> str:
    """A path that is not empty (an empty one would mean the current directory to
    realpath() and friends: a mount over it, a socket named after nothing)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file or directory name")
    return text


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: from {lo} to {hi}")
        return value
    return parse


#: a FUSE notification code: fuse_out_header.error of a notification, a positive
#: 32-bit signed integer
notify_code = int_range(1, 0x7FFFFFFF)
