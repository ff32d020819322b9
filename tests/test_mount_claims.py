"""A PCI function left on vfio-pci by a `vfsdrv mount` whose server was killed
(vfsdrv.tools.claims), against a fake sysfs tree. The real kernel, with a real
SIGKILL'd server: tests/vm/test_mount_vfio.py (no-IOMMU run, step "killed")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_devices_list import mountinfo
from test_pci_sysfs import fake_sysfs
from vfsdrv.pci.sysfs import Sysfs
from vfsdrv.tools import claims, devices

BDF = "0000:00:03.0"


def dead_claim(s: Sysfs, mountpoint: str) -> None:
    """A claim whose process is gone: our pid with a start time no process has."""
    s.state_dir.mkdir(parents=True, exist_ok=True)
    (s.state_dir / f"{BDF}.mount").write_text(
        json.dumps({"pid": os.getpid(), "start": "-1", "mountpoint": mountpoint}))


def fake_unbind(s: Sysfs, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """unbind_vfio as the kernel does it: the function goes back to virtio-pci."""
    calls: list[str] = []

    def unbind(bdf: str, restore: bool = True) -> str:
        calls.append(bdf)
        link = s.device_dir(bdf) / "driver"
        link.unlink()
        (s.root / "drivers" / "virtio-pci").mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.root / "drivers" / "virtio-pci")
        return "virtio-pci"

    monkeypatch.setattr(s, "unbind_vfio", unbind)
    monkeypatch.setattr(devices, "vfio_users", lambda sysfs, bdf: [])
    return calls


def describe(s: Sysfs, tmp_path: Path) -> devices.DeviceInfo:
    return devices.describe(BDF, s, ktags={}, mountinfo=mountinfo(tmp_path),
                            read_tag=lambda bdf, sysfs: "myfs")


def test_a_killed_servers_binding_is_named_and_given_back_by_its_umount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    dead_claim(s, "/mnt/x")
    info = describe(s, tmp_path)
    assert info.left_bound_by == {"pid": os.getpid(), "mountpoint": "/mnt/x"}
    table = devices.format_table([info])
    assert "`vfsdrv unbind 0000:00:03.0`" in table and "`vfsdrv umount /mnt/x`" in table
    assert json.loads(json.dumps(info.to_dict()))["left_bound_by"]["mountpoint"] == "/mnt/x"
    calls = fake_unbind(s, monkeypatch)
    # another mount point's umount leaves it alone
    assert claims.give_back_orphans("/mnt/y", s) == [] and calls == []
    out = claims.give_back_orphans("/mnt/x", s)
    assert calls == [BDF] and len(out) == 1 and "given back to virtio-pci" in out[0], out
    assert not (s.state_dir / f"{BDF}.mount").exists()
    assert describe(s, tmp_path).left_bound_by is None


def test_a_running_servers_claim_is_not_an_orphan(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    claims.record(s, BDF, "/mnt/x")  # this process: alive
    claim = claims.read(s, BDF)
    assert claim is not None and claim.pid == os.getpid() and claim.alive()
    assert claims.orphaned(s, BDF) is None and describe(s, tmp_path).left_bound_by is None
    calls = fake_unbind(s, monkeypatch)
    assert claims.give_back_orphans("/mnt/x", s) == [] and calls == []


def test_an_orphan_held_through_vfio_stays_bound(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    dead_claim(s, "/mnt/x")
    calls = fake_unbind(s, monkeypatch)
    monkeypatch.setattr(devices, "vfio_users", lambda sysfs, bdf: ["77 (qemu)"])
    out = claims.give_back_orphans("/mnt/x", s)
    assert calls == [] and "77 (qemu) uses it" in out[0], out
    assert claims.orphaned(s, BDF) is not None


def test_unbind_drops_the_claim_and_a_malformed_one_is_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    dead_claim(s, "/mnt/x")
    fake_unbind(s, monkeypatch)
    assert devices.unbind(BDF, s) == "virtio-pci"
    assert claims.read(s, BDF) is None
    (s.state_dir / f"{BDF}.mount").write_text("{not json")
    assert claims.read(s, BDF) is None and claims.orphaned(s, BDF) is None


def test_a_claim_on_a_function_given_back_meanwhile_is_no_orphan(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path, driver="virtio-pci")
    dead_claim(s, "/mnt/x")
    assert claims.orphaned(s, BDF) is None


def test_a_failed_takeover_leaves_a_function_someone_holds_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead server's claim, but QEMU (say) holds the function through VFIO now: the
    mount does not take the binding over, so its failed open gives nothing back from
    under that process, and the claim stays as it was."""
    from vfsdrv.pci import sysfs as sysfs_mod
    from vfsdrv.pci.errors import DeviceBusyError
    from vfsdrv.tools import mount, pci_functions

    s = fake_sysfs(tmp_path, driver="vfio-pci")
    dead_claim(s, "/mnt/old")
    monkeypatch.setattr(sysfs_mod, "Sysfs", lambda *a, **k: s)
    unbinds: list[str] = []
    monkeypatch.setattr(s, "unbind_vfio", lambda bdf, restore=True: unbinds.append(bdf))
    monkeypatch.setattr(devices, "vfio_users", lambda sysfs, bdf: ["4242 (qemu-system-x86)"])

    def busy(*_a: object, **_k: object) -> None:
        raise DeviceBusyError("/dev/vfio/3 is busy")

    monkeypatch.setattr(pci_functions, "open_fs_function", busy)
    with pytest.raises(DeviceBusyError) as busy_error:
        mount._pci_transport(mount.MountRequest(mountpoint="/mnt/new", device=BDF))
    # who holds it is said, as `vfsdrv unbind` says it
    assert "(held by 4242 (qemu-system-x86))" in str(busy_error.value)
    assert unbinds == []
    claim = claims.read(s, BDF)
    assert claim is not None and claim.mountpoint == "/mnt/old"


