"""Slots: the DMA buffers requests travel in, reused for the life of the device.

A slot holds one request (device-readable) and room for its reply
(device-writable), placed by the core's layout rule (vfsdrv.fs.sizing): a WRITE's
data and every reply payload start on a page boundary. Small slots (16 KiB) carry
everything but big reads, writes, directory listings and xattrs; large ones carry
max_io plus headers. The relay's native pumps borrow slots for their lifetime.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..virtio.memory import PAGE_SIZE, DmaBuffer, DmaPool
from .abi import OUT_HEADER_SIZE, Opcode
from .sizing import request_offset

OUT_HEADER = struct.Struct("<IiQ")


@dataclass
class Completion:
    """The outcome of one request. `reply` is the whole reply (out header and
    payload); its error and unique are the validated copy's (`error`, `unique`),
    and it is valid only during the callback (it may point into DMA memory that is
    reused afterwards)."""

    unique: int
    opcode: int
    error: int  # 0 or -errno
    reply: memoryview | bytes

    @property
    def payload(self) -> memoryview:
        return memoryview(self.reply)[OUT_HEADER_SIZE:]


OnDone = Callable[[Completion], None]


def synthetic(unique: int, opcode: int, error: int) -> Completion:
    """A reply the driver makes itself (an error, or a lock's final answer)."""
    return Completion(unique, opcode, error, OUT_HEADER.pack(OUT_HEADER_SIZE, error, unique))


@dataclass(eq=False)
class Slot:
    """One DMA buffer for one request: the request at `req_off`, the reply at
    `reply_off`."""

    buf: DmaBuffer
    large: bool
    view: memoryview = field(init=False, repr=False)
    unique: int = 0
    opcode: int = 0
    in_len: int = 0
    req_off: int = 0
    reply_off: int = 0
    reply_cap: int | None = None
    on_done: OnDone | None = None

    def __post_init__(self) -> None:
        self.view = self.buf.view


#: opcodes whose reply may be large: they always take a large slot
LARGE_REPLY_OPCODES = frozenset(
    {Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.GETXATTR, Opcode.LISTXATTR}
)


class SlotPool:
    """The free slots of one device."""

    SMALL_SIZE = 4 * PAGE_SIZE

    def __init__(self, max_io: int) -> None:
        self.max_io = max_io
        self.small: list[Slot] = []
        self.large: list[Slot] = []

    @property
    def large_size(self) -> int:
        return self.max_io + 3 * PAGE_SIZE

    def allocate(self, pool: DmaPool, small: int, large: int) -> None:
        for _ in range(small):
            self.small.append(Slot(pool.alloc(self.SMALL_SIZE, PAGE_SIZE), False))
        for _ in range(large):
            self.large.append(Slot(pool.alloc(self.large_size, PAGE_SIZE), True))

    def needs_large(self, opcode: int, in_len: int) -> bool:
        """Whether a request of this opcode and length wants a large slot."""
        return (request_offset(opcode) + in_len > self.SMALL_SIZE // 2
                or opcode in LARGE_REPLY_OPCODES)

    def try_acquire(self, large: bool = False) -> Slot | None:
        free = self.large if large else self.small
        return free.pop() if free else None

    def release(self, slot: Slot) -> None:
        slot.on_done = None
        (self.large if slot.large else self.small).append(slot)

    def lend(self, small: int, large: int) -> list[Slot]:
        """Take free slots out (for a pump) until give_back()."""
        n_small, n_large = min(small, len(self.small)), min(large, len(self.large))
        out = [self.small.pop() for _ in range(n_small)]
        out += [self.large.pop() for _ in range(n_large)]
        return out

    def give_back(self, slots: list[Slot]) -> None:
        for slot in slots:
            self.release(slot)

    @property
    def free(self) -> tuple[int, int]:
        return len(self.small), len(self.large)
