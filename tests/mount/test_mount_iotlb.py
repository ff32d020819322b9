"""A real mount in IOVA mode (issue 12 item 5): `vfsdrv refdev --access-platform`
offers VIRTIO_F_ACCESS_PLATFORM, `vfsdrv mount` (relay, native pumps; and pyfuse3)
accepts it, so every ring and buffer address the device sees is an IOVA it
translates through the IOTLB the driver filled. Ordinary programs use the mount;
the device's log must show no refused access, and `vfsdrv status --json` names
ACCESS_PLATFORM among the negotiated features."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from mount_helpers import Mounted, serving
from mounting import is_mounted
from test_mount_pumps import status_of


@pytest.fixture(scope="module", params=["relay", "pyfuse3"])
def iova_mnt(request, tmp_path_factory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp(f"iotlb-{request.param}")
    with serving(base, request.param, backend="refdev",
                 vfsd_args=("--access-platform", "--request-queues", "2")) as m:
        yield m
    assert not is_mounted(m.mnt)
    log = (base / "vfsd.log").read_text(errors="replace")
    assert "IOTLB refused" not in log, log[-3000:]
    assert "broken" not in log, log[-3000:]


def test_access_platform_negotiated(iova_mnt: Mounted) -> None:
    st = status_of(iova_mnt.mnt)
    assert "ACCESS_PLATFORM" in st["features"], st["features"]


def test_programs_read_and_write_through_iova_buffers(iova_mnt: Mounted) -> None:
    m = iova_mnt
    work = m.mnt / "work"
    work.mkdir()
    data = os.urandom(8 << 20)
    (work / "big").write_bytes(data)
    assert (m.export / "work" / "big").read_bytes() == data
    assert hashlib.sha256((work / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
    for i in range(50):
        (work / f"f{i}").write_text(str(i))
    assert sorted(os.listdir(work)) == sorted(["big", *(f"f{i}" for i in range(50))])
    os.rename(work / "f0", work / "renamed")
    assert (m.export / "work" / "renamed").read_text() == "0"
    r = subprocess.run(["cp", "-r", str(work), str(m.mnt / "copy")], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert (m.export / "copy" / "big").read_bytes() == data
    r = subprocess.run(["ls", "-lR", str(m.mnt)], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"renamed" in r.stdout


def test_a_blocking_lock_waits_and_is_granted(iova_mnt: Mounted) -> None:
    """The notification queue's buffers are IOVAs too: a blocking fcntl lock held by
    this process makes another program wait until it is released."""
    if iova_mnt.frontend == "pyfuse3":
        pytest.skip("pyfuse3 has no setlk handlers: the kernel keeps locks local")
    path = iova_mnt.mnt / "locked"
    path.write_text("")
    with open(path, "r+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        code = ("import fcntl,sys,time; f=open(sys.argv[1],'r+'); t=time.monotonic(); "
                "fcntl.lockf(f, fcntl.LOCK_EX); print(time.monotonic()-t)")
        waiter = subprocess.Popen([sys.executable, "-c", code, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiter.poll() is None, "the lock was granted while held"
        fcntl.lockf(f, fcntl.LOCK_UN)
        out, _ = waiter.communicate(timeout=15)
    assert waiter.returncode == 0 and float(out) >= 0.4
