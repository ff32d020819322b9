"""The project's reference device (``vfsdrv.refdev``) behind a real PCI function.

Shows the harness's own-backend path end to end: QEMU connects the
vhost-user-fs-pci function to refdev's socket, the guest sees the function with
refdev's number of request queues, and the guest kernel's virtiofs driver mounts
it and reads and writes through it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest
from harness import FsDevice, GuestResult

Guest = Callable[..., GuestResult]
QUEUES = 3


@pytest.fixture
def refdev(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """refdev serving tmp_path/src on tmp_path/refdev.sock: (socket, source dir)."""
    src, sock, log = tmp_path / "src", tmp_path / "refdev.sock", tmp_path / "refdev.log"
    src.mkdir()
    with open(log, "wb") as lf:
        p = subprocess.Popen([sys.executable, "-m", "vfsdrv.refdev", "--socket", str(sock),
                              "--source", str(src), "--request-queues", str(QUEUES)],
                             stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
    try:
        deadline = time.monotonic() + 30
        while not harness.is_listening(sock):
            assert p.poll() is None, f"refdev exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"refdev did not listen:\n{log.read_text()}"
            time.sleep(0.05)
        yield sock, src
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_refdev_behind_pci_function(guest: Guest, refdev: tuple[Path, Path]) -> None:
    sock, src = refdev
    (src / "hello").write_text("served by refdev\n")
    r = guest("""
        python tests/vm/virtiofs_sysfs_config.py $VFSDRV_VM_BDF
        echo $VFSDRV_VM_BDF > /sys/bus/pci/drivers/virtio-pci/bind
        modprobe virtiofs
        mount -t virtiofs ref /mnt
        cat /mnt/hello
        echo "written by the guest" > /mnt/back
        umount /mnt
    """, fs_devices=[FsDevice(tag="ref", socket=sock, num_request_queues=QUEUES)])
    assert r.returncode == 0, r
    cfg = json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))
    assert (cfg["tag"], cfg["num_request_queues"]) == ("ref", QUEUES)
    assert "served by refdev\n" in r.output
    assert (src / "back").read_text() == "written by the guest\n"
