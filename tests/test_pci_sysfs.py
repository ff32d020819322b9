"""PCI addresses, sysfs lookups and the error messages a user meets, against a
fake sysfs tree (real files in a temporary directory), plus the VFIO device
helpers that need no VFIO (MSI-X-table avoidance, region capability chains)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vfsdrv.pci import config as pcicfg
from vfsdrv.pci import device as devmod
from vfsdrv.pci import vfio
from vfsdrv.pci.container import not_viable_error
from vfsdrv.pci.emulated import ConfigSpace
from vfsdrv.pci.errors import (
    BadAddressError,
    BarError,
    GroupNotViableError,
    IommuUnavailableError,
    PciError,
    VfioUnavailableError,
)
from vfsdrv.pci.function import PreadWindow
from vfsdrv.pci.sysfs import Sysfs, normalize_bdf


@pytest.mark.parametrize("text,bdf", [
    ("0000:00:03.0", "0000:00:03.0"),
    ("00:03.0", "0000:00:03.0"),
    ("0:3.7", "0000:00:03.7"),
    ("  ABCD:Fe:1f.1 ", "abcd:fe:1f.1"),
])
def test_normalize_bdf(text: str, bdf: str) -> None:
    assert normalize_bdf(text) == bdf


@pytest.mark.parametrize("text", ["", "00:03", "00:20.0", "0000:00:03.8", "zz:00.0",
                                  "00000:00:03.0", "/sys/bus/pci/devices/0000:00:03.0"])
def test_bad_bdf(text: str) -> None:
    with pytest.raises(BadAddressError, match=r"bad PCI address .*e\.g\. 0000:00:03\.0"):
        normalize_bdf(text)


def fake_sysfs(tmp_path: Path, *, group: int | None = 3, driver: str | None = "virtio-pci",
               noiommu: str | None = None, vfio_loaded: bool = True) -> Sysfs:
    root = tmp_path / "sys" / "bus" / "pci"
    devs = root / "devices"
    drivers = root / "drivers"
    for bdf, vendor, device in (("0000:00:03.0", "0x1af4", "0x105a"),
                                ("0000:00:04.0", "0x8086", "0x10d3")):
        d = devs / bdf
        d.mkdir(parents=True)
        for name, value in (("vendor", vendor), ("device", device), ("class", "0x018000"),
                            ("subsystem_vendor", "0x1af4"), ("subsystem_device", "0x1100")):
            (d / name).write_text(value + "\n")
        (d / "driver_override").write_text("(null)\n")
    if driver:
        (drivers / driver).mkdir(parents=True)
        (devs / "0000:00:03.0" / "driver").symlink_to(drivers / driver)
    (drivers / "e1000e").mkdir(parents=True, exist_ok=True)
    (devs / "0000:00:04.0" / "driver").symlink_to(drivers / "e1000e")
    if vfio_loaded:
        (drivers / "vfio-pci").mkdir(parents=True, exist_ok=True)
    if group is not None:
        g = tmp_path / "sys" / "kernel" / "iommu_groups" / str(group)
        (g / "devices").mkdir(parents=True)
        for bdf in ("0000:00:03.0", "0000:00:04.0"):
            (g / "devices" / bdf).symlink_to(devs / bdf)
            (devs / bdf / "iommu_group").symlink_to(g)
    param = tmp_path / "noiommu"
    if noiommu is not None:
        param.write_text(noiommu + "\n")
    return Sysfs(root, noiommu_param=param, state_dir=tmp_path / "state")


def test_identity_and_listing(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    ident = s.identity("00:03.0")
    assert (ident.vendor, ident.device, ident.class_code) == (0x1AF4, 0x105A, 0x018000)
    assert s.functions(0x1AF4, 0x105A) == ["0000:00:03.0"]
    assert s.functions() == ["0000:00:03.0", "0000:00:04.0"]
    assert s.driver("0000:00:03.0") == "virtio-pci"
    assert s.iommu_group("0000:00:03.0") == 3
    assert s.group_members(3) == ["0000:00:03.0", "0000:00:04.0"]
    assert s.describe_members("0000:00:03.0", 3) == ["0000:00:04.0 (bound to e1000e)"]


def test_missing_function(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    with pytest.raises(BadAddressError, match="no PCI function 0000:00:05.0.*lspci -D"):
        s.identity("0000:00:05.0")


def test_vfio_pci_not_loaded(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path, vfio_loaded=False)
    with pytest.raises(VfioUnavailableError, match="modprobe vfio-pci"):
        s.bind_vfio("0000:00:03.0")


@pytest.mark.parametrize("param,words", [
    (None, ["no IOMMU group", "intel_iommu=on", "CONFIG_VFIO_NOIOMMU"]),
    ("N", ["no IOMMU group", "no-IOMMU mode is off", "echo Y >"]),
])
def test_iommu_off_and_noiommu_off(tmp_path: Path, param: str | None, words: list[str]) -> None:
    s = fake_sysfs(tmp_path, group=None, noiommu=param)
    with pytest.raises(IommuUnavailableError) as err:
        s.bind_vfio("0000:00:03.0")
    for w in words:
        assert w in str(err.value)
    # nothing was written: the function keeps its driver
    assert (s.device_dir("0000:00:03.0") / "driver_override").read_text() == "(null)\n"


def test_bind_records_the_original_driver(tmp_path: Path) -> None:
    """The sysfs writes happen in order; a fake tree has no kernel behind it, so the
    function does not really move and binding reports that (real binding: guest tests)."""
    s = fake_sysfs(tmp_path)
    dev = s.device_dir("0000:00:03.0")
    (dev / "driver" / "unbind").write_text("")
    (s.root / "drivers_probe").write_text("")
    with pytest.raises(PciError, match="binding 0000:00:03.0 to vfio-pci failed.*dmesg"):
        s.bind_vfio("0000:00:03.0")
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (dev / "driver" / "unbind").read_text() == "0000:00:03.0"
    assert (s.root / "drivers_probe").read_text() == "0000:00:03.0"
    assert (tmp_path / "state" / "0000:00:03.0.driver").read_text() == "virtio-pci\n"
    # a later process finds the original driver in the state file
    assert Sysfs(s.root, state_dir=tmp_path / "state")._recorded_original(
        "0000:00:03.0") == "virtio-pci"


def test_group_not_viable_message_names_members(tmp_path: Path) -> None:
    s = fake_sysfs(tmp_path)
    err = not_viable_error(3, s.describe_members("0000:00:03.0", 3))
    assert isinstance(err, GroupNotViableError) and isinstance(err, PciError)
    assert "IOMMU group 3 is not viable" in str(err)
    assert "0000:00:04.0 (bound to e1000e)" in str(err)
    assert "Unbind them" in str(err)


def test_noiommu_param_states(tmp_path: Path) -> None:
    assert fake_sysfs(tmp_path / "a", noiommu="Y").noiommu_enabled() is True
    assert fake_sysfs(tmp_path / "b", noiommu="N").noiommu_enabled() is False
    assert fake_sysfs(tmp_path / "c").noiommu_enabled() is None


# -- device helpers without VFIO ------------------------------------------------------------


def test_subtract_msix_table_pages() -> None:
    assert devmod.subtract([(0, 0x4000)], 0x1000, 0x2000) == [(0, 0x1000), (0x2000, 0x2000)]
    assert devmod.subtract([(0, 0x4000)], 0, 0x1000) == [(0x1000, 0x3000)]
    assert devmod.subtract([(0, 0x1000), (0x3000, 0x1000)], 0x1000, 0x3000) == [
        (0, 0x1000), (0x3000, 0x1000)]
    assert devmod.subtract([(0, 0x4000)], 0, 0x4000) == []


def test_msix_capability_parse() -> None:
    cs = ConfigSpace(0x1AF4, 0x105A)
    cs.add_capability(0x09, bytes(14))
    cs.add_msix(3, table_bar=1, table_offset=0x800, pba_bar=1, pba_offset=0xC00)
    read = lambda off, n: bytes(cs.data[off : off + n])  # noqa: E731
    assert [c.id for c in pcicfg.capabilities(read)] == [0x09, 0x11]
    m = pcicfg.msix_info(read)
    assert m is not None
    assert (m.table_size, m.table_bar, m.table_offset, m.pba_offset) == (3, 1, 0x800, 0xC00)
    assert m.table_bytes == 48 and not m.enabled


def test_pread_window_natural_width(tmp_path: Path) -> None:
    f = tmp_path / "region"
    f.write_bytes(bytes(range(16)) * 4)
    fd = os.open(f, os.O_RDWR)
    try:
        w = PreadWindow(fd, 16, 32, "test")
        assert w.read32(0) == 0x03020100
        assert w.read16(2) == 0x0302
        w.write16(4, 0xBEEF)
        assert w.read16(4) == 0xBEEF
        with pytest.raises(BarError, match="unaligned 4-byte access"):
            w.read32(2)
        with pytest.raises(BarError, match="outside the 0x20-byte window"):
            w.read8(32)
    finally:
        os.close(fd)


def test_vfio_device_rejects_bad_backend_and_address() -> None:
    with pytest.raises(PciError, match="unknown VFIO backend"):
        devmod.VfioPciDevice("0000:00:03.0", backend="magic")
    if os.geteuid() == 0:
        with pytest.raises(BadAddressError):
            devmod.VfioPciDevice("not-a-bdf")


def test_vfio_error_names_request() -> None:
    with pytest.raises(OSError, match="VFIO_GET_API_VERSION"):
        vfio.ioctl(-1, vfio.VFIO_GET_API_VERSION, what="VFIO_GET_API_VERSION")


def test_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfsdrv.pci.errors import NotRootError
    from vfsdrv.pci.sysfs import require_root

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotRootError, match="VFIO needs root.*sudo"):
        require_root()
    with pytest.raises(NotRootError):
        devmod.VfioPciDevice("0000:00:03.0")


def test_backend_override_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFSDRV_VFIO_BACKEND", "bogus")
    with pytest.raises(PciError, match="VFSDRV_VFIO_BACKEND"):
        devmod.VfioPciDevice("0000:00:03.0")


def test_owning_a_function_is_exclusive_across_processes(tmp_path: Path) -> None:
    """Two commands taking one function at once (bind, open; or give it back): the
    second waits until the first is done; nested in one process, no deadlock."""
    import subprocess
    import sys
    import time

    from vfsdrv.pci.sysfs import Sysfs

    sysfs = Sysfs(root=tmp_path / "sys", state_dir=tmp_path / "state")
    other = ("import sys; from vfsdrv.pci.sysfs import Sysfs; "
             "s = Sysfs(root=sys.argv[1], state_dir=sys.argv[2])\n"
             "with s.owning('0000:00:03.0'): print('got it', flush=True)")
    with sysfs.owning("0000:00:03.0"):
        with sysfs.owning("00:03.0"):  # the same function, nested: served by the outer
            pass
        child = subprocess.Popen([sys.executable, "-c", other, str(tmp_path / "sys"),
                                  str(tmp_path / "state")], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert child.poll() is None, "the other process did not wait"
        with sysfs.owning("0000:00:04.0"):  # another function is not held up
            pass
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and out == "got it\n"
