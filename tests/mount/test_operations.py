"""Operating a mount (issue 11, issue 10 item 4): `vfsdrv umount` of a mount whose
server is stuck, `vfsdrv status`, and the source recorded for mount(8)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from mount_helpers import VFSDRV, serving
from mounting import is_mounted


def vfsdrv(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSDRV, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_umount_never_touches_a_stuck_mount(tmp_path: Path) -> None:
    """With the server stopped any request to the mount waits forever; unmounting must
    not send one (no stat, no realpath of the mount point) and returns at once."""
    with serving(tmp_path, "relay") as m:
        assert m.proc is not None
        # past the attribute validity the device granted: a stat now goes to the server
        time.sleep(1.5)
        m.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = vfsdrv("umount", m.mnt, timeout=20)
            took = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert took < 5, took
            assert not is_mounted(m.mnt)
        finally:
            m.proc.send_signal(signal.SIGCONT)
        # the server sees its mount gone and exits cleanly
        assert m.proc.wait(15) == 0


def test_umount_of_a_symlink_to_the_mount_point(tmp_path: Path) -> None:
    with serving(tmp_path, "relay") as m:
        link = tmp_path / "link"
        link.symlink_to(tmp_path)
        r = vfsdrv("umount", link / "mnt")
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.mnt)
        assert m.proc is not None and m.proc.wait(15) == 0


def test_umount_of_what_is_not_mounted(tmp_path: Path) -> None:
    r = vfsdrv("umount", tmp_path)
    assert r.returncode == 1
    assert "is not mounted" in r.stderr
