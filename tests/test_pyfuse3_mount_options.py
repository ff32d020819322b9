"""The pyfuse3 frontend takes the relay's mount options and gives the same mount
(issue 10 item 17): allow_other by default, so every user may enter (the kernel
checks permissions from the attributes), `-o noallow_other` and the other options
`vfsdrv mount --help` lists work, and the mount flags are the relay's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backends import refdev
from mounting import force_unmount, wait_mounted
from vfsdrv.frontends.base import FrontendError
from vfsdrv.frontends.fuse_dev import MountError
from vfsdrv.frontends.pyfuse3_frontend import libfuse_options

NOBODY = 65534
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vfo-", dir="/tmp"))
    d.chmod(0o755)
    (d / "export").mkdir()
    (d / "export").chmod(0o755)
    (d / "export" / "f").write_text("for everyone")
    (d / "export" / "f").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextmanager
def mounted(top: Path, frontend: str, *options: str) -> Iterator[Path]:
    mnt = top / f"mnt-{frontend}"
    mnt.mkdir(exist_ok=True)
    mnt.chmod(0o755)
    log = top / f"{frontend}.log"
    with refdev(top / "export", top / f"{frontend}.sock"):
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [*VFSDRV, "mount", "-f", "--vhost-user", str(top / f"{frontend}.sock"),
                 "--frontend", frontend, *[a for o in options for a in ("-o", o)], str(mnt)],
                stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_mounted(mnt, proc, log)
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            force_unmount(mnt)


def _mountinfo(mnt: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, super options) of the mount on `mnt`, without the fd."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == str(mnt):
                sb = {o for o in right.split()[2].split(",") if not o.startswith("fd=")}
                return set(fields[5].split(",")), sb
    raise AssertionError(f"{mnt} is not mounted")


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), user=NOBODY, group=NOBODY, capture_output=True,
                          text=True, timeout=30)


def test_every_user_may_read_a_public_file_by_default(top: Path) -> None:
    with mounted(top, "pyfuse3") as mnt:
        got = _as_nobody("cat", str(mnt / "f"))
        assert (got.returncode, got.stdout) == (0, "for everyone"), got.stderr
        assert _as_nobody("ls", str(mnt)).returncode == 0


def test_noallow_other_mounts_and_keeps_other_users_out(top: Path) -> None:
    with mounted(top, "pyfuse3", "noallow_other") as mnt:
        assert (mnt / "f").read_text() == "for everyone"  # the mounting user: fine
        got = _as_nobody("cat", str(mnt / "f"))
        assert got.returncode != 0 and "Permission denied" in got.stderr


@pytest.mark.parametrize("options", [
    (), ("noallow_other",), ("ro,noexec", "nodev"), ("nodefault_permissions,nosuid",),
    ("noatime,sync,dirsync",),
])
def test_the_same_mount_as_the_relay(top: Path, options: tuple[str, ...]) -> None:
    with mounted(top, "relay", *options) as relay_mnt:
        relay = _mountinfo(relay_mnt)
    with mounted(top, "pyfuse3", *options) as py_mnt:
        py = _mountinfo(py_mnt)
    assert py == relay


def test_unknown_and_libfuse_less_options_are_refused_before_mounting() -> None:
    with pytest.raises(MountError, match="unknown mount option"):
        libfuse_options(["allow_other,bogus"], "tag")
    for opt in ("strictatime", "lazytime", "nodiratime", "max_read=65536"):
        with pytest.raises(FrontendError, match=opt.partition("=")[0]):
            libfuse_options([opt], "tag")
    opts = libfuse_options(["fsname=mine,ro"], "tag")
    assert {"fsname=mine", "ro", "suid", "dev", "allow_other",
            "default_permissions"} <= opts


def test_pyfuse3_mount_refuses_an_unknown_option_with_a_clear_error(top: Path) -> None:
    mnt = top / "mnt-bad"
    mnt.mkdir()
    with refdev(top / "export", top / "bad.sock"):
        proc = subprocess.run(
            [*VFSDRV, "mount", "-f", "--vhost-user", str(top / "bad.sock"), "--frontend",
             "pyfuse3", "-o", "bogus", str(mnt)], capture_output=True, text=True, timeout=60)
    force_unmount(mnt)
    assert proc.returncode != 0 and "bogus" in proc.stderr
    assert not os.path.ismount(mnt)
