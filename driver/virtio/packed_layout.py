"""Packed virtqueue layout (virtio 1.2 2.8), shared by the driver and the reference device.

    Descriptor Ring    align 16  16 * size  {le64 addr; le32 len; le16 id; le16 flags}
    Driver Event Area  align 4   4          {le16 off_wrap; le16 flags}  (driver writes)
    Device Event Area  align 4   4          {le16 off_wrap; le16 flags}  (device writes)

The driver makes an entry available with AVAIL = its wrap counter and USED = the
inverse; the device marks a chain used with AVAIL = USED = its wrap counter. Both
counters start at 1. off_wrap: a ring position (bits 0-14) and a wrap counter (15).
"""

from __future__ import annotations

import struct

DESC = struct.Struct("<QIHH")  # addr, len, id, flags
DESC_SIZE = 16
DESC_ALIGN = 16
EVENT_SIZE = 4
EVENT_ALIGN = 4
EVENT = struct.Struct("<HH")  # off_wrap, flags
FLAGS_OFFSET = 14  # of a descriptor's flags

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15

EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
WRAP_SHIFT = 15

#: vhost-user SET/GET_VRING_BASE for a packed ring: bits 0-14 the position, bit 15
#: the wrap counter (as QEMU and DPDK); a fresh ring starts at 0 with wrap 1
INITIAL_BASE = 1 << 15


def avail_bits(wrap: int) -> int:
    """The AVAIL/USED bits of an entry the driver makes available in lap `wrap`."""
    return F_AVAIL if wrap else F_USED


def is_used(flags: int, wrap: int) -> bool:
    return bool(flags & F_AVAIL) == bool(flags & F_USED) == bool(wrap)


def is_avail(flags: int, wrap: int) -> bool:
    return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) != bool(wrap)


def event_position(off_wrap: int, wrap: int, size: int) -> int:
    """An event offset as a 16-bit position: one from the other lap is a ring behind."""
    pos = off_wrap & 0x7FFF
    if off_wrap >> WRAP_SHIFT != wrap:
        pos -= size
    return pos & 0xFFFF
