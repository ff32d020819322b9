"""Small helpers for tests that drive the driver's FuseClient against a device."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from vfsdrv.fs.client import OFFSET_MAX, ROOT_ID, FuseClient, Lock
from vfsdrv.refdev.lock_table import F_UNLCK, F_WRLCK

WAIT = 5.0


def whole(type_: int, pid: int = 0) -> Lock:
    """A lock over the whole file."""
    return Lock(0, OFFSET_MAX, type_, pid)


def open_file(c: FuseClient, name: str) -> tuple[int, int]:
    """(nodeid, fh) of a file in the root opened read-write, created if missing."""
    try:
        e = c.lookup(ROOT_ID, name)
        return e.nodeid, c.open(e.nodeid, os.O_RDWR).fh
    except FileNotFoundError:
        e, h = c.create(ROOT_ID, name)
        return e.nodeid, h.fh


def count_under_lock(c: FuseClient, name: str, rounds: int, timeout: float) -> None:
    """`rounds` times: wait for a whole-file write lock on `name` (SETLKW), add one to
    the number the file holds, unlock. Frontends doing this at once lose no count."""
    e = c.lookup(ROOT_ID, name)
    h = c.open(e.nodeid, os.O_RDWR)
    for _ in range(rounds):
        c.setlkw(e.nodeid, h.fh, 1, whole(F_WRLCK), timeout=timeout)
        value = int(c.read(e.nodeid, h.fh, 0, 64))
        c.setattr(e.nodeid, size=0, fh=h.fh)
        c.write(e.nodeid, h.fh, 0, str(value + 1).encode())
        c.setlk(e.nodeid, h.fh, 1, whole(F_UNLCK))
    c.release(e.nodeid, h.fh)


def pump(clients: list[FuseClient], cond: Callable[[], bool], timeout: float = WAIT) -> None:
    """Process completions of every client until `cond()` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        for c in clients:
            c.fs.wait(0.02)


def wait_used(c: FuseClient, queue_index: int, timeout: float = WAIT) -> None:
    """Wait until the device has used something on a queue, without processing it."""
    vq = c.fs.dev.queues[queue_index]
    deadline = time.monotonic() + timeout
    while not vq.has_used():
        assert time.monotonic() < deadline, f"nothing used on queue {queue_index}"
        time.sleep(0.005)
