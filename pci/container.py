"""The legacy VFIO group/container API: type1v2 IOMMU and no-IOMMU.

Bring-up order (Documentation/driver-api/vfio.rst): open the container, check the
API version and extension, open the group, check it is viable, attach it to the
container, set the IOMMU type, then get the device fd. DMA mapping goes through
the container (`IommuContext`, shared with the iommufd backend).
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod

from . import vfio
from .errors import GroupNotViableError, PciError, VfioUnavailableError
from .vfio import ffi

#: IOVA window used when the kernel does not report one (libvfn's default)
DEFAULT_IOVA_RANGES = [(0x10000, (1 << 39) - 1)]


class IommuContext(ABC):
    """Where DMA mappings are made: a VFIO container or an iommufd IOAS."""

    kind: str = "none"

    @property
    def translates(self) -> bool:
        """False in no-IOMMU mode: the device sees physical addresses, nothing to map."""
        return True

    @abstractmethod
    def map(self, vaddr: int, size: int, iova: int | None) -> int:
        """Map [vaddr, vaddr+size) read/write at `iova` (None: the context chooses);
        returns the IOVA. Pins the pages."""

    @abstractmethod
    def unmap(self, iova: int, size: int) -> None: ...

    @abstractmethod
    def iova_ranges(self) -> list[tuple[int, int]]:
        """Usable IOVA ranges as (first, last) inclusive."""

    @abstractmethod
    def close(self) -> None: ...


class KernelIommu(IommuContext):
    """A context behind a kernel file descriptor (VFIO container, iommufd) that keeps
    its mappings (iova -> size) in _mapped, so that close() can undo them."""

    fd: int
    _mapped: dict[int, int]

    def close(self) -> None:
        for iova, size in list(self._mapped.items()):
            try:
                self.unmap(iova, size)
            except OSError:
                pass  # closing the fd drops what is left
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise VfioUnavailableError(
            f"{path} does not exist ({what}): load vfio-pci (`modprobe vfio-pci`) and bind the "
            "function to it"
        ) from e
    except PermissionError as e:
        raise PciError(f"cannot open {path} ({what}): permission denied; run as root") from e
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise PciError(
                f"{path} is busy: another process (another vfsdrv, QEMU, DPDK) already uses this "
                "VFIO group; stop it first"
            ) from e
        raise PciError(f"cannot open {path} ({what}): {e.strerror}") from e


def not_viable_error(group: int, members: list[str]) -> GroupNotViableError:
    others = ", ".join(members) or "(see /sys/kernel/iommu_groups)"
    return GroupNotViableError(
        f"IOMMU group {group} is not viable: every function in it must be bound to vfio-pci "
        f"or to no driver; other members: {others}. Unbind them (or bind them to vfio-pci) "
        "first, or put the device in its own group (another slot, ACS)"
    )


class VfioGroup:
    def __init__(self, number: int, noiommu: bool) -> None:
        self.number = number
        self.noiommu = noiommu
        self.path = f"/dev/vfio/{'noiommu-' if noiommu else ''}{number}"
        self.fd = _open(self.path, "VFIO group")

    def status(self) -> int:
        st = vfio.new("vfio_group_status")
        vfio.ioctl(self.fd, vfio.VFIO_GROUP_GET_STATUS, st, what="VFIO_GROUP_GET_STATUS")
        return int(st.flags)

    def viable(self) -> bool:
        return bool(self.status() & vfio.VFIO_GROUP_FLAGS_VIABLE)

    def get_device_fd(self, bdf: str) -> int:
        name = ffi.new("char[]", bdf.encode())
        try:
            return vfio.ioctl(self.fd, vfio.VFIO_GROUP_GET_DEVICE_FD, name, what="GET_DEVICE_FD")
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise PciError(f"{bdf} is already open through VFIO by another user") from e
            raise PciError(f"VFIO_GROUP_GET_DEVICE_FD({bdf}) failed: {e.strerror}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VfioContainer(KernelIommu):
    """A container with one group attached; type1v2, or no-IOMMU for noiommu groups."""

    def __init__(self, group: VfioGroup, describe_members: list[str] | None = None) -> None:
        self.group = group
        self.fd = _open("/dev/vfio/vfio", "VFIO container")
        self._mapped: dict[int, int] = {}
        try:
            version = vfio.ioctl(self.fd, vfio.VFIO_GET_API_VERSION, what="VFIO_GET_API_VERSION")
            if version != vfio.VFIO_API_VERSION:
                raise PciError(f"unknown VFIO API version {version} (expected 0)")
            self.iommu_type = vfio.VFIO_NOIOMMU_IOMMU if group.noiommu else vfio.VFIO_TYPE1v2_IOMMU
            self.kind = "noiommu" if group.noiommu else "type1"
            if not vfio.ioctl(self.fd, vfio.VFIO_CHECK_EXTENSION, self.iommu_type):
                if group.noiommu:
                    raise VfioUnavailableError(
                        "the VFIO container does not offer no-IOMMU mode: enable it with `echo Y >"
                        " /sys/module/vfio/parameters/enable_unsafe_noiommu_mode`"
                    )
                raise VfioUnavailableError(
                    "the VFIO container does not offer the type1v2 IOMMU: `modprobe "
                    "vfio_iommu_type1`"
                )
            if not group.viable():
                raise not_viable_error(group.number, describe_members or [])
            gfd = ffi.new("int *", self.fd)
            vfio.ioctl(group.fd, vfio.VFIO_GROUP_SET_CONTAINER, gfd, what="GROUP_SET_CONTAINER")
            vfio.ioctl(self.fd, vfio.VFIO_SET_IOMMU, self.iommu_type, what="VFIO_SET_IOMMU")
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self._ranges: list[tuple[int, int]] | None = None

    @property
    def translates(self) -> bool:
        return not self.group.noiommu

    def map(self, vaddr: int, size: int, iova: int | None) -> int:
        if self.group.noiommu:
            raise PciError(
                "no-IOMMU containers cannot map DMA (the device uses physical addresses)"
            )
        if iova is None:
            raise PciError("the type1 container needs an explicit IOVA")
        m = vfio.new(
            "vfio_iommu_type1_dma_map",
            flags=vfio.VFIO_DMA_MAP_FLAG_READ | vfio.VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        try:
            vfio.ioctl(self.fd, vfio.VFIO_IOMMU_MAP_DMA, m, what="VFIO_IOMMU_MAP_DMA")
        except OSError as e:
            raise PciError(
                f"VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x} failed: {e.strerror}"
                + (
                    " (locked-memory limit: raise `ulimit -l`)"
                    if e.errno == errno.ENOMEM
                    else ""
                )
            ) from e
        self._mapped[iova] = size
        return iova

    def unmap(self, iova: int, size: int) -> None:
        m = vfio.new("vfio_iommu_type1_dma_unmap", iova=iova, size=size)
        vfio.ioctl(self.fd, vfio.VFIO_IOMMU_UNMAP_DMA, m, what="VFIO_IOMMU_UNMAP_DMA")
        self._mapped.pop(iova, None)

    def iova_ranges(self) -> list[tuple[int, int]]:
        if self.group.noiommu:
            return []
        if self._ranges is None:
            self._ranges = self._query_ranges() or DEFAULT_IOVA_RANGES
        return self._ranges

    def _query_ranges(self) -> list[tuple[int, int]]:
        size = ffi.sizeof("struct vfio_iommu_type1_info")
        for _ in range(3):  # argsz grows to hold the capability chain
            buf = ffi.new("char[]", size)
            info = ffi.cast("struct vfio_iommu_type1_info *", buf)
            info.argsz = size
            try:
                vfio.ioctl(self.fd, vfio.VFIO_IOMMU_GET_INFO, info, what="VFIO_IOMMU_GET_INFO")
            except OSError:
                return []
            if info.argsz > size:
                size = int(info.argsz)
                continue
            if not info.flags & vfio.VFIO_IOMMU_INFO_CAPS or not info.cap_offset:
                return []
            raw = ffi.buffer(buf, size)[:]
            caps = vfio.cap_chain(raw, int(info.cap_offset))
            off = caps.get(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
            if off is None:
                return []
            cap = ffi.cast(
                "struct vfio_iommu_type1_info_cap_iova_range *", ffi.cast("char *", buf) + off
            )
            return [
                (int(cap.iova_ranges[i].start), int(cap.iova_ranges[i].end))
                for i in range(int(cap.nr_iovas))
            ]
        return []

    def close(self) -> None:
        super().close()
        self.group.close()
