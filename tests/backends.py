"""Real backends for the tests: Debian 12's C virtiofsd, Debian 13's Rust virtiofsd
(`DEVICES`, the real devices every device suite runs on) and the project's reference
device, started per test on a fresh socket through vfsdrv.tools.backends."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vfsdrv.tools import virtiofsd_rs
from vfsdrv.tools.backends import Backend, Virtiofsd

#: the real devices: the suites parametrized over them run every test on each
DEVICES = ["virtiofsd", "virtiofsd-rs"]
#: the tag the Rust virtiofsd puts in its config space (the C one has none: the
#: driver side supplies the same tag, see connect_virtiofsd)
DEVICE_TAG = "myfs"


@contextmanager
def device(name: str, source: Path, sock: Path, *extra: str,
           tag: str = DEVICE_TAG) -> Iterator[Backend]:
    """Real device `name` (one of DEVICES) serving `source` on `sock`. The Rust
    virtiofsd is fetched on first use (tests/run.sh does it before the run)."""
    if name == "virtiofsd-rs":
        virtiofsd_rs.fetch(log=lambda _m: None)
    backend = Backend(name, source, sock, tag=tag, extra=extra)
    try:
        yield backend
    finally:
        backend.stop()


@contextmanager
def virtiofsd(source: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """One virtiofsd serving `source` on `sock` (it serves a single connection);
    its log goes to a file next to the socket, never to an undrained pipe."""
    backend = Virtiofsd(source, sock, extra=extra)
    try:
        yield backend.proc
    finally:
        backend.stop()


@contextmanager
def refdev(source: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """The project's reference device (`vfsdrv refdev`) serving `source` on `sock`, as
    its own process; its log goes to a file next to the socket."""
    log = sock.with_suffix(".log")
    cmd = [sys.executable, "-m", "vfsdrv.tools.cli", "refdev", "--socket", str(sock),
           "--source", str(source), *extra]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"refdev did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def connect_virtiofsd(sock: Path, **fs_options):
    """Bring the driver up on a virtiofsd socket. virtiofsd 7.2 has no config
    space: the tag and queue count come from us, as QEMU's device model does (the
    Rust virtiofsd started with --tag has one, and the transport reads it instead)."""
    from vfsdrv.fs.config import encode_config
    from vfsdrv.fs.device import VirtioFs
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    transport = VhostUserTransport(str(sock), config=encode_config(DEVICE_TAG, 1), num_queues=2)
    try:
        return VirtioFs(transport, **fs_options).start()
    except BaseException:
        transport.close()
        raise
