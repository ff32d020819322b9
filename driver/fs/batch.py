"""The typed client's batched path: many requests added and published per call,
every completion harvested per wake, through the same core and the same rules.

A batch of requests goes to the native core in one call (driver/native/client.c):
each request is written into its DMA slot, its reply room sized and placed by the
core's rules, its chain added (vfsdrv_vq_add); the batch is published once and the
device kicked once unless it suppressed notifications. Harvest is one call too:
every used entry (vfsdrv_vq_harvest validates each), every reply of this path
checked by vfsdrv_check_reply, the rule the one-at-a-time path and the relay's pump
use. Python then only copies each payload out and hands it to its `BatchPending`.

Once attached to a VirtioFs (`VirtioFs.batch`) this object harvests its request
queues for process(): chains the Python path added on the same queue come back to
process() as (token, length), as Virtqueue.get_used() gives them.

Requests this path does not take go the one-at-a-time way (with publishing
deferred): hiprio opcodes, SETLKW (its "wait" reply and early notification belong
to the in-flight table), slots that are not device-contiguous, and whatever finds
the ring full (queued behind it, as the Python path queues).
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._native import ffi, lib
from ..errors import RingError
from .device import Pending
from .slots import Completion, Slot

if TYPE_CHECKING:
    from ..virtio.virtqueue import Virtqueue
    from .client import FuseClient
    from .device import VirtioFs, _QueueState

log = logging.getLogger(__name__)

#: struct vfsdrv_creq and struct vfsdrv_cdone (tests/test_native_layout.py pins them)
CREQ = struct.Struct("<IIQQIIII")
CDONE = struct.Struct("<IIIiIIII")
NONE = lib.VFSDRV_CLIENT_NONE


class BatchPending(Pending):
    """A request of the batched path: `result()` as any Pending (flushing its client
    first if it is still staged); once done its client's `reap()` returns it."""

    __slots__ = ("_client",)

    def __init__(self, fs: VirtioFs, unique: int, opcode: int, client: FuseClient) -> None:
        # (FuseClient.submit_many sets the same fields without calling this)
        Pending.__init__(self, fs, unique, opcode)
        self._client = client

    def _done(self, comp: Completion) -> None:
        Pending._done(self, comp)
        self._client._reaped.append(self)

    def _finish(self, error: int, data: bytes) -> None:
        self.data = data
        self.completion = error
        self._client._reaped.append(self)

    def result(self, timeout: float | None = 60.0) -> bytes:
        if self.completion == 0:  # the usual case, reaped: no wait, no error
            return self.data
        if self.completion is None:
            self._client.publish()  # a staged request would wait for nothing
        return Pending.result(self, timeout)


