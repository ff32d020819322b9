"""PCI configuration space: header fields, the capability list, MSI-X.

Generic PCI only. The capability walk is defensive: a pointer below the header,
past the 256-byte space, or a loop ends the walk with an error rather than
reading garbage.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PciError

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CAPABILITIES_POINTER = 0x34

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4

CAP_ID_MSI = 0x05
CAP_ID_VNDR = 0x09
CAP_ID_MSIX = 0x11

CONFIG_SPACE_SIZE = 256
HEADER_SIZE = 0x40

ReadConfig = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Capability:
    id: int
    offset: int


@dataclass(frozen=True)
class MsixInfo:
    offset: int  # of the capability in config space
    table_size: int  # number of vectors
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int
    enabled: bool

    @property
    def table_bytes(self) -> int:
        return self.table_size * 16

    @property
    def pba_bytes(self) -> int:
        return ((self.table_size + 63) // 64) * 8


def capabilities(read: ReadConfig) -> list[Capability]:
    """The standard capability list, in order. Raises PciError on a corrupt list."""
    status = struct.unpack("<H", read(STATUS, 2))[0]
    if not status & STATUS_CAP_LIST:
        return []
    out: list[Capability] = []
    seen: set[int] = set()
    ptr = read(CAPABILITIES_POINTER, 1)[0] & 0xFC
    while ptr:
        if ptr < HEADER_SIZE or ptr > CONFIG_SPACE_SIZE - 4:
            raise PciError(
                f"corrupt PCI capability list: pointer {ptr:#x} is outside 0x40..0xfc"
            )
        if ptr in seen:
            raise PciError(f"corrupt PCI capability list: loop at {ptr:#x}")
        seen.add(ptr)
        cap_id, nxt = read(ptr, 2)
        out.append(Capability(cap_id, ptr))
        ptr = nxt & 0xFC
    return out


def msix_info(read: ReadConfig) -> MsixInfo | None:
    for cap in capabilities(read):
        if cap.id != CAP_ID_MSIX:
            continue
        ctrl, table, pba = struct.unpack("<HII", read(cap.offset + 2, 10))
        return MsixInfo(
            offset=cap.offset,
            table_size=(ctrl & 0x7FF) + 1,
            table_bar=table & 7,
            table_offset=table & ~7,
            pba_bar=pba & 7,
            pba_offset=pba & ~7,
            enabled=bool(ctrl & 0x8000),
        )
    return None
