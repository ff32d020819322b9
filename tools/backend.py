"""Start and stop local vhost-user backends for the commands that need one
(demo, bench): Debian's virtiofsd, found where Debian installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

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


class Virtiofsd:
    """One virtiofsd process serving `source` on `socket_path` (one connection)."""

    def __init__(self, source: Path, socket_path: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.source = source
        self.socket_path = socket_path
        cmd = [find_virtiofsd(), f"--socket-path={socket_path}", "-o", f"source={source}",
               "-o", "cache=auto", "-o", "xattr", *extra]
        # a file, not a pipe: nobody drains a pipe while we run, and a full one stalls it
        self.log_path = socket_path.with_suffix(".log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True, env=virtiofsd_env())
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if self.proc.poll() is not None:
                err = self.log_path.read_text(errors="replace")
                raise VfsdrvError(f"virtiofsd exited at start: {err.strip()[-1000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise VfsdrvError("virtiofsd did not open its socket within 10 s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Virtiofsd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
