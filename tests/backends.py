"""Real backends for the tests: Debian's virtiofsd (and, where present, the
project's reference device), started per test on a fresh socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")


def find_virtiofsd() -> str:
    for path in VIRTIOFSD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise RuntimeError(
        "virtiofsd not found: install Debian's qemu-system-common (tools/setup-env.sh does)"
    )


@contextmanager
def virtiofsd(source: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """One virtiofsd serving `source` on `sock`; it serves a single connection."""
    cmd = [find_virtiofsd(), f"--socket-path={sock}", "-o", f"source={source}",
           "-o", "cache=auto", "-o", "xattr", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"virtiofsd exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("virtiofsd did not create its socket within 10 s")
            time.sleep(0.005)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def connect_virtiofsd(sock: Path, **fs_options):
    """Bring the driver up on a virtiofsd socket. virtiofsd 7.2 has no config
    space: the tag and queue count come from us, as QEMU's device model does."""
    from vfsdrv.fs.config import encode_config
    from vfsdrv.fs.device import VirtioFs
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    transport = VhostUserTransport(str(sock), config=encode_config("myfs", 1), num_queues=2)
    try:
        return VirtioFs(transport, **fs_options).start()
    except BaseException:
        transport.close()
        raise
