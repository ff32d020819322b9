"""Helpers for tests that mount: is a path mounted, wait for a mount, and make
sure nothing stays mounted whatever happens."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def force_unmount(path: Path) -> None:
    """Last resort: nothing may stay mounted, whatever happened."""
    for _ in range(5):
        if not is_mounted(path):
            return
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        time.sleep(0.05)


def wait_mounted(mnt: Path, proc: subprocess.Popen | None, log: Path, timeout: float = 20) -> None:
    """Wait until `mnt` is a mount answering stat(); fail with the server's log."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vfsdrv mount exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if is_mounted(mnt):
            os.stat(mnt)  # waits for FUSE_INIT to be answered
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not mounted within {timeout} s:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.01)


def kernel_allows_io_uring() -> bool:
    """Whether this process may make an io_uring (kernel.io_uring_disabled, a seccomp
    profile, a kernel without it): asked by making one, as the pump does."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(425, 4, params)  # io_uring_setup: 425 on x86-64 and aarch64
    if fd < 0:
        return False
    os.close(fd)
    return True
