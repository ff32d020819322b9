"""Split virtqueue layout (virtio 1.2 2.7), shared by the driver and the reference device.

    Descriptor Table  align 16  16 * size     {le64 addr; le32 len; le16 flags; le16 next}
    Available Ring    align 2   6 + 2 * size  flags, idx, ring[size], used_event
    Used Ring         align 4   6 + 8 * size  flags, idx, ring[size] {le32 id, len}, avail_event
"""

from __future__ import annotations

import struct

MAX_QUEUE_SIZE = 32768

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    return 6 + 8 * size


# byte offsets inside each part
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4


def used_event_offset(size: int) -> int:
    """avail->used_event (EVENT_IDX): the used index at which the driver wants an interrupt."""
    return 4 + 2 * size


def avail_event_offset(size: int) -> int:
    """used->avail_event (EVENT_IDX): the avail index at which the device wants a kick."""
    return 4 + 8 * size


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: did moving from old_idx to new_idx cross event_idx? (16-bit)"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def is_valid_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0
