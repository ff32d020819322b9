"""Layout tests for the VFIO / iommufd structures declared in vfsdrv.pci.vfio.

Sizes and offsets are pinned to the values of linux/vfio.h and linux/iommufd.h
(gcc on the uapi headers; newer-kernel fields included), like rust-vmm's
vfio-bindings layout tests. A second test compiles a probe against this host's
<linux/vfio.h> and compares every field the host header has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from vfsdrv.pci import vfio
from vfsdrv.pci.vfio import ffi

# struct -> (size, {field: offset})
LAYOUT: dict[str, tuple[int, dict[str, int]]] = {
    "vfio_info_cap_header": (8, {"id": 0, "version": 2, "next": 4}),
    "vfio_group_status": (8, {"argsz": 0, "flags": 4}),
    "vfio_device_info": (
        24,
        {"argsz": 0, "flags": 4, "num_regions": 8, "num_irqs": 12, "cap_offset": 16, "pad": 20},
    ),
    "vfio_region_info": (
        32,
        {"argsz": 0, "flags": 4, "index": 8, "cap_offset": 12, "size": 16, "offset": 24},
    ),
    "vfio_region_sparse_mmap_area": (16, {"offset": 0, "size": 8}),
    "vfio_region_info_cap_sparse_mmap": (
        16,
        {"header": 0, "nr_areas": 8, "reserved": 12, "areas": 16},
    ),
    "vfio_irq_info": (16, {"argsz": 0, "flags": 4, "index": 8, "count": 12}),
    "vfio_irq_set": (
        20,
        {"argsz": 0, "flags": 4, "index": 8, "start": 12, "count": 16, "data": 20},
    ),
    "vfio_iommu_type1_info": (24, {"argsz": 0, "flags": 4, "iova_pgsizes": 8, "cap_offset": 16}),
    "vfio_iova_range": (16, {"start": 0, "end": 8}),
    "vfio_iommu_type1_info_cap_iova_range": (
        16,
        {"header": 0, "nr_iovas": 8, "reserved": 12, "iova_ranges": 16},
    ),
    "vfio_iommu_type1_dma_map": (32, {"argsz": 0, "flags": 4, "vaddr": 8, "iova": 16, "size": 24}),
    "vfio_iommu_type1_dma_unmap": (24, {"argsz": 0, "flags": 4, "iova": 8, "size": 16}),
    "vfio_device_bind_iommufd": (
        24,
        {"argsz": 0, "flags": 4, "iommufd": 8, "out_devid": 12, "token_uuid_ptr": 16},
    ),
    "vfio_device_attach_iommufd_pt": (16, {"argsz": 0, "flags": 4, "pt_id": 8, "pasid": 12}),
    "vfio_device_detach_iommufd_pt": (12, {"argsz": 0, "flags": 4, "pasid": 8}),
    "iommu_destroy": (8, {"size": 0, "id": 4}),
    "iommu_ioas_alloc": (12, {"size": 0, "flags": 4, "out_ioas_id": 8}),
    "iommu_iova_range": (16, {"start": 0, "last": 8}),
    "iommu_ioas_iova_ranges": (
        32,
        {
            "size": 0,
            "ioas_id": 4,
            "num_iovas": 8,
            "__reserved": 12,
            "allowed_iovas": 16,
            "out_iova_alignment": 24,
        },
    ),
    "iommu_ioas_map": (
        40,
        {
            "size": 0,
            "flags": 4,
            "ioas_id": 8,
            "__reserved": 12,
            "user_va": 16,
            "length": 24,
            "iova": 32,
        },
    ),
    "iommu_ioas_unmap": (24, {"size": 0, "ioas_id": 4, "iova": 8, "length": 16}),
}


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_struct_layout(name: str) -> None:
    size, fields = LAYOUT[name]
    assert ffi.sizeof(f"struct {name}") == size
    for field, offset in fields.items():
        assert ffi.offsetof(f"struct {name}", field) == offset, field


def test_every_declared_struct_is_pinned() -> None:
    declared = set(re.findall(r"^struct (\w+) \{", vfio.CDEF, re.M))
    assert declared == set(LAYOUT)


def test_ioctl_numbers() -> None:
    # _IO(';', 100 + n) and _IO(';', 0x80 + k), as computed by gcc on the uapi headers
    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_CHECK_EXTENSION == 0x3B65
    assert vfio.VFIO_SET_IOMMU == 0x3B66
    assert vfio.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vfio.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert vfio.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vfio.VFIO_DEVICE_GET_INFO == 0x3B6B
    assert vfio.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert vfio.VFIO_DEVICE_GET_IRQ_INFO == 0x3B6D
    assert vfio.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert vfio.VFIO_DEVICE_RESET == 0x3B6F
    assert vfio.VFIO_IOMMU_GET_INFO == 0x3B70
    assert vfio.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert vfio.VFIO_IOMMU_UNMAP_DMA == 0x3B72
    assert vfio.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert vfio.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert vfio.VFIO_DEVICE_DETACH_IOMMUFD_PT == 0x3B78
    assert vfio.IOMMU_IOAS_ALLOC == 0x3B81
    assert vfio.IOMMU_IOAS_IOVA_RANGES == 0x3B84
    assert vfio.IOMMU_IOAS_MAP == 0x3B85
    assert vfio.IOMMU_IOAS_UNMAP == 0x3B86
    assert (vfio.VFIO_TYPE1v2_IOMMU, vfio.VFIO_NOIOMMU_IOMMU) == (3, 8)
    assert vfio.VFIO_PCI_CONFIG_REGION_INDEX == 7
    assert (vfio.VFIO_PCI_MSIX_IRQ_INDEX, vfio.VFIO_PCI_REQ_IRQ_INDEX) == (2, 4)


def test_old_argsz_forms_are_prefixes() -> None:
    assert vfio.BIND_IOMMUFD_ARGSZ_V1 == ffi.offsetof("struct vfio_device_bind_iommufd",
                                                      "token_uuid_ptr")
    assert vfio.ATTACH_IOMMUFD_PT_ARGSZ_V1 == ffi.offsetof("struct vfio_device_attach_iommufd_pt",
                                                           "pasid")


def test_new_sets_argsz_and_size() -> None:
    assert vfio.new("vfio_region_info", index=7).argsz == 32
    assert vfio.new("vfio_region_info", index=7).index == 7
    assert vfio.new("iommu_ioas_map").size == 40


def test_cap_chain_walk_is_bounded() -> None:
    buf = bytearray(64)
    hdr = ffi.new("struct vfio_info_cap_header *")
    # cap id 1 at 16 -> cap id 3 at 32 -> loops back to 16
    for off, cid, nxt in ((16, 1, 32), (32, 3, 16)):
        hdr.id, hdr.version, hdr.next = cid, 1, nxt
        buf[off : off + 8] = ffi.buffer(hdr)[:]
    assert vfio.cap_chain(bytes(buf), 16) == {1: 16, 3: 32}
    assert vfio.cap_chain(bytes(buf), 60) == {}  # header would run past the buffer


# fields the 6.1 uapi header has, checked against this host's header with gcc
HOST_HEADER_STRUCTS = {
    "vfio_group_status": None,
    "vfio_device_info": ["argsz", "flags", "num_regions", "num_irqs", "cap_offset"],
    "vfio_region_info": None,
    "vfio_region_sparse_mmap_area": None,
    "vfio_region_info_cap_sparse_mmap": ["header", "nr_areas", "reserved", "areas"],
    "vfio_irq_info": None,
    "vfio_irq_set": None,
    "vfio_iommu_type1_info": None,
    "vfio_iova_range": None,
    "vfio_iommu_type1_info_cap_iova_range": ["header", "nr_iovas", "reserved", "iova_ranges"],
    "vfio_iommu_type1_dma_map": None,
    "vfio_iommu_type1_dma_unmap": ["argsz", "flags", "iova", "size"],
}


def test_matches_host_linux_vfio_h(tmp_path: Path) -> None:
    header = Path("/usr/include/linux/vfio.h")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not header.exists():
        pytest.skip("no C compiler or no /usr/include/linux/vfio.h (linux-libc-dev) to compare")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vfio.h>",
             "int main(void) {"]
    for name, fields in HOST_HEADER_STRUCTS.items():
        for field in fields or LAYOUT[name][1]:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof(struct {name}, {field}));')
        if fields is None:
            lines.append(f'printf("{name} SIZE %zu\\n", sizeof(struct {name}));')
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    checked = 0
    for line in out.splitlines():
        name, field, value = line.split()
        if field == "SIZE":
            assert ffi.sizeof(f"struct {name}") == int(value), name
        else:
            assert ffi.offsetof(f"struct {name}", field) == int(value), (name, field)
        checked += 1
    assert checked > 40
