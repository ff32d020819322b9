"""Locks end with the open file they belong to, through a real relay mount of the
reference device: OFD locks (F_OFD_SETLK) at the last close, and a new file that
gets an old file's inode number starts with no locks."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from two_mounts import Pair

WHOLE_WRITE = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def _ofd_lock(fd: int) -> int:
    """F_OFD_SETLK of the whole file for writing: 0 or the errno."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, WHOLE_WRITE)
        return 0
    except OSError as exc:
        return exc.errno


def _eventually_locks(fd: int, timeout: float = 5.0) -> bool:
    """The kernel sends RELEASE asynchronously after close(): allow it a moment."""
    deadline = time.monotonic() + timeout
    while _ofd_lock(fd) == errno.EAGAIN:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ofd_lock_is_released_when_its_open_file_is_closed(pair: Pair) -> None:
    (pair.dev.export / "ofd").write_bytes(b"x" * 64)
    holder = os.open(pair.a.path / "ofd", os.O_RDWR)
    other = os.open(pair.b.path / "ofd", os.O_RDWR)
    try:
        assert _ofd_lock(holder) == 0
        assert _ofd_lock(other) == errno.EAGAIN  # the device holds it, across mounts
        os.close(holder)
        holder = -1
        assert _eventually_locks(other), "the closed open file's OFD lock is still held"
    finally:
        for fd in (holder, other):
            if fd >= 0:
                os.close(fd)


def test_ofd_lock_of_a_dup_lives_until_the_last_descriptor(pair: Pair) -> None:
    (pair.dev.export / "dup").write_bytes(b"")
    holder = os.open(pair.a.path / "dup", os.O_RDWR)
    copy = os.dup(holder)
    other = os.open(pair.b.path / "dup", os.O_RDWR)
    try:
        assert _ofd_lock(holder) == 0
        os.close(holder)  # the open file lives on in `copy`: so does its lock
        holder = -1
        time.sleep(0.3)
        assert _ofd_lock(other) == errno.EAGAIN
        os.close(copy)
        copy = -1
        assert _eventually_locks(other)
    finally:
        for fd in (holder, copy, other):
            if fd >= 0:
                os.close(fd)


def test_new_file_with_a_reused_inode_number_starts_unlocked(pair: Pair) -> None:
    old = pair.a.path / "old"
    fd = os.open(old, os.O_RDWR | os.O_CREAT, 0o644)
    assert _ofd_lock(fd) == 0
    os.unlink(old)
    os.close(fd)
    time.sleep(0.3)  # RELEASE and FORGET reach the device
    new = os.open(pair.b.path / "new", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert _ofd_lock(new) == 0
    finally:
        os.close(new)
