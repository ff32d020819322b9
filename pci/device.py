"""A PCI function opened through VFIO: config space, BARs, interrupts, DMA.

`VfioPciDevice(bdf)` picks the VFIO backend (iommufd cdev when /dev/iommu and
/dev/vfio/devices exist and the function has a cdev; else the group/container
API, type1v2 or no-IOMMU; `backend=` or VFSDRV_VFIO_BACKEND forces one, and
`vfsdrv mount --iommu` passes it on), opens the device, resets it if VFIO says it can,
enables memory decoding and bus mastering, and then serves `PciFunction`.
BARs are mmapped only where VFIO allows and never over the MSI-X table; other
registers go through pread/pwrite on the region.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from . import config as pcicfg
from . import iommufd as iommufd_mod
from . import vfio
from .container import IommuContext, VfioContainer, VfioGroup
from .dma import PAGE_SIZE, DmaMemory
from .errors import BarError, PciError
from .function import MmioWindow, PciFunction, PreadWindow, RegisterWindow
from .sysfs import VFIO_PCI, Sysfs, normalize_bdf, require_root
from .vfio import ffi, libc

#: "type1" and "noiommu" are the container backend, insisting on that kind of group
BACKENDS = ("auto", "iommufd", "container", "type1", "noiommu")
log = logging.getLogger(__name__)


@dataclass
class Region:
    index: int
    flags: int
    size: int
    offset: int
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)  # (offset, size)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & vfio.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass
class IrqInfo:
    index: int
    flags: int
    count: int


def region_info(fd: int, index: int) -> Region:
    """VFIO_DEVICE_GET_REGION_INFO with its capability chain (re-queried with the argsz
    the kernel asks for)."""
    size = ffi.sizeof("struct vfio_region_info")
    for _ in range(3):
        buf = ffi.new("char[]", size)
        info = ffi.cast("struct vfio_region_info *", buf)
        info.argsz, info.index = size, index
        vfio.ioctl(fd, vfio.VFIO_DEVICE_GET_REGION_INFO, info, what=f"GET_REGION_INFO({index})")
        if info.argsz > size:
            size = int(info.argsz)
            continue
        region = Region(index, int(info.flags), int(info.size), int(info.offset))
        if region.mappable:
            region.mmap_areas = [(0, region.size)]
        if info.flags & vfio.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset:
            raw = ffi.buffer(buf, size)[:]
            caps = vfio.cap_chain(raw, int(info.cap_offset))
            off = caps.get(vfio.VFIO_REGION_INFO_CAP_SPARSE_MMAP)
            if off is not None:
                sp = ffi.cast(
                    "struct vfio_region_info_cap_sparse_mmap *", ffi.cast("char *", buf) + off
                )
                region.mmap_areas = [
                    (int(sp.areas[i].offset), int(sp.areas[i].size))
                    for i in range(int(sp.nr_areas))
                    if sp.areas[i].size
                ]
        return region
    raise PciError(f"VFIO region {index}: capability chain keeps growing")


def subtract(areas: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Remove [start, end) from a list of (offset, size) areas."""
    out = []
    for off, size in areas:
        a_end = off + size
        if end <= off or start >= a_end:
            out.append((off, size))
            continue
        if start > off:
            out.append((off, start - off))
        if end < a_end:
            out.append((end, a_end - end))
    return out


