"""`vfsdrv list/bind/unbind` logic against a fake sysfs tree and mount table (the real
kernel: tests/vm/test_udev_devices.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_pci_sysfs import fake_sysfs
from vfsdrv.errors import VfsdrvError
from vfsdrv.pci.errors import DeviceBusyError
from vfsdrv.tools import devices

BDF = "0000:00:03.0"


def mountinfo(tmp_path: Path, *lines: str) -> str:
    p = tmp_path / "mountinfo"
    p.write_text("".join(f"{i} 1 0:{i} / {ln}\n" for i, ln in enumerate(lines, 40)))
    return str(p)


def test_describe_from_kernel_tag_with_group_and_mounts(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    virtio = s.device_dir(BDF) / "virtio2"
    virtio.mkdir()
    (tmp_path / "virtio_drv" / "virtiofs").mkdir(parents=True)
    (virtio / "driver").symlink_to(tmp_path / "virtio_drv" / "virtiofs")
    ktags = tmp_path / "sysfsvirtiofs" / "0"
    ktags.mkdir(parents=True)
    (ktags / "tag").write_text("shared\n")
    (ktags / "device").symlink_to(virtio)
    mi = mountinfo(tmp_path, "/mnt/k rw - virtiofs shared rw",
                   "/mnt/my\\040dir rw - fuse.vfsdrv shared rw,user_id=0",
                   "/mnt/other rw - virtiofs othertag rw", "/ rw - ext4 /dev/sda1 rw")

    def no_device_read(bdf, sysfs):
        raise AssertionError("the kernel's tag must be used first")

    d = devices.describe(BDF, s, ktags=devices.kernel_tags(tmp_path / "sysfsvirtiofs"),
                         mountinfo=mi, read_tag=no_device_read)
    assert (d.tag, d.tag_source, d.driver) == ("shared", "kernel", "virtio-pci")
    assert (d.virtio_device, d.virtio_driver, d.iommu_group) == ("virtio2", "virtiofs", 3)
    assert d.group_members == [devices.GroupMember("0000:00:04.0", "e1000e")]
    assert d.mounts == [devices.Mount("/mnt/k", "virtiofs"),
                        devices.Mount("/mnt/my dir", "fuse.vfsdrv")]
    text = devices.format_table([d])
    for word in (BDF, "'shared' (from the kernel)", "virtio-pci (virtio2: virtiofs)",
                 "3 with 0000:00:04.0 (e1000e)", "/mnt/k (virtiofs)", "/mnt/my dir (fuse.vfsdrv)"):
        assert word in text
    assert d.to_dict()["group_members"] == [{"bdf": "0000:00:04.0", "driver": "e1000e"}]


def test_a_mount_made_with_device_is_the_functions_too(tmp_path: Path) -> None:
    """vfsdrv mount --device 00:03.0 records the source as typed (pci:00:03.0): list
    names that mount for 0000:00:03.0, and not a mount of another address."""
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    mi = mountinfo(tmp_path, "/mnt/a rw - fuse.vfsdrv pci:00:03.0 rw,user_id=0",
                   "/mnt/b rw - fuse.vfsdrv pci:0000:00:03.0 rw,user_id=0",
                   "/mnt/c rw - fuse.vfsdrv pci:0000:00:05.0 rw,user_id=0",
                   "/mnt/d rw - fuse.vfsdrv pci:bogus rw,user_id=0")
    d = devices.describe(BDF, s, ktags={}, mountinfo=mi, read_tag=lambda bdf, sysfs: "t")
    assert d.mounts == [devices.Mount("/mnt/a", "fuse.vfsdrv"),
                        devices.Mount("/mnt/b", "fuse.vfsdrv")]


def test_describe_reads_the_device_when_the_kernel_has_no_tag(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path, group=None, driver=None)
    mi = mountinfo(tmp_path)
    d = devices.describe(BDF, s, ktags={}, mountinfo=mi, read_tag=lambda bdf, sysfs: "devtag")
    assert (d.tag, d.tag_source, d.driver, d.iommu_group) == ("devtag", "device", None, None)
    assert d.mounts == [] and "none (no IOMMU)" in devices.format_table([d])

    def broken(bdf, sysfs):
        raise VfsdrvError("cannot read the virtio-fs tag: BAR0 cannot be mapped")

    d = devices.describe(BDF, s, ktags={}, mountinfo=mi, read_tag=broken)
    assert d.tag is None and "BAR0 cannot be mapped" in (d.error or "")
    assert "? (cannot read" in devices.format_table([d])


def test_list_only_virtio_fs_functions(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    found = devices.list_devices(s, ktags={}, mountinfo=mountinfo(tmp_path),
                                 read_tag=lambda bdf, sysfs: "t")
    assert [d.bdf for d in found] == [BDF]
    assert devices.format_table([]).startswith("no virtio-fs PCI function")


def test_bind_refuses_other_devices_and_unbind_needs_vfio(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    if os.geteuid() != 0:
        pytest.fail("these tests run as root (the project's test setup)")
    with pytest.raises(VfsdrvError, match="not a virtio-fs function"):
        devices.bind("0000:00:04.0", None, s)
    with pytest.raises(VfsdrvError, match="one of them"):
        devices.bind(BDF, "tag", s)
    with pytest.raises(VfsdrvError, match="not bound to vfio-pci .driver: virtio-pci."):
        devices.unbind(BDF, s)


def test_unbind_refuses_while_a_process_holds_the_group(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path, driver="vfio-pci")
    proc = tmp_path / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "fd" / "7").symlink_to("/dev/vfio/3")
    (proc / "4242" / "cmdline").write_bytes(b"vfsdrv\0mount\0--tag\0t\0/mnt\0")
    (proc / "4343" / "fd").mkdir(parents=True)
    (proc / "4343" / "fd" / "1").symlink_to("/dev/null")
    assert devices.vfio_users(s, BDF, proc) == ["4242 (vfsdrv mount --tag t /mnt)"]
    # the real /proc: nobody holds group 3 of the fake tree
    assert devices.vfio_users(s, BDF) == []
    orig = devices.vfio_users
    monkeypatch.setattr(devices, "vfio_users", lambda sysfs, bdf: orig(sysfs, bdf, proc))
    with pytest.raises(DeviceBusyError, match=r"4242 \(vfsdrv mount.*vfsdrv umount"):
        devices.unbind(BDF, s)


def test_unbind_by_tag_finds_the_function(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`vfsdrv unbind --tag T`, as `vfsdrv bind --tag T`."""
    import argparse

    from vfsdrv.tools import pci_functions

    monkeypatch.setattr(pci_functions, "find_by_tag", lambda tag, *a: BDF if tag == "t" else
                        pytest.fail(f"looked for {tag!r}"))
    given: list[str] = []
    monkeypatch.setattr(devices, "unbind", lambda bdf, sysfs=None: given.append(bdf) or
                        "virtio-pci")
    assert devices.run_unbind(argparse.Namespace(bdf=None, tag="t", command_parser=None)) == 0
    assert given == [BDF]
    assert f"{BDF}: given back to virtio-pci" in capsys.readouterr().out
