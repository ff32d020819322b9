"""Driver side of a split (virtio 1.2 2.7) or packed (2.8) virtqueue, sans I/O.

The ring itself is the native core's (`struct vfsdrv_vq` in driver/native/core.c):
the same code serves this class, used by the control plane, the typed client and
the pyfuse3 frontend, and the relay's native pump, which drives a request queue
without the GIL. This class adds what only Python needs: a token per chain and
exceptions.

The virtqueue turns buffers into descriptor chains and used entries back into
completions. It never kicks and never waits: the transport does the I/O, so the
same code serves every event loop and is testable against an in-process device.

Memory ordering (core.c says why at each barrier): descriptors and ring entries
are plain stores made visible by a store-release of avail->idx; a full fence
orders that store before the read of the device's suppression state; used->idx
is read with a load-acquire before the used entries.

Everything the device hands back is validated: a used id out of range or not in
flight, a length larger than the chain's writable part, or a used index that
runs ahead by more than the chains in flight raises RingError and leaves the
queue untouched (the whole batch is checked before any of it completes).

A packed queue (`packed=True`, native/packed.c) has three parts as well, laid out
differently: the descriptor ring, the driver event suppression area and the device
event suppression area, given to the transport where split's descriptor table,
avail ring and used ring go. A head descriptor's flags, stored last with release,
publish its chain; a used entry's flags are read with acquire before its id and
length; flags neither "available" nor "used" for the expected wrap counter raise
RingError as the other faults do.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from .._native import ffi, lib
from ..errors import DmaError, RingError
from . import packed_layout as pl
from . import ring_layout as rl
from .memory import DmaBuffer, DmaPool
from .transport import QueueAddresses

Segment = tuple[int, int]  # (device address, length)

#: descriptors in each indirect table
INDIRECT_TABLE_ENTRIES = lib.VFSDRV_INDIRECT_MAX
#: heads with an indirect table (the rest chain directly): 256 KiB of tables at most
INDIRECT_HEADS = 256


class QueueFull(Exception):  # noqa: N818 - a condition, not an error: callers wait
    """No room for this chain right now; retry after completions."""


class _ClosedQueue:
    """Stands for the native queue of a closed Virtqueue: every use raises."""

    def __init__(self, index: int) -> None:
        self._index = index

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols (copy, pickle, cffi) look for these
            raise AttributeError(name)
        raise RingError(f"queue {self._index} is closed")


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
        packed: bool = False,
        in_order: bool = False,
    ) -> None:
        if packed and not 0 < size <= rl.MAX_QUEUE_SIZE:
            raise RingError(f"queue {index}: size {size} is not 1..32768")
        if not packed and not rl.is_valid_size(size):
            raise RingError(f"queue {index}: size {size} is not a power of two <= 32768")
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.packed = packed
        self._pool = pool
        self._parts: list[DmaBuffer] = []
        # packed: desc is the descriptor ring, avail the driver event area, used the
        # device event area (the same three transport addresses)
        self.desc = self._alloc_part(rl.desc_table_size(size), rl.DESC_ALIGN)
        if packed:
            self.avail = self._alloc_part(pl.EVENT_SIZE, pl.EVENT_ALIGN)
            self.used = self._alloc_part(pl.EVENT_SIZE, pl.EVENT_ALIGN)
        else:
            self.avail = self._alloc_part(rl.avail_ring_size(size), rl.AVAIL_ALIGN)
            self.used = self._alloc_part(rl.used_ring_size(size), rl.USED_ALIGN)
        self._desc_view = self.desc.view
        self._indirect: DmaBuffer | None = None
        heads = min(size, INDIRECT_HEADS) if indirect else 0
        if heads:
            # one table per head, allocated once: the ring core picks a head's table
            # by its index, so the block must be device-contiguous; scattered 4 KiB
            # pages (no-IOMMU) cannot give that: then chains go without indirect
            size_ = heads * INDIRECT_TABLE_ENTRIES * rl.DESC_SIZE
            block = pool.alloc(size_, 4096)
            if len(block.segments(0, size_)) == 1:
                self._indirect = block
                self._parts.append(block)
            else:
                pool.free(block)
        self.indirect = self._indirect is not None
        self._c = ffi.new("struct vfsdrv_vq *")
        init = lib.vfsdrv_vq_init_packed if packed else lib.vfsdrv_vq_init
        rc = init(
            self._c, index, size, self.desc.address_of(), self.avail.address_of(),
            self.used.address_of(),
            self._indirect.address_of() if self._indirect else ffi.NULL,
            self._indirect.addr if self._indirect else 0, heads, int(event_idx),
        )
        if rc == 0 and in_order:
            # VIRTIO_F_IN_ORDER (packed only): one used entry may complete a batch
            rc = lib.vfsdrv_vq_set_in_order(self._c)
            if rc < 0:
                lib.vfsdrv_vq_destroy(self._c)
        if rc < 0:
            self._free_parts()
            raise RingError(self._error())
        self._tokens: list[Any] = [None] * size
        self._used = ffi.new("struct vfsdrv_used[]", size)
        self._segs = ffi.new("struct vfsdrv_seg[]", size)
        self._closed = False

    # -- set-up -----------------------------------------------------------------
    def _alloc_part(self, size: int, align: int) -> DmaBuffer:
        # round to whole cache lines so parts never share a line with other data
        buf = self._pool.alloc((size + 63) & ~63, max(align, 64))
        self._parts.append(buf)
        if len(buf.segments(0, size)) != 1:
            self._free_parts()
            raise DmaError(f"queue {self.index}: ring part of {size} bytes is not contiguous")
        return buf

    def _free_parts(self) -> None:
        for buf in self._parts:
            self._pool.free(buf)
        self._parts.clear()

    def _error(self) -> str:
        return ffi.string(self._c.error).decode(errors="replace")

    def _live(self):
        """The native queue, or RingError once closed (cffi would raise a TypeError
        naming the stand-in)."""
        c = self._c
        if type(c) is _ClosedQueue:
            raise RingError(f"queue {self.index} is closed")
        return c

    @property
    def addresses(self) -> QueueAddresses:
        return QueueAddresses(self.desc.addr, self.avail.addr, self.used.addr)

    @property
    def native(self):
        """The `struct vfsdrv_vq *` (for the native pump, which then owns the queue)."""
        return self._live()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lib.vfsdrv_vq_destroy(self._c)
        # the struct is freed and the ring's memory may be unmapped next: any later
        # use is an error, never a read of freed memory
        self._c = _ClosedQueue(self.index)
        self._free_parts()

    # -- the ring's state, as the core keeps it ---------------------------------
    @property
    def num_free(self) -> int:
        return self._c.num_free

    @property
    def in_flight(self) -> int:
        return self._c.in_flight

    @property
    def avail_idx(self) -> int:
        return self._c.avail_idx

    @property
    def last_used(self) -> int:
        return self._c.last_used

    @property
    def interrupts_enabled(self) -> bool:
        return bool(self._c.interrupts_on)

    @property
    def idle(self) -> bool:
        """Nothing in flight: no used entry can legitimately appear."""
        return self._c.in_flight == 0

    # -- adding buffers -------------------------------------------------------------
    def add(self, readable: Sequence[Segment], writable: Sequence[Segment], token: Any) -> int:
        """Chain the segments (device-readable first, as the spec requires) and
        queue the chain for publishing. Returns the head descriptor id."""
        n = len(readable) + len(writable)
        if n > self.size:
            raise ValueError(f"chain of {n} descriptors exceeds queue size {self.size}")
        segs = self._segs
        i = 0
        for addr, length in readable:
            segs[i].addr, segs[i].len, segs[i].flags = addr, length, 0
            i += 1
        for addr, length in writable:
            segs[i].addr, segs[i].len, segs[i].flags = addr, length, lib.VFSDRV_SEG_WRITE
            i += 1
        head = lib.vfsdrv_vq_add(self._live(), segs, n)
        if head < 0:
            if head == -errno.ENOSPC:
                raise QueueFull(self._error())
            raise ValueError(self._error())
        self._tokens[head] = token
        return head

    def publish(self) -> bool:
        """Make every added chain visible to the device; True if it wants a kick."""
        return bool(lib.vfsdrv_vq_publish(self._live()))

    # -- harvesting -----------------------------------------------------------------
    def used_idx(self) -> int:
        """split: used->idx as the device wrote it; packed: the position (wrap counter
        in bit 15) after the used entries the device has written so far, not yet
        harvested (it moves when the device completes, as used->idx does)."""
        self._live()  # closed: the ring's memory may be gone
        if not self.packed:
            return lib.vfsdrv_load_acquire_u16(self.used.address_of() + rl.USED_IDX)
        c = self._c
        pos, wrap, left = c.next_used, c.used_wrap, c.in_flight
        base = self.desc.address_of()
        while left:
            flags = lib.vfsdrv_load_acquire_u16(base + pl.DESC_SIZE * pos + pl.FLAGS_OFFSET)
            if not pl.is_used(flags, wrap):
                break
            buf_id = int.from_bytes(self.desc.view[pl.DESC_SIZE * pos + 12:][:2], "little")
            if buf_id >= self.size or not c.chain_len[buf_id]:
                break  # get_used() reports it
            pos += c.chain_len[buf_id]
            if pos >= self.size:
                pos, wrap = pos - self.size, wrap ^ 1
            left -= 1
        return pos | wrap << pl.WRAP_SHIFT

    def has_used(self) -> bool:
        return lib.vfsdrv_vq_used_pending(self._live()) != 0

    def get_used(self) -> list[tuple[Any, int]]:
        """Every newly used chain as (token, bytes written by the device)."""
        n = lib.vfsdrv_vq_harvest(self._live(), self._used, self.size)
        if n < 0:
            raise RingError(self._error())
        out = []
        tokens = self._tokens
        for k in range(n):
            e = self._used[k]
            out.append((tokens[e.id], e.len))
            tokens[e.id] = None
        return out

    def pop_token(self, head: int) -> Any:
        """The token of a chain whose used entry was harvested natively (by a
        batched path): what get_used() would have returned for it."""
        token = self._tokens[head]
        self._tokens[head] = None
        return token

    # -- used-buffer notification suppression -----------------------------------------
    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (best effort: the device may still)."""
        lib.vfsdrv_vq_disarm(self._live())

    def enable_interrupts(self) -> bool:
        """Re-arm interrupts. Returns True if used buffers arrived meanwhile (the
        caller must harvest them: no interrupt will come for those)."""
        return bool(lib.vfsdrv_vq_arm(self._live()))
