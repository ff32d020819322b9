"""The VFIO and iommufd user ABI: structures, ioctl numbers, constants, one ioctl call.

Every structure is declared once, here, with cffi (ABI mode: nothing is compiled;
`ioctl` comes from libc). `tests/test_pci_vfio_layout.py` pins each size and field
offset to the values of `linux/vfio.h` / `linux/iommufd.h`, so a typo cannot
silently shift a field. Where newer kernels grew a structure (a trailing `pad`,
`token_uuid_ptr`, `pasid`), the newer layout is declared and callers pass the
older, smaller `argsz` when they do not use the new fields; the kernel accepts
any argsz >= its minimum.
"""

from __future__ import annotations

import os
from typing import Any

from cffi import FFI

CDEF = """
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mlock(const void *addr, size_t len);
int munlock(const void *addr, size_t len);
int madvise(void *addr, size_t length, int advice);

struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; };

struct vfio_group_status { uint32_t argsz; uint32_t flags; };

struct vfio_device_info {
    uint32_t argsz; uint32_t flags; uint32_t num_regions; uint32_t num_irqs;
    uint32_t cap_offset; uint32_t pad;
};

struct vfio_region_info {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t cap_offset;
    uint64_t size; uint64_t offset;
};

struct vfio_region_sparse_mmap_area { uint64_t offset; uint64_t size; };

struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header; uint32_t nr_areas; uint32_t reserved;
    struct vfio_region_sparse_mmap_area areas[];
};

struct vfio_irq_info { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t count; };

struct vfio_irq_set {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t start; uint32_t count;
    uint8_t data[];
};

struct vfio_iommu_type1_info {
    uint32_t argsz; uint32_t flags; uint64_t iova_pgsizes; uint32_t cap_offset;
};

struct vfio_iova_range { uint64_t start; uint64_t end; };

struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header; uint32_t nr_iovas; uint32_t reserved;
    struct vfio_iova_range iova_ranges[];
};

struct vfio_iommu_type1_dma_map {
    uint32_t argsz; uint32_t flags; uint64_t vaddr; uint64_t iova; uint64_t size;
};

struct vfio_iommu_type1_dma_unmap {
    uint32_t argsz; uint32_t flags; uint64_t iova; uint64_t size;
};

struct vfio_device_bind_iommufd {
    uint32_t argsz; uint32_t flags; int32_t iommufd; uint32_t out_devid;
    uint64_t token_uuid_ptr;
};

struct vfio_device_attach_iommufd_pt {
    uint32_t argsz; uint32_t flags; uint32_t pt_id; uint32_t pasid;
};

struct vfio_device_detach_iommufd_pt { uint32_t argsz; uint32_t flags; uint32_t pasid; };

struct iommu_destroy { uint32_t size; uint32_t id; };

struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; };

struct iommu_iova_range { uint64_t start; uint64_t last; };

struct iommu_ioas_iova_ranges {
    uint32_t size; uint32_t ioas_id; uint32_t num_iovas; uint32_t __reserved;
    uint64_t allowed_iovas; uint64_t out_iova_alignment;
};

struct iommu_ioas_map {
    uint32_t size; uint32_t flags; uint32_t ioas_id; uint32_t __reserved;
    uint64_t user_va; uint64_t length; uint64_t iova;
};

struct iommu_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; };
"""

ffi = FFI()
ffi.cdef(CDEF)
libc: Any = ffi.dlopen(None)

# -- ioctl numbers: _IO(';', 100 + n) for VFIO, _IO(';', 0x80 + k) for iommufd ------------
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    return (VFIO_TYPE << 8) | nr


VFIO_GET_API_VERSION = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _io(VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _io(VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _io(VFIO_BASE + 10)
VFIO_DEVICE_RESET = _io(VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _io(VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io(VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_BASE + 14)
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_BASE + 20)

IOMMU_DESTROY = _io(0x80)
IOMMU_IOAS_ALLOC = _io(0x81)
IOMMU_IOAS_IOVA_RANGES = _io(0x84)
IOMMU_IOAS_MAP = _io(0x85)
IOMMU_IOAS_UNMAP = _io(0x86)

VFIO_API_VERSION = 0

# -- constants -------------------------------------------------------------------------------
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# vfio-pci fixed region and IRQ indices
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4

#: argsz of the older (6.6) forms, used when the newer trailing fields are not needed
BIND_IOMMUFD_ARGSZ_V1 = 16
ATTACH_IOMMUFD_PT_ARGSZ_V1 = 12

# mmap / madvise
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_LOCKED, MAP_POPULATE, MAP_HUGETLB = 0x2000, 0x8000, 0x40000
MAP_HUGE_SHIFT = 26
MADV_DONTFORK = 10
MAP_FAILED = 2**64 - 1


def ioctl(fd: int, request: int, arg: Any = None, *, what: str = "") -> int:
    """Issue one ioctl; `arg` is a cffi pointer, an int (passed by value) or None.
    Raises OSError carrying errno and naming the request on failure."""
    if arg is None:
        arg = ffi.cast("unsigned long", 0)
    elif isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret = libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{what or hex(request)}: {os.strerror(err)}")
    return int(ret)


def new(ctype: str, **fields: int) -> Any:
    """Allocate a zeroed structure, set argsz/size to its size, then the given fields."""
    obj = ffi.new(f"struct {ctype} *")
    size = ffi.sizeof(f"struct {ctype}")
    if hasattr(obj, "argsz"):
        obj.argsz = size
    elif hasattr(obj, "size"):
        obj.size = size
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def cap_chain(buf: bytes, first: int) -> dict[int, int]:
    """Walk a VFIO info capability chain in `buf` starting at offset `first`:
    {cap id: offset of its header}. Stops at next == 0; guards against loops and
    out-of-range offsets (the kernel writes them, but we never trust an offset)."""
    out: dict[int, int] = {}
    hdr = ffi.sizeof("struct vfio_info_cap_header")
    off, seen = first, set()
    while off and off not in seen and off + hdr <= len(buf):
        seen.add(off)
        cap = ffi.cast("struct vfio_info_cap_header *", ffi.from_buffer(buf[off : off + hdr]))
        out.setdefault(int(cap.id), off)
        off = int(cap.next)
    return out