class VfioPciDevice(PciFunction):
    def __init__(
        self,
        bdf: str,
        *,
        backend: str = "auto",
        sysfs: Sysfs | None = None,
        bind: bool = False,
        reset: bool = True,
    ) -> None:
        if backend == "auto":  # like libvfn's VFN_IOMMU_FORCE_VFIO: the user can force one
            backend = os.environ.get("VFSDRV_VFIO_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise PciError(
                f"unknown VFIO backend {backend!r} (argument or VFSDRV_VFIO_BACKEND): choose "
                f"one of {', '.join(BACKENDS)}"
            )
        require_root()
        self.sysfs = sysfs or Sysfs()
        self.bdf = normalize_bdf(bdf)
        self.name = f"vfio:{self.bdf}"
        self.sysfs.device_dir(self.bdf)
        self.fd = -1
        #: DMA page size policy: None = huge pages when enough are free, True/False = force
        self.hugepages: bool | None = None
        #: without an IOMMU, accept DMA on 4 KiB pages, which may move (see vfsdrv.pci.dma)
        self.allow_unpinned_4k = False
        self.iommu: IommuContext | None = None
        self._maps: list[tuple[int, int]] = []  # (addr, length) to munmap
        self._bar_maps: dict[tuple[int, int], tuple[Any, int, int]] = {}
        self._msix_fds: list[int] = []
        self._req_fd: int | None = None
        self._bound_here = False
        # another process taking the function at the same time waits until this one
        # holds it (or gave it back): it then finds vfio-pci bound and the group busy
        with self.sysfs.owning(self.bdf):
            drv = self.sysfs.driver(self.bdf)
            if drv != VFIO_PCI:
                if not bind:
                    raise PciError(
                        f"{self.bdf} is bound to {drv or 'no driver'}, not vfio-pci: bind it "
                        f"first (open it with bind=True, or: echo vfio-pci > "
                        f"/sys/bus/pci/devices/{self.bdf}/driver_override; echo {self.bdf} > "
                        f"/sys/bus/pci/devices/{self.bdf}/driver/unbind; echo {self.bdf} > "
                        "/sys/bus/pci/drivers_probe)"
                    )
                self.sysfs.bind_vfio(self.bdf)
                self._bound_here = True
            try:
                self._open(backend)
                self._setup()
            except BaseException:
                self.close()
                if self._bound_here:  # give it back rather than leave it half-taken
                    try:
                        self.sysfs.unbind_vfio(self.bdf)
                    except PciError:
                        pass
                raise

    # -- bring-up ---------------------------------------------------------------------------
    def _open(self, backend: str) -> None:
        group = self.sysfs.iommu_group(self.bdf)
        if group is None:
            raise self.sysfs.no_iommu_error(self.bdf)
        noiommu = os.path.exists(f"/dev/vfio/noiommu-{group}")
        cdev = self.sysfs.vfio_dev_name(self.bdf)
        if backend == "type1" and noiommu:
            raise PciError(
                f"{self.bdf} is in a no-IOMMU group (/dev/vfio/noiommu-{group}): there is no "
                "IOMMU for a type1 container; use --iommu noiommu"
            )
        if backend == "noiommu" and not noiommu:
            raise PciError(
                f"{self.bdf} is behind an IOMMU (group {group}); no-IOMMU mode is only for "
                "functions without one: use --iommu type1 or iommufd"
            )
        use_iommufd = backend == "iommufd" or (
            backend == "auto" and not noiommu and cdev is not None and iommufd_mod.available()
        )
        if use_iommufd:
            if noiommu:
                raise PciError(
                    f"{self.bdf} is in a no-IOMMU group; iommufd cannot drive it: use the "
                    "container backend (--iommu noiommu)"
                )
            if cdev is None or not iommufd_mod.available():
                raise PciError(
                    "the iommufd backend needs /dev/iommu and /dev/vfio/devices/vfioN "
                    "(CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV): use the container backend "
                    "(--iommu type1)"
                )
            try:
                ctx = iommufd_mod.Iommufd()
                self.iommu = ctx
                self.fd = ctx.open_device(cdev)
                log.info("%s: VFIO through iommufd (/dev/vfio/devices/%s)", self.bdf, cdev)
                return
            except (PciError, OSError) as e:
                if self.iommu is not None:
                    self.iommu.close()
                    self.iommu = None
                if backend == "iommufd":
                    raise
                # auto: the group/container API still works on every kernel with cdevs
                log.warning("%s: iommufd path failed (%s); using the VFIO container", self.bdf, e)
        grp = VfioGroup(group, noiommu)
        members = self.sysfs.describe_members(self.bdf, group)
        try:
            self.iommu = VfioContainer(grp, members)
        except BaseException:
            grp.close()
            raise
        self.fd = grp.get_device_fd(self.bdf)
        log.info("%s: VFIO group %s, %s container", self.bdf, grp.path, self.iommu.kind)

    def _setup(self) -> None:
        info = vfio.new("vfio_device_info")
        vfio.ioctl(self.fd, vfio.VFIO_DEVICE_GET_INFO, info, what="VFIO_DEVICE_GET_INFO")
        self.device_flags = int(info.flags)
        if not self.device_flags & vfio.VFIO_DEVICE_FLAGS_PCI:
            raise PciError(f"{self.bdf}: VFIO says this is not a PCI device")
        self.num_regions, self.num_irqs = int(info.num_regions), int(info.num_irqs)
        self.regions = {
            i: region_info(self.fd, i)
            for i in (*range(6), vfio.VFIO_PCI_CONFIG_REGION_INDEX)
            if i < self.num_regions
        }
        cfg = self.regions.get(vfio.VFIO_PCI_CONFIG_REGION_INDEX)
        if cfg is None or cfg.size < pcicfg.CONFIG_SPACE_SIZE:
            raise PciError(f"{self.bdf}: VFIO exposes no config space region")
        self.irqs = {
            i: self._irq_info(i)
            for i in (vfio.VFIO_PCI_MSIX_IRQ_INDEX, vfio.VFIO_PCI_REQ_IRQ_INDEX)
            if i < self.num_irqs
        }
        if self.device_flags & vfio.VFIO_DEVICE_FLAGS_RESET:
            try:
                vfio.ioctl(self.fd, vfio.VFIO_DEVICE_RESET, what="VFIO_DEVICE_RESET")
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTTY, errno.EAGAIN):
                    raise PciError(f"{self.bdf}: VFIO_DEVICE_RESET failed: {e.strerror}") from e
        self.msix = pcicfg.msix_info(self.config_read)
        cmd = struct.unpack("<H", self.config_read(pcicfg.COMMAND, 2))[0]
        cmd |= pcicfg.COMMAND_MEMORY | pcicfg.COMMAND_MASTER
        self.config_write(pcicfg.COMMAND, struct.pack("<H", cmd))

    def _irq_info(self, index: int) -> IrqInfo:
        irq = vfio.new("vfio_irq_info", index=index)
        try:
            vfio.ioctl(self.fd, vfio.VFIO_DEVICE_GET_IRQ_INFO, irq, what="GET_IRQ_INFO")
        except OSError:
            return IrqInfo(index, 0, 0)
        return IrqInfo(index, int(irq.flags), int(irq.count))

    # -- config space -----------------------------------------------------------------------
    def config_read(self, offset: int, length: int) -> bytes:
        cfg = self.regions[vfio.VFIO_PCI_CONFIG_REGION_INDEX]
        if offset < 0 or offset + length > cfg.size:
            raise PciError(f"{self.bdf}: config read {offset:#x}+{length} out of range")
        data = os.pread(self.fd, length, cfg.offset + offset)
        if len(data) != length:
            raise PciError(f"{self.bdf}: short config space read at {offset:#x}")
        return data

    def config_write(self, offset: int, data: bytes) -> None:
        cfg = self.regions[vfio.VFIO_PCI_CONFIG_REGION_INDEX]
        if os.pwrite(self.fd, data, cfg.offset + offset) != len(data):
            raise PciError(f"{self.bdf}: short config space write at {offset:#x}")

    # -- BARs ---------------------------------------------------------------------------------
    def bar_size(self, index: int) -> int:
        region = self.regions.get(index)
        return region.size if region else 0

    def mmap_areas(self, index: int) -> list[tuple[int, int]]:
        """Where BAR `index` may be mmapped: VFIO's areas minus the MSI-X table pages."""
        region = self.regions.get(index)
        if region is None or not region.mappable:
            return []
        areas = list(region.mmap_areas)
        if self.msix is not None and self.msix.table_bar == index:
            start = self.msix.table_offset // PAGE_SIZE * PAGE_SIZE
            end = -(-(self.msix.table_offset + self.msix.table_bytes) // PAGE_SIZE) * PAGE_SIZE
            areas = subtract(areas, start, end)
        return areas

    def bar_window(self, index: int, offset: int, length: int, name: str) -> RegisterWindow:
        region = self.regions.get(index)
        if region is None or region.size == 0:
            raise BarError(f"{self.bdf}: BAR{index} is not implemented ({name} lives there)")
        if offset < 0 or offset + length > region.size:
            raise BarError(
                f"{self.bdf}: {name} at BAR{index}+{offset:#x} ({length:#x} bytes) exceeds the "
                f"{region.size:#x}-byte BAR"
            )
        for a_off, a_size in self.mmap_areas(index):
            if a_off <= offset and offset + length <= a_off + a_size:
                base = self._map_area(region, a_off, a_size)
                return MmioWindow(base + (offset - a_off), length, name, keepalive=self)
        return PreadWindow(self.fd, region.offset + offset, length, name)

    def _map_area(self, region: Region, a_off: int, a_size: int) -> Any:
        key = (region.index, a_off)
        if key not in self._bar_maps:
            prot = vfio.PROT_READ | vfio.PROT_WRITE
            p = libc.mmap(ffi.NULL, a_size, prot, vfio.MAP_SHARED, self.fd, region.offset + a_off)
            if int(ffi.cast("uintptr_t", p)) == vfio.MAP_FAILED:
                raise BarError(
                    f"{self.bdf}: mmap of BAR{region.index}+{a_off:#x} failed: "
                    f"{os.strerror(ffi.errno)}"
                )
            libc.madvise(p, a_size, vfio.MADV_DONTFORK)
            self._bar_maps[key] = (ffi.cast("char *", p), a_off, a_size)
            self._maps.append((int(ffi.cast("uintptr_t", p)), a_size))
        return self._bar_maps[key][0]

    # -- interrupts ---------------------------------------------------------------------------
    def msix_vectors(self) -> int:
        irq = self.irqs.get(vfio.VFIO_PCI_MSIX_IRQ_INDEX)
        if irq is None or not irq.flags & vfio.VFIO_IRQ_INFO_EVENTFD or self.msix is None:
            return 0
        return min(irq.count, self.msix.table_size)

    def _set_irq_eventfds(self, index: int, fds: list[int]) -> None:
        n = len(fds)
        size = ffi.sizeof("struct vfio_irq_set") + 4 * n
        buf = ffi.new("char[]", size)
        s = ffi.cast("struct vfio_irq_set *", buf)
        s.argsz, s.index, s.start, s.count = size, index, 0, n
        if n:
            s.flags = vfio.VFIO_IRQ_SET_DATA_EVENTFD | vfio.VFIO_IRQ_SET_ACTION_TRIGGER
            data = ffi.cast("int32_t *", s.data)
            for i, fd in enumerate(fds):
                data[i] = fd
        else:
            s.flags = vfio.VFIO_IRQ_SET_DATA_NONE | vfio.VFIO_IRQ_SET_ACTION_TRIGGER
        vfio.ioctl(self.fd, vfio.VFIO_DEVICE_SET_IRQS, s, what=f"SET_IRQS(index {index})")

    def enable_msix(self, count: int) -> list[int]:
        avail = self.msix_vectors()
        if not 0 < count <= avail:
            raise PciError(f"{self.bdf}: {count} MSI-X vectors asked for, {avail} available")
        self.disable_msix()
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        try:
            self._set_irq_eventfds(vfio.VFIO_PCI_MSIX_IRQ_INDEX, fds)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise PciError(f"{self.bdf}: enabling {count} MSI-X vectors failed: {e}") from e
        self._msix_fds = fds
        return list(fds)

    def disable_msix(self) -> None:
        if self._msix_fds:
            try:
                self._set_irq_eventfds(vfio.VFIO_PCI_MSIX_IRQ_INDEX, [])
            except OSError:
                pass
            for fd in self._msix_fds:
                os.close(fd)
            self._msix_fds = []

    def request_fd(self) -> int | None:
        if self._req_fd is None:
            irq = self.irqs.get(vfio.VFIO_PCI_REQ_IRQ_INDEX)
            if irq is None or irq.count < 1 or not irq.flags & vfio.VFIO_IRQ_INFO_EVENTFD:
                return None
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self._set_irq_eventfds(vfio.VFIO_PCI_REQ_IRQ_INDEX, [fd])
            except OSError:
                os.close(fd)
                return None
            self._req_fd = fd
        return self._req_fd

    # -- DMA ----------------------------------------------------------------------------------
    @property
    def iommu_mode(self) -> str:
        return self.iommu.kind if self.iommu is not None else "noiommu"

    def alloc_dma(self, size: int, iova: bool) -> DmaMemory:
        return DmaMemory(size, self.iommu, iova=iova, hugepages=self.hugepages,
                         allow_unpinned_4k=self.allow_unpinned_4k)

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            self.disable_msix()
            if self._req_fd is not None:
                try:
                    self._set_irq_eventfds(vfio.VFIO_PCI_REQ_IRQ_INDEX, [])
                except OSError:
                    pass
                os.close(self._req_fd)
                self._req_fd = None
        self.unmapped = True  # MmioWindows of this device refuse access from now on
        for addr, length in self._maps:
            libc.munmap(ffi.cast("void *", addr), length)
        self._maps.clear()
        self._bar_maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.iommu is not None:
            self.iommu.close()
            self.iommu = None
