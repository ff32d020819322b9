"""Debian's C virtiofsd: where Debian installs it, and the environment to start it
in (vfsdrv.tools.backends starts and stops it, with the other backends)."""

from __future__ import annotations

import os
import shutil

from ..errors import VfsdrvError

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")


def find_virtiofsd() -> str:
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise VfsdrvError(
        "virtiofsd not found; on Debian 12 install it with: apt-get install qemu-system-common"
    )


def virtiofsd_env() -> dict[str, str]:
    """The environment to start Debian 12's C virtiofsd in.

    Its seccomp allowlist lacks sched_getaffinity, which glibc's malloc calls (to
    count CPUs) the first time a process wants more arenas than its default test
    (8 on 64-bit): with a thread pool (--thread-pool-size) and busy queues that
    happens at some unlucky moment, and the kernel kills virtiofsd with SIGSYS
    (audit: syscall=204). A fixed arena limit skips the CPU count."""
    env = dict(os.environ)
    env.setdefault("MALLOC_ARENA_MAX", "8")
    return env
