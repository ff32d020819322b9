"""An in-process device for one packed virtqueue (virtio 1.2 2.8), for unit tests.

It reads the descriptor ring and the driver event area through the same memory as
the driver (a memoryview of the DMA arena; device address -> offset through
`to_offset`) and writes used entries and the device event area there, as a real
device would. It checks what the driver wrote and raises `DriverBug` when the driver
breaks the protocol: an entry of a chain whose AVAIL/USED bits do not match the
wrap counter of its position, a buffer id reused while the device owns it, a chain
without a consistent id, INDIRECT with NEXT, a nested or misaligned indirect table,
a flag other than WRITE inside a table, readable after writable.

The layout constants and the event formula are written out here (and in
queue_device.py) from the spec, not imported from the driver, so a layout bug in
the driver cannot hide behind itself.

Misbehaviour on request: `push_used()` writes any (id, len, flags) at the next used
position, `write_entry()` any entry anywhere, and `rewind()` moves the device's used
position back so a test can put the ring right again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfsdrv.virtio.transport import QueueAddresses

from .queue_device import (  # noqa: F401 (vring_need_event, DriverBug: the tests take them from here)
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    Buffers,
    DriverBug,
    QueueDevice,
    vring_need_event,
)

DESC = struct.Struct("<QIHH")  # le64 addr, le32 len, le16 id, le16 flags

F_AVAIL = 1 << 7
F_USED = 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2


@dataclass
class Chain(Buffers):
    """One buffer taken from the ring."""

    id: int
    pos: int  # ring position of its first entry
    entries: int  # ring entries it occupies


class PackedDevice(QueueDevice):
    def _init_layout(self, addrs: QueueAddresses) -> None:
        self.ring_off = self.to_offset(addrs.desc)
        self.driver_off = self.to_offset(addrs.avail)  # driver event area
        self.device_off = self.to_offset(addrs.used)  # device event area
        self.avail_pos, self.avail_wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1
        self._used_since_signal = 0  # ring entries used since the last interrupt decision

    def entry(self, pos: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring entry `pos`."""
        return DESC.unpack_from(self.mem, self.ring_off + 16 * pos)

    def write_entry(self, pos: int, addr: int, length: int, id_: int, flags: int) -> None:
        DESC.pack_into(self.mem, self.ring_off + 16 * pos, addr, length, id_, flags)

    # -- event suppression --------------------------------------------------------------
    @property
    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the driver wrote."""
        return self._u16(self.driver_off), self._u16(self.driver_off + 2)

    @property
    def device_event(self) -> tuple[int, int]:
        return self._u16(self.device_off), self._u16(self.device_off + 2)

    def set_device_event(self, flags: int, off_wrap: int = 0) -> None:
        self._put_u16(self.device_off, off_wrap)
        self._put_u16(self.device_off + 2, flags)

    # -- taking chains -------------------------------------------------------------------
    def _available(self, flags: int, wrap: int) -> bool:
        return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) != bool(wrap)

    def pending(self) -> bool:
        return self._available(self.entry(self.avail_pos)[3], self.avail_wrap)

    def pop_all(self) -> list[Chain]:
        chains = []
        while self.pending():
            chains.append(self._take())
        if self.event_idx and self.auto_event:
            self.set_device_event(EVENT_DESC, self.avail_pos | self.avail_wrap << 15)
        return chains

    def _advance_avail(self) -> None:
        self.avail_pos += 1
        if self.avail_pos == self.size:
            self.avail_pos, self.avail_wrap = 0, self.avail_wrap ^ 1

    def _take(self) -> Chain:
        start = self.avail_pos
        ids = []
        bufs: list[tuple[int, int, int]] = []  # addr, len, flags
        indirect = None
        n = 0
        while True:
            if n == self.size:
                raise DriverBug(f"chain at {start} runs around the whole ring")
            addr, length, id_, flags = self.entry(self.avail_pos)
            if not self._available(flags, self.avail_wrap):
                raise DriverBug(
                    f"entry {self.avail_pos} of the chain at {start} has flags {flags:#x}, "
                    f"not available in wrap {self.avail_wrap}"
                )
            ids.append(id_)
            n += 1
            self._advance_avail()
            if flags & F_INDIRECT:
                if not self.indirect:
                    raise DriverBug("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & F_NEXT or n != 1:
                    raise DriverBug("an indirect descriptor must be a chain of its own")
                if length == 0 or length % 16:
                    raise DriverBug(f"indirect table length {length} not a multiple of 16")
                indirect = (addr, length)
                break
            bufs.append((addr, length, flags))
            if not flags & F_NEXT:
                break
        # 2.8.6: the id is in the last entry; the driver here writes it in each
        if len(set(ids)) != 1:
            raise DriverBug(f"chain at {start} carries ids {ids}")
        chain = Chain(ids[-1], start, n)
        if chain.id >= self.size:
            raise DriverBug(f"buffer id {chain.id} outside a {self.size}-entry ring")
        if indirect is not None:
            off = self._check_range(*indirect, "indirect table")
            chain.indirect, chain.table = True, indirect
            for k in range(indirect[1] // 16):
                addr, length, _id, flags = DESC.unpack_from(self.mem, off + 16 * k)
                if flags & ~F_WRITE:
                    raise DriverBug(f"flags {flags:#x} in an indirect table (only WRITE)")
                bufs.append((addr, length, flags))
        for addr, length, flags in bufs:
            self._check_range(addr, length, "buffer")
            if flags & F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise DriverBug(f"chain {chain.id}: readable descriptor after a writable one")
            else:
                chain.readable.append((addr, length))
        if chain.id in self.outstanding:
            raise DriverBug(f"buffer id {chain.id} reused while the device owns it")
        self.outstanding[chain.id] = chain
        self.popped += 1
        return chain

    # -- returning chains ----------------------------------------------------------------
    def complete(self, chain: Chain, data: bytes = b"", *, length: int | None = None) -> None:
        """Scatter `data` over the writable buffers and write the used entry."""
        self.fill(chain, data)
        self.push_used(chain.id, len(data) if length is None else length, skip=chain.entries)

    def complete_batch(self, chains: list[Chain], data: bytes = b"") -> None:
        """VIRTIO_F_IN_ORDER: one used entry for the batch, naming its last buffer (with
        len(data)); the others are filled completely and skipped (2.8.18)."""
        for c in chains[:-1]:
            self.fill(c, bytes(c.writable_len))
        self.fill(chains[-1], data)
        self.push_used(chains[-1].id, len(data), skip=sum(c.entries for c in chains))

    def fill(self, chain: Chain, data: bytes = b"") -> None:
        """Scatter `data` over the writable buffers; the device no longer owns the chain."""
        self._scatter(chain.id, chain, data)

    def used_flags(self) -> int:
        return F_AVAIL | F_USED if self.used_wrap else 0

    def push_used(self, id_: int, length: int, *, skip: int = 1, flags: int | None = None) -> None:
        """Write a used entry at the used position (id and len first, the flags last,
        as 2.8.21 orders them) and move on by `skip` entries (the chain's length)."""
        pos = self.used_pos
        addr = self.entry(pos)[0]
        DESC.pack_into(self.mem, self.ring_off + 16 * pos, addr, length, id_,
                       self.entry(pos)[3])
        self._put_u16(self.ring_off + 16 * pos + 14,
                      self.used_flags() if flags is None else flags)
        self.used_pos += skip
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1
        self._used_since_signal += skip

    def rewind(self, skip: int, flags: int) -> None:
        """Undo the last push_used of `skip` entries, putting `flags` back on it."""
        self.used_pos -= skip
        if self.used_pos < 0:
            self.used_pos += self.size
            self.used_wrap ^= 1
        self._put_u16(self.ring_off + 16 * self.used_pos + 14, flags)
        self._used_since_signal = max(0, self._used_since_signal - skip)

    def should_interrupt(self) -> bool:
        """The device's used-buffer notification decision for what was used since the
        previous call (2.8.10, 2.8.14)."""
        moved = self._used_since_signal
        self._used_since_signal = 0
        if not moved:
            return False
        off_wrap, flags = self.driver_event
        if flags == EVENT_DISABLE:
            fire = False
        elif flags == EVENT_DESC and self.event_idx:
            event = off_wrap & 0x7FFF
            if off_wrap >> 15 != self.used_wrap:
                event -= self.size
            new = self.used_pos
            fire = vring_need_event(event & 0xFFFF, new, (new - moved) & 0xFFFF)
        else:
            fire = True
        self.interrupts += fire
        return fire
