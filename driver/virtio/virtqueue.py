"""Driver side of a split virtqueue (virtio 1.2 2.7), sans I/O.

The virtqueue turns buffers into descriptor chains and used entries back into
completions. It never kicks and never waits: the transport does the I/O, so the
same code serves every event loop and is testable against an in-process device.

Memory ordering (the spec's "suitable memory barrier"): the ring lives in memory
the device reads concurrently, and Python itself issues no fences. Three points
need them, done by the small C helper `vfsdrv._native`:
  * publishing: descriptors and the avail ring entry are plain stores, then
    avail->idx is written with a store-release, so the device never sees the
    index before the entry (stlr on aarch64, a plain mov on x86-64 TSO);
  * kick decision: a full fence between writing avail->idx and reading
    used->flags / avail_event, a store->load ordering even x86 does not give;
  * harvesting: used->idx is read with a load-acquire before the used entries
    (ldar on aarch64), so the entries are not read stale.

Everything the device hands back is validated: a used id out of range or not in
flight, a length larger than the chain's writable part, or a used index that
runs ahead by more than the queue size raises RingError and leaves the free
list untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._native import lib
from ..errors import DmaError, RingError
from . import ring_layout as rl
from .memory import DmaBuffer, DmaPool
from .transport import QueueAddresses

Segment = tuple[int, int]  # (device address, length)

#: descriptors in each lazily allocated indirect table
INDIRECT_TABLE_ENTRIES = 64


class QueueFull(Exception):  # noqa: N818 - a condition, not an error: callers wait
    """No room for this chain right now; retry after completions."""


@dataclass
class _Chain:
    token: Any
    descs: list[int] = field(default_factory=list)  # ring descriptors, head first
    writable: int = 0  # total device-writable bytes


class Virtqueue:
    """One split virtqueue. `add()` chains, `publish()` makes them visible and says
    whether to kick, `get_used()` returns [(token, written_len)]."""

    def __init__(
        self,
        index: int,
        size: int,
        pool: DmaPool,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        if not rl.is_valid_size(size):
            raise RingError(f"queue {index}: size {size} is not a power of two <= 32768")
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._pool = pool
        self.desc = self._alloc_part(rl.desc_table_size(size), rl.DESC_ALIGN)
        self.avail = self._alloc_part(rl.avail_ring_size(size), rl.AVAIL_ALIGN)
        self.used = self._alloc_part(rl.used_ring_size(size), rl.USED_ALIGN)
        self._desc_view = self.desc.view
        self._avail_view = self.avail.view
        self._used_view = self.used.view
        self._avail_idx_ptr = self.avail.address_of() + rl.AVAIL_IDX
        self._used_idx_ptr = self.used.address_of() + rl.USED_IDX
        self._used_event_off = rl.used_event_offset(size)
        self._avail_event_ptr = self.used.address_of() + rl.avail_event_offset(size)
        self._used_flags_ptr = self.used.address_of() + rl.USED_FLAGS
        # Free list threaded through our shadow `next` array (the device never
        # writes descriptors, but we do not read them back either: shadows only).
        self._next = [(i + 1) % size for i in range(size)]
        self.free_head = 0
        self.num_free = size
        self._chains: list[_Chain | None] = [None] * size
        self.in_flight = 0
        self._indirect_tables: dict[int, DmaBuffer] = {}
        self.avail_idx = 0  # next avail->idx to publish (free-running, 16-bit)
        self._published = 0  # avail->idx the device has been shown
        self.last_used = 0
        self.interrupts_enabled = True

    # -- set-up -----------------------------------------------------------------
    def _alloc_part(self, size: int, align: int) -> DmaBuffer:
        # round to whole cache lines so parts never share a line with other data
        buf = self._pool.alloc((size + 63) & ~63, max(align, 64))
        if len(buf.segments(0, size)) != 1:
            raise DmaError(f"queue {self.index}: ring part of {size} bytes is not contiguous")
        return buf

    @property
    def addresses(self) -> QueueAddresses:
        return QueueAddresses(self.desc.addr, self.avail.addr, self.used.addr)

    def close(self) -> None:
        for buf in (self.desc, self.avail, self.used, *self._indirect_tables.values()):
            self._pool.free(buf)
        self._indirect_tables.clear()

    # -- adding buffers -------------------------------------------------------------
    def add(self, readable: Sequence[Segment], writable: Sequence[Segment], token: Any) -> int:
        """Chain the segments (device-readable first, as the spec requires) and
        queue the chain for publishing. Returns the head descriptor id."""
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if n > self.size:
            raise ValueError(f"chain of {n} descriptors exceeds queue size {self.size}")
        writable_len = 0
        for _, ln in writable:
            writable_len += ln
        total = writable_len
        for _, ln in readable:
            total += ln
        if total > 0xFFFFFFFF:
            raise ValueError("a chain must not exceed 2^32 bytes")
        use_indirect = self.indirect and n > 1 and n <= INDIRECT_TABLE_ENTRIES
        needed = 1 if use_indirect else n
        if self.num_free < needed:
            raise QueueFull(
                f"queue {self.index}: {self.num_free} descriptors free, {needed} needed"
            )
        head = self.free_head
        chain = _Chain(token, writable=writable_len)
        pack = rl.DESC.pack_into
        nr = len(readable)
        if use_indirect:
            table = self._indirect_table(head)
            view = table.view
            for i in range(n):
                addr, length = readable[i] if i < nr else writable[i - nr]
                flags = 0 if i < nr else rl.VRING_DESC_F_WRITE
                if i < n - 1:
                    pack(view, i * rl.DESC_SIZE, addr, length, flags | rl.VRING_DESC_F_NEXT, i + 1)
                else:
                    pack(view, i * rl.DESC_SIZE, addr, length, flags, 0)
            pack(self._desc_view, head * rl.DESC_SIZE, table.addr, n * rl.DESC_SIZE,
                 rl.VRING_DESC_F_INDIRECT, 0)
            chain.descs.append(head)
            self.free_head = self._next[head]
        else:
            d = head
            for i in range(n):
                addr, length = readable[i] if i < nr else writable[i - nr]
                flags = 0 if i < nr else rl.VRING_DESC_F_WRITE
                nxt = self._next[d]
                if i < n - 1:
                    pack(self._desc_view, d * rl.DESC_SIZE, addr, length,
                         flags | rl.VRING_DESC_F_NEXT, nxt)
                else:
                    pack(self._desc_view, d * rl.DESC_SIZE, addr, length, flags, 0)
                chain.descs.append(d)
                d = nxt
            self.free_head = d
        self.num_free -= needed
        self._chains[head] = chain
        self.in_flight += 1
        slot = self.avail_idx % self.size
        self._avail_view[rl.AVAIL_RING + 2 * slot : rl.AVAIL_RING + 2 * slot + 2] = head.to_bytes(
            2, "little"
        )
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def _indirect_table(self, head: int) -> DmaBuffer:
        table = self._indirect_tables.get(head)
        if table is None:
            size = INDIRECT_TABLE_ENTRIES * rl.DESC_SIZE
            table = self._pool.alloc(size, rl.DESC_ALIGN)
            if len(table.segments(0, size)) != 1:
                raise DmaError(f"queue {self.index}: indirect table is not contiguous")
            self._indirect_tables[head] = table
        return table

    def publish(self) -> bool:
        """Make every added chain visible to the device; True if it wants a kick."""
        new = self.avail_idx
        old = self._published
        if new == old:
            return False
        lib.vfsdrv_store_release_u16(self._avail_idx_ptr, new)
        self._published = new
        lib.vfsdrv_mb()  # order the idx store before reading the device's suppression state
        if self.event_idx:
            avail_event = lib.vfsdrv_load_acquire_u16(self._avail_event_ptr)
            return rl.need_event(avail_event, new, old)
        flags = lib.vfsdrv_load_acquire_u16(self._used_flags_ptr)
        return not flags & rl.VRING_USED_F_NO_NOTIFY

    # -- harvesting -----------------------------------------------------------------
    def used_idx(self) -> int:
        return lib.vfsdrv_load_acquire_u16(self._used_idx_ptr)

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used

    def get_used(self) -> list[tuple[Any, int]]:
        """Every newly used chain as (token, bytes written by the device).

        The whole batch is validated before anything is completed, so a bad entry
        leaves the queue exactly as it was (no completion lost, none duplicated)."""
        idx = self.used_idx()
        pending = (idx - self.last_used) & 0xFFFF
        if pending == 0:
            return []
        if pending > self.in_flight:
            raise RingError(
                f"queue {self.index}: used index {idx} is {pending} ahead of {self.last_used}, "
                f"but only {self.in_flight} chains are in flight"
            )
        view = self._used_view
        entries = []
        seen: set[int] = set()
        pos = self.last_used
        for _ in range(pending):
            off = rl.USED_RING + 8 * (pos % self.size)
            head, length = rl.USED_ELEM.unpack_from(view, off)
            self._check_used(head, length, seen)
            seen.add(head)
            entries.append((head, length))
            pos = (pos + 1) & 0xFFFF
        out = [(self._complete(head, length), length) for head, length in entries]
        self.last_used = pos
        if self.event_idx and self.interrupts_enabled:
            self._set_used_event(self.last_used)
        return out

    def _check_used(self, head: int, length: int, seen: set[int]) -> None:
        if head >= self.size:
            raise RingError(f"queue {self.index}: used id {head} out of range (size {self.size})")
        chain = self._chains[head]
        if chain is None or head in seen:
            raise RingError(f"queue {self.index}: used id {head} is not in flight")
        if length > chain.writable:
            raise RingError(
                f"queue {self.index}: used length {length} exceeds the {chain.writable} "
                f"device-writable bytes of chain {head}"
            )

    def _complete(self, head: int, length: int) -> Any:
        chain = self._chains[head]
        assert chain is not None  # checked by _check_used
        self._chains[head] = None
        self.in_flight -= 1
        # return the chain's descriptors to the free list, in order
        descs = chain.descs
        for a, b in zip(descs, descs[1:], strict=False):
            self._next[a] = b
        self._next[descs[-1]] = self.free_head
        self.free_head = descs[0]
        self.num_free += len(descs)
        return chain.token

    @property
    def idle(self) -> bool:
        """Nothing in flight: no used entry can legitimately appear."""
        return self.num_free == self.size

    # -- used-buffer notification suppression -----------------------------------------
    def _set_used_event(self, value: int) -> None:
        off = self._used_event_off
        self._avail_view[off : off + 2] = value.to_bytes(2, "little")

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (best effort: the device may still)."""
        self.interrupts_enabled = False
        if not self.event_idx:
            self._avail_view[rl.AVAIL_FLAGS : rl.AVAIL_FLAGS + 2] = (
                rl.VRING_AVAIL_F_NO_INTERRUPT.to_bytes(2, "little")
            )
        # with EVENT_IDX we simply stop advancing used_event

    def enable_interrupts(self) -> bool:
        """Re-arm interrupts. Returns True if used buffers arrived meanwhile (the
        caller must harvest them: no interrupt will come for those)."""
        self.interrupts_enabled = True
        if self.event_idx:
            self._set_used_event(self.last_used)
        else:
            self._avail_view[rl.AVAIL_FLAGS : rl.AVAIL_FLAGS + 2] = b"\0\0"
        lib.vfsdrv_mb()  # the re-arm store must be visible before we re-read used->idx
        return self.has_used()
