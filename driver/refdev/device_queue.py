"""Device side of a split virtqueue (virtio 1.2 2.7): take available chains, return used ones.

Device-normative statements this module holds itself to:
  * 2.7.5.1  "A device MUST NOT write to a device-readable buffer" and it never writes
    a descriptor table entry (the descriptors are read once, into locals).
  * 2.7.8.2  "The device MUST set len prior to updating the used idx" and "MUST write
    at least len bytes to descriptor" before it: the element is written, then idx is
    stored with release ordering; len is exactly the bytes written.
  * 2.7.7.2  Without EVENT_IDX the device MUST ignore used_event and honours
    avail->flags NO_INTERRUPT; with EVENT_IDX it ignores the flag and interrupts only
    when the used index crosses used_event.
  * 2.7.10   With EVENT_IDX the device publishes avail_event = the next avail index
    it will read, then re-checks avail->idx after a full fence (no lost kick).
  * 2.7.5.3  Indirect descriptors only when negotiated, never nested, never with NEXT;
    a table length that is a multiple of 16.
Everything the driver wrote is validated (indices, loop-free chains no longer than
the queue, readable before writable, buffers inside shared memory); a violation
raises RingError and the caller stops using the queue.

With VIRTIO_F_RING_PACKED (`packed`, virtio 1.2 2.8) the three addresses are the
descriptor ring and the driver and device event suppression areas:
  * 2.8.21.1 the device reads an entry's flags (acquire) before its other fields,
    and writes a used entry's id and len before its flags (release), once per chain
    at the next used position, skipping the rest of the chain's entries;
  * 2.8.10 it interrupts unless the driver's area says DISABLE, or, with EVENT_IDX
    and DESC, only when the used position passes the driver's off_wrap;
  * it asks for kicks at the next entry it will read (DESC with EVENT_IDX; else the
    area stays ENABLE), then re-checks that entry after a full fence;
  * 2.8.19 indirect tables: WRITE is the only flag it honours in them.
Chains are served in order, so the used entries come in ring order; with
VIRTIO_F_IN_ORDER (2.8.18) the chains pushed before a flush() (the session flushes
before each interrupt decision) get one used entry, naming the last of them, and
every other one of the batch is filled completely (a reply shorter than its buffer
is padded with zeros).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._native import ffi, lib
from ..errors import RingError
from ..virtio import packed_layout as pl
from ..virtio import ring_layout as rl
from .guest_memory import GuestMemory, MemoryAccessError

if TYPE_CHECKING:
    from .audit import QueueAudit

#: a packed used entry's len and id
_LEN_ID = struct.Struct("<IH")
#: a chain of more than 4 GiB is a driver bug (2.7.5.2: "MUST NOT add a chain longer than 2^32")
MAX_CHAIN_BYTES = 1 << 32


@dataclass
class Chain:
    """One available descriptor chain: the driver's readable and writable buffers."""

    head: int  # packed: the buffer id
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    entries: int = 1  # packed: ring entries the chain takes

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes:
        return b"".join(bytes(v) for v in self.readable)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Scatter `data` over the writable buffers; returns the bytes written."""
        src = memoryview(data)
        done = 0
        for dst in self.writable:
            if done == len(src):
                break
            n = min(len(dst), len(src) - done)
            dst[:n] = src[done : done + n]
            done += n
        return done


class DeviceQueue:
    """One virtqueue as configured by SET_VRING_*; usable once started and enabled."""

    def __init__(self, index: int, *, event_idx: bool = False, indirect: bool = False) -> None:
        self.index = index
        self.event_idx = event_idx
        self.indirect = indirect
        self.packed = False  # VIRTIO_F_RING_PACKED negotiated
        self.in_order = False  # VIRTIO_F_IN_ORDER negotiated (batches with packed)
        self._batch: tuple[int, int] | None = None  # in-order: (last id, its len)
        self._batch_entries = 0
        self._batch_chain: Chain | None = None
        self.used_entries = 0  # packed: used entries written (fewer than chains in batches)
        # packed: last_avail/used_idx are ring positions with these wrap counters
        self.avail_wrap = self.used_wrap = 1
        self._used_since_signal = 0
        self._desc_ptr = None
        self.size = 0
        self.desc_user_addr = self.avail_user_addr = self.used_user_addr = 0
        self.addresses_set = False
        self.last_avail = 0  # next avail ring slot the device reads
        self.used_idx = 0  # next used ring slot the device writes
        self.signalled_used: int | None = None  # used idx at the last interrupt (EVENT_IDX)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.enabled = False
        self.started = False
        self.broken = False
        self.audit: QueueAudit | None = None  # auditing mode: checks of the driver's rules
        self._memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._avail_ptr = None
        self._used_ptr = None

    # -- configuration ---------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.started and self.enabled and not self.broken

    def set_size(self, size: int) -> None:
        if self.started:
            raise RingError(f"queue {self.index}: SET_VRING_NUM on a running queue")
        if not rl.is_valid_size(size) and not (self.packed and 0 < size <= rl.MAX_QUEUE_SIZE):
            raise RingError(f"queue {self.index}: size {size} is not a power of 2 <= 32768")
        self.size = size

    def set_addresses(self, desc: int, used: int, avail: int) -> None:
        if self.started:
            raise RingError(f"queue {self.index}: SET_VRING_ADDR on a running queue")
        if self.packed:
            bad = desc % pl.DESC_ALIGN or avail % pl.EVENT_ALIGN or used % pl.EVENT_ALIGN
        else:
            bad = desc % rl.DESC_ALIGN or avail % rl.AVAIL_ALIGN or used % rl.USED_ALIGN
        if bad:
            raise RingError(f"queue {self.index}: misaligned ring addresses")
        self.desc_user_addr, self.avail_user_addr, self.used_user_addr = desc, avail, used
        self.addresses_set = True

    def set_base(self, base: int) -> None:
        if self.started:
            raise RingError(f"queue {self.index}: SET_VRING_BASE on a running queue")
        if base > 0xFFFF:
            raise RingError(f"queue {self.index}: base {base} is not a 16-bit index")
        # Every chain is completed before it is popped again, so nothing is in flight.
        self.last_avail = self.used_idx = base
        self.signalled_used = None
        if self.packed:
            # bits 0-14 the position, bit 15 the wrap counter (QEMU, DPDK)
            self.last_avail = self.used_idx = base & 0x7FFF
            self.avail_wrap = self.used_wrap = base >> pl.WRAP_SHIFT & 1
            self._used_since_signal = 0
            if self.last_avail >= max(self.size, 1):
                raise RingError(f"queue {self.index}: base position {self.last_avail} outside "
                                f"a {self.size}-entry ring")
        if self.audit is not None:
            self.audit.set_base(base)

    def set_kick(self, fd: int | None) -> None:
        _close(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        _close(self.call_fd)
        self.call_fd = fd

    def start(self, memory: GuestMemory) -> None:
        """Resolve the ring addresses in `memory` (again after every SET_MEM_TABLE)."""
        if not self.size or not self.addresses_set:
            raise RingError(f"queue {self.index}: started before SET_VRING_NUM/ADDR")
        avail_len, used_len = rl.avail_ring_size(self.size), rl.used_ring_size(self.size)
        if self.packed:
            avail_len = used_len = pl.EVENT_SIZE
        try:
            self._desc = memory.user_addr(self.desc_user_addr, rl.desc_table_size(self.size))
            self._avail = memory.user_addr(self.avail_user_addr, avail_len)
            self._used = memory.user_addr(self.used_user_addr, used_len)
        except MemoryAccessError as exc:
            raise RingError(f"queue {self.index}: {exc}") from exc
        self._memory = memory
        self._avail_ptr = ffi.cast("char *", ffi.from_buffer(self._avail))
        self._used_ptr = ffi.cast("char *", ffi.from_buffer(self._used))
        self._desc_ptr = ffi.cast("char *", ffi.from_buffer(self._desc))
        self.started = True
        if self.audit is not None:
            self.audit.started(self)

    def stop(self) -> int:
        """GET_VRING_BASE: stop and return the next avail index to read."""
        if self.started:
            self._flush_batch()
        self.started = False
        self._desc = self._avail = self._used = None
        self._avail_ptr = self._used_ptr = self._desc_ptr = None
        self._memory = None
        if self.packed:
            return self.last_avail | self.avail_wrap << pl.WRAP_SHIFT
        return self.last_avail

    def close(self) -> None:
        self.stop()
        self.set_kick(None)
        self.set_call(None)

    # -- the ring ----------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return lib.vfsdrv_load_acquire_u16(self._avail_ptr + rl.AVAIL_IDX)

    def pending(self) -> int:
        """Chains the driver made available that the device has not taken yet."""
        if self.packed:
            return self._packed_pending()
        idx = self._avail_idx()
        if self.audit is not None:
            self.audit.avail_idx(self, idx)
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"queue {self.index}: avail idx moved {n} entries ahead of a {self.size}-entry ring"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty."""
        if self.packed:
            if not self.ready or not self._head_available():
                return None
            return self._read_packed_chain()
        if not self.ready or not self.pending():
            return None
        assert self._avail is not None
        if self.audit is not None:
            self.audit.scan(self)
        slot = rl.AVAIL_RING + 2 * (self.last_avail % self.size)
        head = int.from_bytes(self._avail[slot : slot + 2], "little")
        chain = self._read_chain(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.audit is not None:
            self.audit.disarm()
        return chain

    def _read_chain(self, head: int) -> Chain:
        assert self._desc is not None and self._memory is not None
        if head >= self.size:
            raise RingError(f"queue {self.index}: head {head} outside a {self.size}-entry ring")
        chain = Chain(head)
        table, table_size, index = self._desc, self.size, head
        in_indirect = False
        total = 0
        seen = 0
        while True:
            seen += 1
            if seen > table_size:
                raise RingError(f"queue {self.index}: descriptor chain at {head} loops")
            addr, length, flags, nxt = rl.DESC.unpack_from(table, rl.DESC_SIZE * index)
            if flags & rl.VRING_DESC_F_INDIRECT:
                if in_indirect or not self.indirect or flags & rl.VRING_DESC_F_NEXT:
                    raise RingError(f"queue {self.index}: invalid indirect descriptor at {head}")
                if seen != 1 or not length or length % rl.DESC_SIZE:
                    raise RingError(f"queue {self.index}: bad indirect table length {length}")
                table = self._buffer(addr, length)
                table_size, index, seen, in_indirect = length // rl.DESC_SIZE, 0, 0, True
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise RingError(f"queue {self.index}: chain at {head} exceeds 4 GiB")
            buf = self._buffer(addr, length)
            if flags & rl.VRING_DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise RingError(f"queue {self.index}: readable descriptor after a writable one")
            else:
                chain.readable.append(buf)
            if not flags & rl.VRING_DESC_F_NEXT:
                return chain
            if nxt >= table_size:
                raise RingError(f"queue {self.index}: next {nxt} outside the descriptor table")
            index = nxt

    def _buffer(self, addr: int, length: int) -> memoryview:
        assert self._memory is not None
        try:
            return self._memory.gpa(addr, length)
        except MemoryAccessError as exc:
            raise RingError(f"queue {self.index}: {exc}") from exc

    # -- packed ring --------------------------------------------------------------------
    def _entry_flags(self, pos: int) -> int:
        # acquire: the entry's other fields are read after the flags that hand it over
        return lib.vfsdrv_load_acquire_u16(self._desc_ptr + pl.DESC_SIZE * pos + pl.FLAGS_OFFSET)

    def _head_available(self) -> bool:
        return pl.is_avail(self._entry_flags(self.last_avail), self.avail_wrap)

    def _packed_pending(self) -> int:
        """Count the available chains by walking their entries (a packed ring has no
        index to subtract); bounded by one lap."""
        n = seen = 0
        pos, wrap = self.last_avail, self.avail_wrap
        while seen < self.size and pl.is_avail(self._entry_flags(pos), wrap):
            while True:  # over one chain
                flags = self._entry_flags(pos)
                seen += 1
                pos += 1
                if pos == self.size:
                    pos, wrap = 0, wrap ^ 1
                if not flags & pl.F_NEXT or flags & pl.F_INDIRECT or seen >= self.size:
                    break
            n += 1
        return n

    def _read_packed_chain(self) -> Chain:
        """The chain whose first entry pending() saw available."""
        assert self._desc is not None
        pos, wrap, start = self.last_avail, self.avail_wrap, self.last_avail
        chain = Chain(-1)
        bufs: list[tuple[int, int, int]] = []
        total = 0
        while True:
            if chain.entries > self.size:
                raise RingError(f"queue {self.index}: chain at {start} runs around the ring")
            addr, length, buf_id, _ = pl.DESC.unpack_from(self._desc, pl.DESC_SIZE * pos)
            flags = self._entry_flags(pos)
            if not pl.is_avail(flags, wrap):
                raise RingError(f"queue {self.index}: entry {pos} of the chain at {start} is "
                                f"not available (flags {flags:#x}, wrap {wrap})")
            pos += 1
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
            if flags & pl.F_INDIRECT:
                if not self.indirect or flags & pl.F_NEXT or bufs:
                    raise RingError(f"queue {self.index}: invalid indirect descriptor at {start}")
                if not length or length % pl.DESC_SIZE:
                    raise RingError(f"queue {self.index}: bad indirect table length {length}")
                table = self._buffer(addr, length)
                for k in range(length // pl.DESC_SIZE):
                    a, n, _id, f = pl.DESC.unpack_from(table, pl.DESC_SIZE * k)
                    bufs.append((a, n, f & pl.F_WRITE))  # 2.8.19: other flags reserved
                break
            bufs.append((addr, length, flags & pl.F_WRITE))
            if not flags & pl.F_NEXT:
                break
            chain.entries += 1
        if buf_id >= self.size:
            raise RingError(f"queue {self.index}: buffer id {buf_id} outside a "
                            f"{self.size}-entry ring")
        chain.head = buf_id  # 2.8.6: the id of the chain's last entry
        for addr, length, write in bufs:
            total += length
            if total > MAX_CHAIN_BYTES:
                raise RingError(f"queue {self.index}: chain at {start} exceeds 4 GiB")
            buf = self._buffer(addr, length)
            if write:
                chain.writable.append(buf)
            elif chain.writable:
                raise RingError(f"queue {self.index}: readable descriptor after a writable one")
            else:
                chain.readable.append(buf)
        self.last_avail, self.avail_wrap = pos, wrap
        return chain

    def _push_packed(self, chain: Chain, written: int) -> None:
        if self.in_order:
            # 2.8.18: buffers skipped by a batch's entry count as used completely
            if self._batch is not None:
                self._pad_skipped()
            self._batch_chain = chain
            self._batch = (chain.head, written)
            self._batch_entries += chain.entries
            return
        self._write_used(chain.head, written, chain.entries)

    def _pad_skipped(self) -> None:
        """The previous chain of the batch is skipped: zero the rest of its writable
        part, so that what the driver takes as written is ours."""
        assert self._batch is not None and self._batch_chain is not None
        _, written = self._batch
        for buf in self._batch_chain.writable:
            n = len(buf)
            if written < n:
                buf[written:] = bytes(n - written)
            written = max(0, written - n)

    def flush(self) -> None:
        """In-order batching: write the used entry of the chains pushed since the last
        flush (the session flushes before each interrupt decision)."""
        if self.started:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if self._batch is None:
            return
        head, written = self._batch
        entries, self._batch, self._batch_entries = self._batch_entries, None, 0
        self._batch_chain = None
        self._write_used(head, written, entries)

    def _write_used(self, head: int, written: int, entries: int) -> None:
        assert self._desc is not None
        pos = self.used_idx
        off = pl.DESC_SIZE * pos
        # len and id (bytes 8..13) first; addr is left as the driver wrote it. The
        # driver reads them only after the flags below (acquire), so their width
        # does not matter
        _LEN_ID.pack_into(self._desc, off + 8, written, head)
        # release: the reply data and id/len are visible before the flags that
        # hand the entry back (AVAIL = USED = our wrap counter)
        flags = pl.F_AVAIL | pl.F_USED if self.used_wrap else 0
        lib.vfsdrv_store_release_u16(self._desc_ptr + off + pl.FLAGS_OFFSET, flags)
        pos += entries  # the rest of the chain's (the batch's) entries are skipped
        if pos >= self.size:
            pos -= self.size
            self.used_wrap ^= 1
        self.used_idx = pos
        self._used_since_signal += entries
        self.used_entries += 1

    def _signal_packed(self) -> None:
        moved, self._used_since_signal = self._used_since_signal, 0
        if not moved:
            return
        lib.vfsdrv_mb()  # our used flags stores before reading the driver's suppression
        raw = lib.vfsdrv_load_acquire_u32(self._avail_ptr)  # off_wrap and flags at once
        off_wrap, flags = raw & 0xFFFF, raw >> 16
        if flags == pl.EVENT_DISABLE:
            return
        if flags == pl.EVENT_DESC and self.event_idx:
            event = pl.event_position(off_wrap, self.used_wrap, self.size)
            if not rl.need_event(event, self.used_idx, (self.used_idx - moved) & 0xFFFF):
                return
        os.eventfd_write(self.call_fd, 1)

    def push(self, chain: Chain, written: int) -> None:
        """Return a chain with `written` bytes written to its writable part."""
        assert self._used is not None
        if written > chain.writable_len:
            raise RingError(f"queue {self.index}: used len {written} > writable part")
        if self.packed:
            self._push_packed(chain, written)
            return
        if self.audit is not None:
            self.audit.used(self, chain.head)
        slot = rl.USED_RING + rl.USED_ELEM.size * (self.used_idx % self.size)
        rl.USED_ELEM.pack_into(self._used, slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # release: the element (and the data written before it) is visible before idx
        lib.vfsdrv_store_release_u16(self._used_ptr + rl.USED_IDX, self.used_idx)

    def signal(self) -> None:
        """Interrupt the driver if it asked for it (used buffer notification)."""
        if self.call_fd is None or not self.started:
            return
        assert self._avail is not None
        if self.packed:
            self._signal_packed()
            return
        lib.vfsdrv_mb()  # our used idx store before reading the driver's suppression
        if self.event_idx:
            off = rl.used_event_offset(self.size)
            used_event = lib.vfsdrv_load_acquire_u16(self._avail_ptr + off)
            old = self.signalled_used
            self.signalled_used = self.used_idx
            if old is not None and not rl.need_event(used_event, self.used_idx, old):
                return
        else:
            flags = lib.vfsdrv_load_acquire_u16(self._avail_ptr + rl.AVAIL_FLAGS)
            if flags & rl.VRING_AVAIL_F_NO_INTERRUPT:
                return
        os.eventfd_write(self.call_fd, 1)

    def arm_kick(self) -> bool:
        """Ask for a kick at the next avail entry; True if entries arrived meanwhile."""
        if not self.ready:
            return False
        if self.packed:
            if self.event_idx:
                # off_wrap before flags: a driver that sees DESC sees this offset
                # (without EVENT_IDX the area stays ENABLE: a kick for every batch)
                lib.vfsdrv_store_u16(self._used_ptr + 0,
                                     self.last_avail | self.avail_wrap << pl.WRAP_SHIFT)
                lib.vfsdrv_store_release_u16(self._used_ptr + 2, pl.EVENT_DESC)
                lib.vfsdrv_mb()  # the event store before the next entry's flags load
            return self._head_available()
        if self.event_idx:
            off = rl.avail_event_offset(self.size)
            # one naturally sized store: the driver reads avail_event concurrently, and a
            # 2-byte slice copy may be done byte by byte (a torn value loses a kick)
            lib.vfsdrv_store_release_u16(self._used_ptr + off, self.last_avail)
            lib.vfsdrv_mb()  # avail_event store before the avail idx load
        arrived = self.pending() > 0
        if self.audit is not None and not arrived:
            self.audit.arm(self.last_avail)  # the driver must kick when it goes past this
        return arrived

    def drain_kick(self) -> None:
        """Consume the kick eventfd's counter (non-blocking)."""
        if self.kick_fd is None:
            return
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
