"""Finding virtio-fs functions and their tags without VFIO: through a sysfs BAR
mapping (a fake sysfs tree whose resource file is a plain file), and through
the VIRTIO_PCI_CAP_PCI_CFG access window (an emulated function that implements
the window like QEMU does)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_pci_transport import make_function, standard_caps, vcap
from vfsdrv.errors import CapabilityError, ConfigError, TransportError
from vfsdrv.pci.emulated import EmulatedFunction
from vfsdrv.pci.errors import BadAddressError, BarError, PciError
from vfsdrv.pci.resource import SysfsFunction
from vfsdrv.pci.sysfs import Sysfs
from vfsdrv.tools import pci_functions as pf
from vfsdrv.virtio import pci as vp

PCI_CFG_CAP = vcap(vp.PCI_CFG, 0, 0, 0, cap_len=20, extra=bytes(4))


class PciCfgDevice(EmulatedFunction):
    """Implements the PCI cfg access capability: a read of pci_cfg_data reads
    cap.length bytes at cap.offset of BAR cap.bar."""

    pci_cfg_pos = -1
    window_reads = 0

    def config_read(self, offset: int, length: int) -> bytes:
        pos = self.pci_cfg_pos
        if pos >= 0 and offset == pos + 16:
            bar = self.config[pos + 4]
            off, width = struct.unpack_from("<II", self.config, pos + 8)
            assert width in (1, 2, 4) and off % width == 0 and length == width
            self.window_reads += 1
            return self.bars[bar].read_bytes(off, width)
        return super().config_read(offset, length)


def pci_cfg_function(tag: bytes = b"via-window") -> PciCfgDevice:
    fn, model, bar = make_function(standard_caps() + [PCI_CFG_CAP], tag=tag)
    dev = PciCfgDevice(fn.config, fn.bars, msix_vectors=0)
    pos = vp.parse_capabilities(dev).pci_cfg
    assert pos is not None
    dev.pci_cfg_pos = pos
    dev.bar_window = None  # type: ignore[assignment]  # BARs cannot be mapped
    return dev


def test_tag_through_the_pci_cfg_window() -> None:
    dev = pci_cfg_function()
    assert pf.read_virtiofs_tag(dev, via_pci_cfg=True) == "via-window"
    assert dev.window_reads >= 9 + 2  # 36 bytes in 32-bit reads, plus the generation twice


def test_pci_cfg_window_is_read_only_and_natural() -> None:
    dev = pci_cfg_function()
    w = pf.PciCfgWindow(dev, dev.pci_cfg_pos, 4, 0x2000, 40, "device cfg")
    assert w.read_bytes(0, 4) == b"via-"
    with pytest.raises(BarError, match="unaligned"):
        w.read16(1)
    with pytest.raises(TransportError, match="read-only"):
        w.write32(0, 1)


def test_no_pci_cfg_capability() -> None:
    fn, _, _ = make_function()
    with pytest.raises(CapabilityError, match="no PCI cfg access capability"):
        pf.read_virtiofs_tag(fn, via_pci_cfg=True)


# -- a fake sysfs with real files standing in for config and BAR resources -------------------


def fake_function(root: Path, bdf: str, tag: bytes, driver: str | None = "virtio-pci") -> None:
    fn, _, bar = make_function(tag=tag)
    d = root / "devices" / bdf
    d.mkdir(parents=True)
    for name, value in (("vendor", "0x1af4"), ("device", "0x105a"), ("class", "0x018000"),
                        ("subsystem_vendor", "0x1af4"), ("subsystem_device", "0x1100")):
        (d / name).write_text(value + "\n")
    (d / "config").write_bytes(bytes(fn.config))
    lines = []
    for i in range(13):
        if i == 4:
            lines.append("0x00000000fe000000 0x00000000fe003fff 0x0000000000140204")
        else:
            lines.append("0x0000000000000000 0x0000000000000000 0x0000000000000000")
    (d / "resource").write_text("\n".join(lines) + "\n")
    (d / "resource4").write_bytes(bytes(bar.mem[:0x40]) + bytes(0x2000 - 0x40)
                                  + bytes(bar.mem[0x2000:0x4000]))
    if driver:
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (d / "driver").symlink_to(root / "drivers" / driver)


def test_list_and_find_by_tag(tmp_path: Path) -> None:
    root = tmp_path / "sys" / "bus" / "pci"
    fake_function(root, "0000:00:03.0", b"myfs")
    fake_function(root, "0000:00:04.0", b"fs2", driver=None)
    fake_function(root, "0000:00:05.0", b"\xff\xfe")  # broken tag
    s = Sysfs(root, state_dir=tmp_path / "state")
    found = pf.list_virtiofs(s)
    assert [(f.bdf, f.driver, f.tag) for f in found] == [
        ("0000:00:03.0", "virtio-pci", "myfs"), ("0000:00:04.0", None, "fs2"),
        ("0000:00:05.0", "virtio-pci", None)]
    assert "not valid UTF-8" in (found[2].error or "")
    assert pf.find_by_tag("fs2", s) == "0000:00:04.0"
    with pytest.raises(BadAddressError, match=r"no virtio-fs PCI function has tag 'x'.*"
                                              r"0000:00:03.0 \('myfs'\)"):
        pf.find_by_tag("x", s)


def test_duplicate_tags(tmp_path: Path) -> None:
    root = tmp_path / "sys" / "bus" / "pci"
    fake_function(root, "0000:00:03.0", b"same")
    fake_function(root, "0000:00:04.0", b"same")
    with pytest.raises(ConfigError, match="used by several functions"):
        pf.find_by_tag("same", Sysfs(root, state_dir=tmp_path / "state"))


def test_sysfs_function_windows_are_read_only(tmp_path: Path) -> None:
    root = tmp_path / "sys" / "bus" / "pci"
    fake_function(root, "0000:00:03.0", b"myfs")
    s = Sysfs(root, state_dir=tmp_path / "state")
    with SysfsFunction("0000:00:03.0", s) as f:
        assert f.bar_size(4) == 0x4000 and f.bar_size(0) == 0
        w = f.bar_window(4, 0x2000, 40, "device cfg")
        assert w.read_bytes(0, 4) == b"myfs"
        with pytest.raises(BarError, match="read-only"):
            w.write8(0, 1)
        with pytest.raises(BarError, match="outside BAR0"):
            f.bar_window(0, 0, 4, "x")
    # the mapping is gone: an access raises instead of faulting
    with pytest.raises(PciError, match="after the device was closed"):
        w.read32(0)


def test_kernel_busy_check_through_fake_sysfs(tmp_path: Path) -> None:
    root = tmp_path / "sys" / "bus" / "pci"
    fake_function(root, "0000:00:03.0", b"myfs")
    s = Sysfs(root, state_dir=tmp_path / "state")
    mounts = tmp_path / "mounts"
    mounts.write_text("myfs /srv virtiofs rw 0 0\n")
    with pytest.raises(Exception, match="in use by the kernel: mounted on /srv"):
        pf.check_kernel_not_using("0000:00:03.0", s, str(mounts))
    mounts.write_text("other /srv virtiofs rw 0 0\n")
    pf.check_kernel_not_using("0000:00:03.0", s, str(mounts))
