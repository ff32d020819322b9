"""The iommufd + VFIO device cdev path (/dev/iommu, /dev/vfio/devices/vfioN).

Flow (Documentation/driver-api/vfio.rst): open the cdev, open /dev/iommu,
VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT, then
IOMMU_IOAS_MAP. No-IOMMU devices cannot use this path (the kernel refuses them).
"""

from __future__ import annotations

import os

from . import vfio
from .container import DEFAULT_IOVA_RANGES, KernelIommu, _open
from .errors import PciError
from .vfio import ffi


def available() -> bool:
    return os.path.exists("/dev/iommu") and os.path.isdir("/dev/vfio/devices")


class Iommufd(KernelIommu):
    kind = "iommufd"

    def __init__(self) -> None:
        self.fd = _open("/dev/iommu", "iommufd")
        try:
            alloc = vfio.new("iommu_ioas_alloc")
            vfio.ioctl(self.fd, vfio.IOMMU_IOAS_ALLOC, alloc, what="IOMMU_IOAS_ALLOC")
            self.ioas = int(alloc.out_ioas_id)
        except BaseException:
            os.close(self.fd)
            raise
        self._mapped: dict[int, int] = {}
        self._ranges: list[tuple[int, int]] | None = None

    def open_device(self, cdev: str) -> int:
        """Open /dev/vfio/devices/<cdev>, bind it to this iommufd, attach it to the IOAS."""
        dfd = _open(f"/dev/vfio/devices/{cdev}", "VFIO device cdev")
        try:
            bind = vfio.new("vfio_device_bind_iommufd", iommufd=self.fd)
            bind.argsz = vfio.BIND_IOMMUFD_ARGSZ_V1
            vfio.ioctl(dfd, vfio.VFIO_DEVICE_BIND_IOMMUFD, bind, what="VFIO_DEVICE_BIND_IOMMUFD")
            att = vfio.new("vfio_device_attach_iommufd_pt", pt_id=self.ioas)
            att.argsz = vfio.ATTACH_IOMMUFD_PT_ARGSZ_V1
            vfio.ioctl(dfd, vfio.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att, what="ATTACH_IOMMUFD_PT")
        except OSError as e:
            os.close(dfd)
            raise PciError(f"binding /dev/vfio/devices/{cdev} to iommufd failed: {e}") from e
        return dfd

    def map(self, vaddr: int, size: int, iova: int | None) -> int:
        flags = vfio.IOMMU_IOAS_MAP_READABLE | vfio.IOMMU_IOAS_MAP_WRITEABLE
        if iova is not None:
            flags |= vfio.IOMMU_IOAS_MAP_FIXED_IOVA
        m = vfio.new(
            "iommu_ioas_map",
            flags=flags,
            ioas_id=self.ioas,
            user_va=vaddr,
            length=size,
            iova=iova or 0,
        )
        try:
            vfio.ioctl(self.fd, vfio.IOMMU_IOAS_MAP, m, what="IOMMU_IOAS_MAP")
        except OSError as e:
            raise PciError(f"IOMMU_IOAS_MAP of {size:#x} bytes failed: {e.strerror}") from e
        self._mapped[int(m.iova)] = size
        return int(m.iova)

    def unmap(self, iova: int, size: int) -> None:
        m = vfio.new("iommu_ioas_unmap", ioas_id=self.ioas, iova=iova, length=size)
        vfio.ioctl(self.fd, vfio.IOMMU_IOAS_UNMAP, m, what="IOMMU_IOAS_UNMAP")
        self._mapped.pop(iova, None)

    def iova_ranges(self) -> list[tuple[int, int]]:
        if self._ranges is None:
            q = vfio.new("iommu_ioas_iova_ranges", ioas_id=self.ioas)
            try:
                vfio.ioctl(self.fd, vfio.IOMMU_IOAS_IOVA_RANGES, q, what="IOAS_IOVA_RANGES")
            except OSError as e:
                if e.errno != 90:  # EMSGSIZE: num_iovas now says how many
                    self._ranges = DEFAULT_IOVA_RANGES
                    return self._ranges
            n = int(q.num_iovas)
            arr = ffi.new("struct iommu_iova_range[]", max(n, 1))
            q.allowed_iovas = int(ffi.cast("uintptr_t", arr))
            q.num_iovas = n
            vfio.ioctl(self.fd, vfio.IOMMU_IOAS_IOVA_RANGES, q, what="IOAS_IOVA_RANGES")
            self._ranges = [(int(arr[i].start), int(arr[i].last)) for i in range(n)]
        return self._ranges or DEFAULT_IOVA_RANGES