class NativeBatch:
    """The batched path of one VirtioFs: a table of its slots for the native core,
    and which slot each head descriptor of each request queue carries."""

    def __init__(self, fs: VirtioFs) -> None:
        self.fs = fs
        self.capacity = fs._small_count + fs._large_count
        self._table = ffi.new("struct vfsdrv_slot[]", max(self.capacity, 1))
        self._slots: list[Slot] = []
        self._home: list[list[Slot]] = []  # the pool's free list each slot goes back to
        self.slot_index: dict[Slot, int | None] = {}
        self._heads: dict[int, object] = {}  # queue index -> uint32_t[size]
        size = max(qs.vq.size for qs in fs.request_queues)
        self._used = ffi.new("struct vfsdrv_used[]", size)
        self._done = ffi.new("struct vfsdrv_cdone[]", size)
        self._done_buf = ffi.buffer(self._done)
        self._status = ffi.new("int32_t[]", size)
        self._kick = ffi.new("int32_t[1]")
        self._why = ffi.new("char[]", 120)
        self._in_flight: dict[int, BatchPending] = {}  # slot index -> its request
        for qs in fs.request_queues:
            heads = ffi.new("uint32_t[]", qs.vq.size)
            ffi.memmove(heads, b"\xff" * (4 * qs.vq.size), 4 * qs.vq.size)  # NONE
            self._heads[qs.vq.index] = heads
        self.bad_replies = 0

    def index(self, slot: Slot) -> int | None:
        """The slot's place in the native table; None if this path cannot carry it
        (its pages are not device-contiguous, or the table is full)."""
        if slot in self.slot_index:
            return self.slot_index[slot]
        k: int | None = None
        if slot.buf.contiguous and len(self._slots) < self.capacity:
            k = len(self._slots)
            t = self._table[k]
            t.host = ffi.cast("uint8_t *", slot.buf.address_of())
            t.addr = slot.buf.addr
            t.pages = ffi.NULL
            t.size = len(slot.view)
            t.large = int(slot.large)
            t.state = lib.VFSDRV_SLOT_FREE
            self._slots.append(slot)
            self._home.append(self.fs.slots.large if slot.large else self.fs.slots.small)
        self.slot_index[slot] = k
        return k

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- adding ------------------------------------------------------------------------
    def add(self, qs: _QueueState, reqs: bytes, bodies: bytes, idx: Sequence[int],
            pendings: Sequence[BatchPending], publish: bool) -> list[int]:
        """Add the requests (CREQ records, bodies one after another) to queue `qs` in
        one native call, publish once and kick once when `publish`. Returns the
        positions of those not added: the caller sends them the other way."""
        if self.fs.broken is not None:
            raise self.fs.broken
        vq = qs.vq
        n = len(idx)
        if n > len(self._status):  # a status per request: more than a ring's worth may come
            self._status = ffi.new("int32_t[]", n)
        added = lib.vfsdrv_client_add(
            vq.native, self._table, len(self._slots), self._heads[vq.index],
            ffi.from_buffer("struct vfsdrv_creq[]", reqs), n, ffi.from_buffer(bodies),
            len(bodies), self.fs.max_io, self._status, int(publish), self._kick,
        )
        if added < 0:
            raise ValueError(ffi.string(vq.native.error).decode(errors="replace"))
        left: list[int] = []
        if added == n:  # the usual case: every one in the ring
            self._in_flight.update(zip(idx, pendings, strict=True))
        else:
            in_flight = self._in_flight
            for k, st in enumerate(ffi.unpack(self._status, n)):
                if st >= 0:
                    in_flight[idx[k]] = pendings[k]
                elif st == -errno.ENOSPC:
                    # written in its slot: queued behind the ring, the Python path's way
                    t = self._table[idx[k]]
                    self.fs.submit(self._slots[idx[k]], t.in_len, pendings[k]._done,
                                   t.req_off, False)
                else:
                    left.append(k)
        if self._kick[0]:
            self.fs.transport.notify(vq.index)
        elif not publish and added:
            self.fs.defer_publish(qs)
        return left

    # -- harvesting -----------------------------------------------------------------------
    def harvest(self, vq: Virtqueue) -> tuple[list, int]:
        """Every used entry of `vq`: this path's requests completed here, the others
        returned as (token, length) for process(). Also returns how many in all."""
        heads = self._heads.get(vq.index)
        if heads is None:  # hiprio: not ours
            used = vq.get_used()
            return used, len(used)
        n = lib.vfsdrv_client_harvest(
            vq.native, self._table, len(self._slots), heads, self._used, self._done,
            vq.size, self._why, 120)
        if n < 0:
            raise RingError(ffi.string(vq.native.error).decode(errors="replace"))
        others = []
        if not n:
            return others, 0
        in_flight = self._in_flight
        slots = self._slots
        home = self._home
        for sl, head, length, error, off, size, bad, _ in CDONE.iter_unpack(
                self._done_buf[: n * CDONE.size]):
            if sl == NONE:
                others.append((vq.pop_token(head), length))
                continue
            slot = slots[sl]
            p = in_flight.pop(sl)
            if bad:
                self._bad(p)
            p.data = bytes(slot.view[off : off + size])  # out of DMA memory: reused next
            p.completion = error
            p._client._reaped.append(p)
            home[sl].append(slot)  # SlotPool.release (on_done is never set on this path)
        return others, n

    def _bad(self, p: BatchPending) -> None:
        # why: the native harvest keeps the reason of the last bad reply of the batch
        self.bad_replies += 1
        self.fs.stats["bad_reply"] += 1
        log.warning("device sent a bad reply (opcode %d): %s", p.opcode,
                    ffi.string(self._why).decode(errors="replace"))

    def fail_all(self, error: int) -> None:
        """The device is unusable: every request of this path completes with `error`
        (its slot stays out of the pool: the device may still write it)."""
        waiting = list(self._in_flight.values())
        self._in_flight.clear()
        for p in waiting:
            p._finish(error, b"")


__all__ = ["BatchPending", "NativeBatch"]