def test_umount_of_a_dead_mount_already_removed_still_gives_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The dead mount was removed with plain umount (or never made): `vfsdrv umount`
    of its mount point still gives the function back; with no claim there it is the
    usual "not mounted" error."""
    import argparse

    from vfsdrv.frontends.fuse_dev import MountError
    from vfsdrv.pci import sysfs as sysfs_mod
    from vfsdrv.tools import mount

    s = fake_sysfs(tmp_path, driver="vfio-pci")
    gone = tmp_path / "gone"
    gone.mkdir()
    dead_claim(s, str(gone))
    monkeypatch.setattr(sysfs_mod, "Sysfs", lambda *a, **k: s)
    monkeypatch.setattr(claims, "Sysfs", lambda *a, **k: s)
    calls = fake_unbind(s, monkeypatch)
    args = argparse.Namespace(mountpoint=str(gone), lazy=False)
    assert mount.run_umount(args) == 0 and calls == [BDF]
    assert "given back to virtio-pci" in capsys.readouterr().err
    with pytest.raises(MountError, match="not mounted"):
        mount.run_umount(args)


def test_a_relative_state_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A background server chdirs to /: its records must not move with it."""
    from vfsdrv.tools import status

    monkeypatch.setenv("VFSDRV_STATE_DIR", "relstate")
    assert Sysfs().state_dir == Path.cwd() / "relstate"
    assert status.run_dir() == Path.cwd() / "relstate"


def test_mount_timeout_reaches_a_pci_transport(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--timeout is how long the device may take over FUSE_INIT on PCI too (the relay
    reads it from the transport; it was vhost-user's only, PCI waited 10 s)."""
    from vfsdrv.pci import sysfs as sysfs_mod
    from vfsdrv.tools import mount, pci_functions

    s = fake_sysfs(tmp_path, driver="vfio-pci")
    monkeypatch.setattr(sysfs_mod, "Sysfs", lambda *a, **k: s)

    class Opened:
        timeout = None

    monkeypatch.setattr(pci_functions, "open_fs_function", lambda *a, **k: Opened())
    t = mount._pci_transport(mount.MountRequest(mountpoint="/mnt/new", device=BDF, timeout=3))
    assert t.timeout == 3
