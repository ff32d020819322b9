"""The local vhost-user backends, in one place: how to find and start each one
(`vfsdrv demo --backend`, `vfsdrv bench --backend`, the tests).

- ``virtiofsd``: Debian 12's C virtiofsd (QEMU 7.2), the default. No config space:
  the tag and queue count come from the driver's side.
- ``virtiofsd-rs``: Debian 13's Rust virtiofsd (1.13), from the private prefix that
  ``python3 -m vfsdrv.tools.virtiofsd_rs`` fetches. Started with ``--tag``, so it has
  config space (the tag and one request queue come from the device).
- ``refdev``: the project's reference device (``vfsdrv refdev``), config space too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import VfsdrvError
from . import virtiofsd_rs
from .backend import find_virtiofsd, virtiofsd_env

BACKENDS = ("virtiofsd", "virtiofsd-rs", "refdev")
DEFAULT_BACKEND = "virtiofsd"


def backend_argv(name: str, source: Path, socket_path: Path, *, tag: str | None = None,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of backend `name` serving `source` on `socket_path`; `tag`
    goes into the config space of the backends that have one (the C one has none)."""
    if name == "virtiofsd":
        return [find_virtiofsd(), f"--socket-path={socket_path}", "-o", f"source={source}",
                "-o", "cache=auto", "-o", "xattr", *extra]
    if name == "virtiofsd-rs":
        return [*virtiofsd_rs.require().argv(), f"--socket-path={socket_path}",
                f"--shared-dir={source}", "--cache=auto", "--xattr",
                *([f"--tag={tag}"] if tag else []), *extra]
    if name == "refdev":
        return [sys.executable, "-m", "vfsdrv.tools.cli", "refdev", "--socket", str(socket_path),
                "--source", str(source), *(["--tag", tag] if tag else []), *extra]
    raise VfsdrvError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")


def check_available(name: str) -> None:
    """Raise VfsdrvError saying how to get backend `name` when it is missing."""
    if name == "virtiofsd":
        find_virtiofsd()
    elif name == "virtiofsd-rs":
        virtiofsd_rs.require()
    elif name != "refdev":
        raise VfsdrvError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")


def is_listening(sock: Path) -> bool:
    """Whether a unix socket is bound *and* listening at `sock`. The file exists from
    bind() on, before listen(): a client that connects in between (QEMU) gets
    ECONNREFUSED, and a single-connection backend cannot be probed by connecting."""
    want = str(sock)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == want and int(fields[3], 16) & 0x10000:
                return True  # __SO_ACCEPTCON
    return False


class Backend:
    """One backend process serving `source` on `socket_path`. Both virtiofsds serve a
    single connection and exit when it closes; the reference device serves many."""

    def __init__(self, name: str, source: Path, socket_path: Path, *, tag: str | None = None,
                 extra: tuple[str, ...] = (), timeout: float = 15.0) -> None:
        self.name = name
        self.source = source
        self.socket_path = socket_path
        #: the tag in the device's config space; None: the device has none
        self.tag = tag if name != "virtiofsd" else None
        cmd = backend_argv(name, source, socket_path, tag=tag, extra=extra)
        # a file, not a pipe: nobody drains a pipe while we run, and a full one stalls it
        self.log_path = socket_path.with_suffix(".log")
        with open(self.log_path, "wb") as log:
            # a session of its own: stop() signals the group (both virtiofsds fork)
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=virtiofsd_env() if name == "virtiofsd" else None)
        deadline = time.monotonic() + timeout
        while not is_listening(socket_path):
            if self.proc.poll() is not None:
                raise VfsdrvError(f"{name} exited at start: {self.log()[-1000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise VfsdrvError(f"{name} did not listen on its socket within {timeout:g} s")
            time.sleep(0.005)

    @property
    def has_config_space(self) -> bool:
        return self.tag is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace").strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Virtiofsd(Backend):
    """Debian 12's C virtiofsd serving `source` on `socket_path` (one connection)."""

    def __init__(self, source: Path, socket_path: Path, *, extra: tuple[str, ...] = ()) -> None:
        super().__init__("virtiofsd", source, socket_path, extra=extra)
