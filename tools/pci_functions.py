"""Host administration of virtio-fs PCI functions: which there are, their tags,
whether the kernel uses one (a virtiofs mount of its tag), finding one by tag, and
opening one for vfsdrv after those checks. Used by `vfsdrv list | bind | mount |
check`; the virtio-pci transport itself (vfsdrv.virtio.pci) knows none of this.

A tag is read without the virtio core and without side effects: device config and
config_generation through a sysfs BAR mapping, or through the PCI cfg access
capability while the kernel's driver owns the BARs.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import CapabilityError, ConfigError, TransportError, VfsdrvError
from ..fs.config import decode_tag
from ..pci.errors import BadAddressError, DeviceBusyError, WrongDeviceError
from ..pci.function import PciFunction, RegisterWindow
from ..pci.resource import SysfsFunction
from ..pci.sysfs import Sysfs, normalize_bdf
from ..virtio.pci import (
    COMMON_CFG_MIN,
    CONFIG_GENERATION,
    DEFAULT_DMA_SIZE,
    VIRTIO_FS_CONFIG_MIN,
    VIRTIO_FS_PCI_DEVICE,
    VIRTIO_FS_TAG_SIZE,
    VIRTIO_ID_FS,
    VIRTIO_PCI_VENDOR,
    VirtioPciTransport,
    check_identity,
    open_pci,
    parse_capabilities,
)


class PciCfgWindow(RegisterWindow):
    """BAR registers reached through the VIRTIO_PCI_CAP_PCI_CFG window in config space
    (virtio 1.2 4.1.4.9): set bar/offset/length in the capability, then access
    pci_cfg_data. For reading a device whose BARs cannot be mapped (a kernel driver
    owns them). Read-only here."""

    def __init__(self, fn: PciFunction, cap_pos: int, bar: int, base: int, length: int,
                 name: str) -> None:
        super().__init__(length, name)
        self.fn, self.pos, self.bar, self.base = fn, cap_pos, bar, base

    def _read(self, off: int, width: int) -> int:
        # cap.offset must be a multiple of cap.length: natural alignment, checked by _check
        self.fn.config_write(self.pos + 4, bytes([self.bar]))
        self.fn.config_write(self.pos + 8, struct.pack("<II", self.base + off, width))
        return int.from_bytes(self.fn.config_read(self.pos + 16, width), "little")

    def _write(self, off: int, width: int, value: int) -> None:
        raise TransportError(f"{self.name}: the PCI cfg access window is used read-only")


def read_virtiofs_tag(fn: PciFunction, retries: int = 10, *, via_pci_cfg: bool = False) -> str:
    """The tag of a virtio-fs PCI function, without the virtio core (for `list` and
    bind-by-tag). Reading device config and config_generation has no side effects.
    `via_pci_cfg` reads through the PCI cfg access capability instead of the BARs
    (works while the kernel's driver owns them)."""
    check_identity(fn, VIRTIO_ID_FS)
    caps = parse_capabilities(fn)
    if caps.device is None:
        raise CapabilityError(
            f"{fn.name}: virtio-fs function without a device cfg capability (the tag lives there)"
        )
    if caps.device.length < VIRTIO_FS_CONFIG_MIN:
        raise CapabilityError(
            f"{caps.device.name}: length {caps.device.length} is below the {VIRTIO_FS_CONFIG_MIN}"
            "-byte virtio-fs config (tag + num_request_queues)"
        )
    if via_pci_cfg:
        if caps.pci_cfg is None:
            raise CapabilityError(f"{fn.name}: no PCI cfg access capability")
        c, d = caps.common, caps.device
        common: RegisterWindow = PciCfgWindow(fn, caps.pci_cfg, c.bar, c.offset, COMMON_CFG_MIN,
                                              "common cfg")
        devcfg: RegisterWindow = PciCfgWindow(fn, caps.pci_cfg, d.bar, d.offset,
                                              VIRTIO_FS_TAG_SIZE, "device cfg")
    else:
        common = fn.bar_window(caps.common.bar, caps.common.offset, COMMON_CFG_MIN, "common cfg")
        devcfg = fn.bar_window(caps.device.bar, caps.device.offset, VIRTIO_FS_TAG_SIZE,
                               "device cfg")
    for _ in range(retries):
        gen = common.read8(CONFIG_GENERATION)
        raw = devcfg.read_bytes(0, VIRTIO_FS_TAG_SIZE)
        if common.read8(CONFIG_GENERATION) == gen:
            return decode_tag(raw)
    raise ConfigError(f"{fn.name}: config generation kept changing while reading the tag")


def mounted_virtiofs(tag: str, mounts: str = "/proc/mounts") -> list[str]:
    """Mount points of kernel virtiofs mounts of `tag`."""
    out = []
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "virtiofs" and parts[0] == tag:
                    out.append(parts[1].replace("\\040", " "))
    except OSError:
        pass
    return out


def check_not_mounted(bdf: str, tag: str, mounts: str = "/proc/mounts") -> None:
    where = mounted_virtiofs(tag, mounts)
    if where:
        raise DeviceBusyError(
            f"{bdf} (virtio-fs tag {tag!r}) is in use by the kernel: mounted on "
            f"{', '.join(where)}; unmount it first (`umount {where[0]}`)"
        )


def check_kernel_not_using(bdf: str, sysfs: Sysfs, mounts: str = "/proc/mounts") -> None:
    """Refuse to take a virtio-fs function away from the kernel while it is mounted."""
    tag = kernel_tag(bdf, sysfs)
    if tag is not None:
        check_not_mounted(bdf, tag, mounts)
        return
    # tag unreadable: refuse if the kernel's virtiofs driver holds it and anything is mounted
    held = [p for p in sysfs.device_dir(bdf).glob("virtio*/driver")
            if os.path.basename(os.readlink(p)) == "virtiofs"]
    if held and any(mounted_virtiofs_all(mounts)):
        raise DeviceBusyError(
            f"{bdf} is in use by the kernel's virtiofs driver and virtiofs file systems are "
            f"mounted ({', '.join(mounted_virtiofs_all(mounts))}); its tag could not be read "
            "to tell which: unmount them first"
        )


def mounted_virtiofs_all(mounts: str = "/proc/mounts") -> list[str]:
    try:
        with open(mounts) as f:
            return [ln.split()[1] for ln in f if len(ln.split()) >= 3
                    and ln.split()[2] == "virtiofs"]
    except OSError:
        return []


@dataclass(frozen=True)
class FsFunction:
    """A virtio-fs PCI function as `list` shows it."""

    bdf: str
    driver: str | None
    iommu_group: int | None
    tag: str | None
    error: str | None = None  # why the tag could not be read


def function_tag(bdf: str, sysfs: Sysfs) -> str:
    """Tag of a virtio-fs function whoever owns it: through a sysfs BAR mapping where the
    kernel allows one, else through the PCI cfg access capability."""

    errors = []
    for via_pci_cfg in (False, True):
        try:
            with SysfsFunction(bdf, sysfs) as sfn:
                return read_virtiofs_tag(sfn, via_pci_cfg=via_pci_cfg)
        except (OSError, VfsdrvError) as e:
            errors.append(str(e))
    raise ConfigError(f"{bdf}: cannot read the virtio-fs tag: {'; '.join(errors)}")


def list_virtiofs(sysfs: Sysfs | None = None) -> list[FsFunction]:
    """Every virtio-fs PCI function (1af4:105a) with its driver, IOMMU group and tag."""
    sysfs = sysfs or Sysfs()
    out = []
    for bdf in sysfs.functions(VIRTIO_PCI_VENDOR, VIRTIO_FS_PCI_DEVICE):
        try:
            tag, err = function_tag(bdf, sysfs), None
        except VfsdrvError as e:
            tag, err = None, str(e)
        out.append(FsFunction(bdf, sysfs.driver(bdf), sysfs.iommu_group(bdf), tag, err))
    return out


def find_by_tag(tag: str, sysfs: Sysfs | None = None) -> str:
    """The PCI address of the virtio-fs function with this tag."""

    found = list_virtiofs(sysfs)
    hits = [f.bdf for f in found if f.tag == tag]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConfigError(f"virtio-fs tag {tag!r} is used by several functions: "
                          f"{', '.join(hits)}; give the address instead")
    known = ", ".join(f"{f.bdf} ({f.tag!r})" if f.tag else f"{f.bdf} (tag unreadable)"
                      for f in found) or "none"
    raise BadAddressError(f"no virtio-fs PCI function has tag {tag!r}; there are: {known}")


def kernel_tag(bdf: str, sysfs: Sysfs) -> str | None:
    try:
        return function_tag(bdf, sysfs)
    except VfsdrvError:
        return None


def open_fs_function(
    bdf: str, *, backend: str = "auto", bind: bool = True, poll: bool = False,
    dma_size: int = DEFAULT_DMA_SIZE, allow_unpinned_4k: bool = False,
) -> VirtioPciTransport:
    """The transport of a virtio-fs function, once it is one and the kernel does not
    use it (refused while its tag is mounted through the kernel's virtiofs)."""
    sysfs = Sysfs()
    bdf = normalize_bdf(bdf)
    ident = sysfs.identity(bdf)
    if (ident.vendor, ident.device) != (VIRTIO_PCI_VENDOR, VIRTIO_FS_PCI_DEVICE):
        found = sysfs.functions(VIRTIO_PCI_VENDOR, VIRTIO_FS_PCI_DEVICE)
        raise WrongDeviceError(
            f"{bdf} is {ident.vendor:04x}:{ident.device:04x}, not a virtio-fs function "
            f"(1af4:105a); virtio-fs functions here: {', '.join(found) or 'none'}"
        )
    if sysfs.driver(bdf) not in (None, "vfio-pci"):
        check_kernel_not_using(bdf, sysfs)
    return open_pci(bdf, backend=backend, bind=bind, poll=poll, dma_size=dma_size,
                    device_id=VIRTIO_ID_FS, allow_unpinned_4k=allow_unpinned_4k)
