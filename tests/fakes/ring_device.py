"""An in-process device for one split virtqueue (virtio 1.2 2.7), for unit tests.

It reaches the rings and buffers through the same memory as the driver (a
memoryview of the DMA arena; device address -> offset through `to_offset`), so the
driver's descriptors, avail ring and flags are exercised exactly as a real device
would read them. It checks what the driver wrote and raises `DriverBug` when the
driver breaks the protocol (a chain reusing a descriptor still owned by the device,
readable after writable, NEXT with INDIRECT, nested indirect tables, ...).

Its own layout constants and `need_event` are written out here (and in
queue_device.py) from the spec, not imported from the driver, so a layout bug in
the driver cannot hide behind itself.

Misbehaviour on request: `push_used()` writes any (id, len) pair, `jump_used_idx()`
moves used->idx without writing entries, and `retract()` takes entries back so a
test can put the ring right again and check the driver still works.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vfsdrv.virtio.transport import QueueAddresses

from .queue_device import (  # noqa: F401 (vring_need_event: the tests take it from here)
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    Buffers,
    DriverBug,
    QueueDevice,
    vring_need_event,
)

DESC = struct.Struct("<QIHH")  # le64 addr, le32 len, le16 flags, le16 next
USED_ELEM = struct.Struct("<II")  # le32 id, le32 len

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


@dataclass
class Chain(Buffers):
    """One chain taken from the avail ring."""

    head: int
    ring_descs: list[int] = field(default_factory=list)  # ring descriptor ids it occupies


class RingDevice(QueueDevice):
    def _init_layout(self, addrs: QueueAddresses) -> None:
        self.desc_off = self.to_offset(addrs.desc)
        self.avail_off = self.to_offset(addrs.avail)
        self.used_off = self.to_offset(addrs.used)
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0  # used idx at the last interrupt decision

    # -- what the driver writes --------------------------------------------------------
    @property
    def avail_flags(self) -> int:
        return self._u16(self.avail_off)

    @property
    def avail_idx(self) -> int:
        return self._u16(self.avail_off + 2)

    @property
    def used_event(self) -> int:
        return self._u16(self.avail_off + 4 + 2 * self.size)

    def desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.mem, self.desc_off + 16 * i)

    # -- what the device writes ----------------------------------------------------------
    @property
    def used_flags(self) -> int:
        return self._u16(self.used_off)

    def set_no_notify(self, on: bool) -> None:
        self._put_u16(self.used_off, USED_F_NO_NOTIFY if on else 0)

    @property
    def avail_event(self) -> int:
        return self._u16(self.used_off + 4 + 8 * self.size)

    def set_avail_event(self, value: int) -> None:
        self._put_u16(self.used_off + 4 + 8 * self.size, value)

    def _publish_used_idx(self) -> None:
        self._put_u16(self.used_off + 2, self.used_idx)

    # -- taking chains -------------------------------------------------------------------
    def pending(self) -> int:
        n = (self.avail_idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise DriverBug(f"avail idx {self.avail_idx} is {n} ahead of {self.last_avail}")
        return n

    def pop_all(self) -> list[Chain]:
        chains = []
        for _ in range(self.pending()):
            slot = self.avail_off + 4 + 2 * (self.last_avail % self.size)
            chains.append(self._take(self._u16(slot)))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and self.auto_event:
            self.set_avail_event(self.last_avail)
        return chains

    def _take(self, head: int) -> Chain:
        if head >= self.size:
            raise DriverBug(f"avail head {head} outside a {self.size}-entry ring")
        chain = Chain(head)
        table_off, table_size, i = self.desc_off, self.size, head
        in_table = False
        seen = 0
        while True:
            seen += 1
            if seen > table_size:
                raise DriverBug(f"chain at {head} loops")
            if not in_table:
                chain.ring_descs.append(i)
            addr, length, flags, nxt = DESC.unpack_from(self.mem, table_off + 16 * i)
            if flags & F_INDIRECT:
                if not self.indirect:
                    raise DriverBug("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_table:
                    raise DriverBug("nested indirect table")
                if flags & F_NEXT:
                    raise DriverBug("descriptor with both INDIRECT and NEXT")
                if seen != 1:
                    raise DriverBug("indirect descriptor after direct ones")
                if length == 0 or length % 16:
                    raise DriverBug(f"indirect table length {length} not a multiple of 16")
                table_off = self._check_range(addr, length, "indirect table")
                chain.indirect, chain.table = True, (addr, length)
                table_size, i, seen, in_table = length // 16, 0, 0, True
                continue
            self._check_range(addr, length, "buffer")
            if flags & F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise DriverBug(f"chain at {head}: readable descriptor after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & F_NEXT:
                break
            if nxt >= table_size:
                raise DriverBug(f"chain at {head}: next {nxt} outside a {table_size}-entry table")
            i = nxt
        self._check_disjoint(chain)
        self.outstanding[head] = chain
        self.popped += 1
        return chain

    def _check_disjoint(self, chain: Chain) -> None:
        mine = set(chain.ring_descs)
        for other in self.outstanding.values():
            shared = mine & set(other.ring_descs)
            if shared:
                raise DriverBug(
                    f"chain at {chain.head} reuses descriptors {sorted(shared)} of chain "
                    f"{other.head}, which the device still owns"
                )
            if chain.table and other.table:
                a, n = chain.table
                b, m = other.table
                if a < b + m and b < a + n:
                    raise DriverBug(f"indirect tables of {chain.head} and {other.head} overlap")

    # -- returning chains ----------------------------------------------------------------
    def complete(self, chain: Chain, data: bytes = b"", *, length: int | None = None) -> None:
        """Scatter `data` over the chain's writable buffers and put it on the used ring
        with len = len(data) (or `length`, to lie about it)."""
        self._scatter(chain.head, chain, data)
        self.push_used(chain.head, len(data) if length is None else length)

    def push_used(self, head: int, length: int) -> None:
        """Write a used element (any values, for misbehaviour) and bump used->idx."""
        USED_ELEM.pack_into(self.mem, self.used_off + 4 + 8 * (self.used_idx % self.size),
                            head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._publish_used_idx()

    def jump_used_idx(self, n: int) -> None:
        """Move used->idx ahead by n without writing any element."""
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self._publish_used_idx()

    def retract(self, n: int = 1) -> None:
        """Take back the last n used entries (move used->idx back), to repair the ring.
        The interrupt decision restarts from the retracted index."""
        self.used_idx = (self.used_idx - n) & 0xFFFF
        self._signalled = self.used_idx
        self._publish_used_idx()

    def should_interrupt(self) -> bool:
        """The device's used-buffer notification decision for the entries pushed since
        the previous call (2.7.7.2 / 2.7.10)."""
        old, new = self._signalled, self.used_idx
        self._signalled = new
        if old == new:
            return False
        if self.event_idx:
            fire = vring_need_event(self.used_event, new, old)
        else:
            fire = not self.avail_flags & AVAIL_F_NO_INTERRUPT
        self.interrupts += fire
        return fire
