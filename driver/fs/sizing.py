"""How much device-writable room each FUSE request needs, and where a request and
its reply sit in a slot.

The rules live once, in the native core (driver/native/core.c), because the
relay's native pump applies them to every request it forwards; this module is
their Python face. Room is sized exactly per opcode: virtiofsd fills the whole
writable part of a READ whatever the requested size, so spare room is not
harmless.
"""

from __future__ import annotations

from .._native import ffi, lib

#: room for replies of opcodes the table does not know (forwarded by the relay)
UNKNOWN_REPLY = 4096


def reply_capacity(opcode: int, args: memoryview | bytes, max_io: int) -> int | None:
    """Bytes of reply payload (after the out header) for a request; None when the
    request gets no reply at all (FORGET, BATCH_FORGET, INTERRUPT on hiprio)."""
    n = len(args)
    buf = ffi.from_buffer(args) if n else ffi.NULL
    cap = lib.vfsdrv_reply_capacity(opcode, buf, n, max_io)
    return None if cap == lib.VFSDRV_NO_REPLY else cap


def request_offset(opcode: int) -> int:
    """Where a request starts in its slot: a WRITE's data lands page-aligned."""
    return lib.vfsdrv_request_offset(opcode)


def reply_offset(request_off: int, in_len: int) -> int:
    """Where the reply's out header goes: 16 bytes before a page boundary."""
    return lib.vfsdrv_reply_offset(request_off, in_len)


#: descriptors a request's chain has besides one per data page when a slot's pages
#: are scattered for the device: the request's headers, the reply's header and a
#: page each may straddle (as Linux virtio_fs's FUSE_HEADER_OVERHEAD)
CHAIN_OVERHEAD = 4


def scattered_io_limit(ring_size: int, page: int = 4096) -> int:
    """The largest I/O whose chain fits a ring of `ring_size` entries when each page
    of a slot is its own descriptor (VFIO no-IOMMU on 4 KiB pages): a longer chain
    can neither go indirect nor on the ring, and its request would fail."""
    return max(1, ring_size - CHAIN_OVERHEAD) * page
