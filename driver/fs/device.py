"""The virtio-fs device: queue layout, FUSE_INIT, routing of requests and the
table of requests in flight, completion, waiting, failure.

Its helpers, one job each: vfsdrv.fs.slots (the DMA buffers requests travel in),
vfsdrv.fs.notify (the notification queue and blocking-lock waits),
vfsdrv.fs.sizing (the core's reply-room and layout rules). It knows nothing of
PCI or vhost-user (only the Transport interface, through VirtioDevice) and
nothing of frontends: a frontend fills a `Slot` (a DMA buffer) with a FUSE
request, submits it, and gets a `Completion` back from `process()`.

Queue layout (virtio 1.2 5.11.2): 0 = hiprio; with VIRTIO_FS_F_NOTIFICATION 1 =
notification queue and requests from 2; without it requests from 1, which is what
every device implements (the spec says 2, see docs/architecture.rst).

A blocking lock (FUSE_SETLKW) is answered at once with the "wait" value +1 and
completed later by FUSE_NOTIFY_LOCK {unique, error} on the notification queue;
the two travel on different queues, so the notification may come first.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._native import ffi, lib
from ..errors import (
    DeviceError,
    DeviceGoneError,
    DeviceNeedsResetError,
    DeviceTimeoutError,
    DmaError,
    ProtocolError,
    RingError,
    VfsdrvError,
)
from ..virtio.device import VirtioDevice
from ..virtio.transport import Transport
from ..virtio.virtqueue import QueueFull, Virtqueue
from . import abi
from .abi import FUSE_LOCK_WAIT, IN_HEADER_SIZE, OUT_HEADER_SIZE, Opcode
from .config import VIRTIO_FS_F_NOTIFICATION, FsConfig, parse_config
from .hiprio import HiprioFull, HiprioSender, split_hiprio
from .notify import LockWaits, NotificationQueue, OnNotify
from .sizing import (
    CHAIN_OVERHEAD,
    reply_capacity,
    reply_offset,
    request_offset,
    scattered_io_limit,
)
from .slots import Completion, OnDone, Slot, SlotPool, synthetic

__all__ = ["Completion", "OnDone", "OnNotify", "Pending", "Slot", "VirtioFs"]

log = logging.getLogger(__name__)

HIPRIO_QUEUE = 0
NOTIFY_QUEUE = 1
#: _fd_queue values that are not queue indexes
ERROR_FD = -1
CONFIG_FD = -2
#: how often a queue without an interrupt is looked at
POLL_INTERVAL = 0.001
#: how often device_status is read for DEVICE_NEEDS_RESET when no configuration
#: interrupt would say so (PCI without an MSI-X config vector, or --poll)
STATUS_POLL_INTERVAL = 0.1
IN_HEADER = struct.Struct("<IIQQIIIHH")
IN_HEADER_START = struct.Struct("<IIQ")  # len, opcode, unique
OUT_HEADER = struct.Struct("<IiQ")
@dataclass
class _QueueState:
    vq: Virtqueue
    pending: collections.deque = field(default_factory=collections.deque)


class VirtioFs:
    """A virtio-fs device brought up over a transport.

    Not thread-safe: one thread uses it at a time (the relay gives its request
    queues to native pumps, one thread each, and keeps the rest on one control
    thread). A call that times out raises TimeoutError; one stopped by Ctrl-C while
    its request was being handed to the device leaves the object broken (later
    calls raise DeviceError), never silently stuck. close() when done."""

    def __init__(
        self,
        transport: Transport,
        *,
        queue_size: int = 256,
        request_queues: int | None = None,
        notification: bool = True,
        notify_lock_code: int = abi.DEFAULT_NOTIFY_LOCK_CODE,
        notify_buffers: int = 16,
        max_io: int = 1 << 20,
        small_slots: int = 64,
        large_slots: int = 16,
        poll: bool = False,
        on_notify: OnNotify | None = None,
    ) -> None:
        for name, value, least in (("queue_size", queue_size, 2),
                                   ("notify_buffers", notify_buffers, 1),
                                   ("max_io", max_io, 4096)):
            if not isinstance(value, int) or value < least:
                # (a request takes two descriptors; blocking locks need a buffer to
                # come back through; a READ needs a page)
                raise ValueError(f"{name} must be a whole number of at least {least}, "
                                 f"not {value!r}")
        self.transport = transport
        self.dev = VirtioDevice(transport)
        self.queue_size = queue_size
        self.want_request_queues = request_queues
        self.want_notification = notification
        self.notify_lock_code = notify_lock_code
        self.notify_buffers = notify_buffers
        self.max_io = max_io
        self.poll = poll
        self.on_notify = on_notify
        self._small_count = small_slots
        self._large_count = large_slots
        self.slots = SlotPool(max_io)
        self.config: FsConfig | None = None
        self.notification = False
        self.hiprio: _QueueState | None = None
        self.notify_vq: Virtqueue | None = None
        self.request_queues: list[_QueueState] = []
        self._rr = 0
        self._in_flight: dict[int, Slot] = {}
        self._next_unique = 2
        self._broken: VfsdrvError | None = None
        self.init_out = None
        self.last_bad_reply = ""  # what was wrong with the latest bad reply (it got EIO)
        self.stats: collections.Counter[str] = collections.Counter()
        self.locks = LockWaits(self.stats)
        self.notifications: NotificationQueue | None = None
        self._poller: select.poll | None = None
        self._fd_queue: dict[int, int] = {}
        #: longest a wait may block: set when a queue has no interrupt (no MSI-X vector)
        self.max_wait: float | None = None
        self._status_every: float | None = None
        self._next_status = 0.0
        self.started = False
        #: request queues handed to native pumps (the relay): not harvested here
        self.pumped = False
        #: asks the pumps whether a SETLKW is still on its way (early notification)
        self.pending_setlkw: Callable[[int], bool] | None = None
        self._reply_hdr = ffi.new("struct vfsdrv_out_header *")
        self._why = ffi.new("char[]", 120)
        #: the typed client's batched path (vfsdrv.fs.batch), once a client uses it:
        #: it harvests the request queues (its own chains and, for process(), ours)
        self.batch = None
        #: request queues with chains added but not yet published (publish())
        self._unpublished: list[_QueueState] = []
        #: the native owner of the hiprio queue once the relay's pumps run (vfsdrv.fs.hiprio)
        self.hiprio_sender: HiprioSender | None = None
        #: hiprio requests the sender had no room for, oldest first (retried by process())
        self._hiprio_backlog: collections.deque[bytes] = collections.deque()
        self._hiprio_retry = self.HIPRIO_RETRY_MIN

    # -- bring-up -----------------------------------------------------------------
    def start(self) -> VirtioFs:
        """Negotiate, read config, set up queues, post notification buffers, DRIVER_OK."""
        if self.hiprio is not None or self._broken is not None:
            raise DeviceError(f"{self.transport.name}: start() once per VirtioFs "
                              "(closed, or already started)")
        dev = self.dev
        want = VIRTIO_FS_F_NOTIFICATION if self.want_notification else 0
        try:
            self._start(dev, want)
        except BaseException:
            # no half-started object holding memory, eventfds and the transport: a
            # failed start() leaves nothing to close (and the object closed)
            self.close()
            raise
        return self

    def _start(self, dev: VirtioDevice, want: int) -> None:
        dev.negotiate(want)
        self.notification = dev.has(VIRTIO_FS_F_NOTIFICATION)
        try:
            raw = dev.read_config(0, 44 if self.notification else 40)
            self.config = parse_config(raw, notification=self.notification)
            self.hiprio = _QueueState(dev.setup_queue(HIPRIO_QUEUE, self.queue_size))
            first = 2 if self.notification else 1
            if self.notification:
                self.notify_vq = dev.setup_queue(NOTIFY_QUEUE, self.queue_size)
            n = self.config.num_request_queues
            if self.want_request_queues:
                n = min(n, self.want_request_queues)
            for i in range(n):
                self.request_queues.append(_QueueState(dev.setup_queue(first + i, self.queue_size)))
            self.slots.allocate(self.transport.dma_pool(), self._small_count, self._large_count)
            ring = min(qs.vq.size for qs in self.request_queues)
            pieces = max((len(s.buf.segments(0, s.buf.size)) for s in self.slots.large),
                         default=1)
            if pieces + CHAIN_OVERHEAD > ring:
                # memory scattered for the device (no-IOMMU on 4 KiB pages: a
                # descriptor per page): the longest I/O's chain must fit the ring
                limit = scattered_io_limit(ring)
                if limit < self.max_io:
                    log.info("%s: DMA memory on scattered 4 KiB pages: I/O limited to %d "
                             "bytes, so that a request's chain fits the %d-entry ring",
                             self.transport.name, limit, ring)
                    self.max_io = limit
            if self.notification:
                assert self.notify_vq is not None
                self.notifications = NotificationQueue(
                    self.notify_vq, self.config.notify_buf_size or 0, self.notify_buffers,
                    locks=self.locks, lock_code=self.notify_lock_code,
                    still_coming=self._setlkw_on_its_way, dispatch=lambda: self.on_notify,
                    stats=self.stats,
                )
                self.notifications.post_all(pool=self.transport.dma_pool())
                # available at DRIVER_OK; no kick before it
            if self.poll:
                for qs in self._all_queues():
                    qs.disable_interrupts()
        except Exception:
            dev.fail()
            raise
        dev.driver_ok()
        if self.notify_vq is not None:
            # buffers were made available before DRIVER_OK (the device may look at
            # them from then on); notifications are allowed only now
            self.transport.notify(self.notify_vq.index)
        self._setup_poller()
        self._harvest = [self.hiprio, *self.request_queues]
        self.started = True
        log.info(
            "%s: tag %r, %d request queue(s), notification queue %s", self.transport.name,
            self.config.tag, len(self.request_queues),
            f"on (notify_buf_size {self.config.notify_buf_size})" if self.notification else "off",
        )

    def _all_queues(self) -> list[Virtqueue]:
        qs = [self.hiprio.vq] if self.hiprio else []
        if self.notify_vq:
            qs.append(self.notify_vq)
        return qs + [q.vq for q in self.request_queues]

    SLOT_SIZE_SMALL = SlotPool.SMALL_SIZE
    #: hiprio requests waiting for room at most (a page each at most: 16 MiB)
    HIPRIO_BACKLOG_MAX = 4096
    #: how often a backlog is retried: from 1 ms, doubling after tries that sent nothing
    HIPRIO_RETRY_MIN = 0.001
    HIPRIO_RETRY_MAX = 0.25

    @property
    def slot_size_large(self) -> int:
        return self.slots.large_size

    def _setup_poller(self) -> None:
        self._poller = select.poll()
        for vq in self._all_queues():
            fd = self.transport.interrupt_fd(vq.index)
            if self.poll:
                continue
            if fd is None:
                # no interrupt for this queue (e.g. MSI-X vectors ran out): look at
                # its ring at least every millisecond instead of never
                self.max_wait = POLL_INTERVAL
                log.info("queue %d has no interrupt: it is polled", vq.index)
                continue
            self._poller.register(fd, select.POLLIN)
            self._fd_queue[fd] = vq.index
        cfd = self.transport.config_fd()
        if cfd is None and self.transport.status_is_register:
            # nothing would tell us about DEVICE_NEEDS_RESET: look now and then
            self._status_every = STATUS_POLL_INTERVAL
            self.max_wait = min(self.max_wait or STATUS_POLL_INTERVAL, STATUS_POLL_INTERVAL)
        if cfd is not None:
            self._poller.register(cfd, select.POLLIN)
            self._fd_queue[cfd] = CONFIG_FD
        efd = self.transport.error_fd()
        if efd is not None:
            self._poller.register(efd, select.POLLIN | select.POLLHUP | select.POLLERR)
            self._fd_queue[efd] = ERROR_FD

    # -- FUSE_INIT ------------------------------------------------------------------
    DEFAULT_INIT_FLAGS = (
        abi.InitFlag.ASYNC_READ | abi.InitFlag.POSIX_LOCKS | abi.InitFlag.ATOMIC_O_TRUNC
        | abi.InitFlag.BIG_WRITES | abi.InitFlag.DONT_MASK | abi.InitFlag.FLOCK_LOCKS
        | abi.InitFlag.AUTO_INVAL_DATA | abi.InitFlag.DO_READDIRPLUS
        | abi.InitFlag.READDIRPLUS_AUTO | abi.InitFlag.ASYNC_DIO | abi.InitFlag.PARALLEL_DIROPS
        | abi.InitFlag.MAX_PAGES | abi.InitFlag.HANDLE_KILLPRIV | abi.InitFlag.CACHE_SYMLINKS
    )

    def init(
        self,
        flags: int = DEFAULT_INIT_FLAGS,
        *,
        minor: int = abi.KERNEL_MINOR_VERSION,
        max_readahead: int | None = None,
        timeout: float = 10.0,
    ):
        """Start the FUSE session (one FUSE_INIT on one request queue serves all)."""
        flags |= abi.InitFlag.INIT_EXT
        body = abi.pack(
            "fuse_init_in", major=abi.KERNEL_VERSION, minor=minor,
            max_readahead=self.max_io if max_readahead is None else max_readahead,
            flags=flags & 0xFFFFFFFF, flags2=flags >> 32,
        )
        reply = self.call(Opcode.INIT, 0, body, timeout=timeout)
        if len(reply) < 8:
            raise ProtocolError(f"FUSE_INIT reply has {len(reply)} bytes")
        data = bytes(reply) + bytes(max(0, abi.sizeof("fuse_init_out") - len(reply)))
        out = abi.unpack("fuse_init_out", data)
        if out.major != abi.KERNEL_VERSION:
            raise ProtocolError(f"device speaks FUSE {out.major}.{out.minor}, we need 7.x")
        if out.minor < abi.MIN_MINOR:
            raise ProtocolError(f"device speaks FUSE 7.{out.minor}; at least 7.{abi.MIN_MINOR}")
        self.init_out = out
        granted = out.flags | (out.flags2 << 32 if out.flags & abi.InitFlag.INIT_EXT else 0)
        self.init_flags = granted
        self.minor = min(minor, out.minor)
        self.max_write = min(out.max_write or 4096, self.max_io)
        log.info(
            "FUSE session 7.%d, max_write %d, flags %#x", self.minor, self.max_write, granted
        )
        return out

    # -- slots and submission -----------------------------------------------------------
    def next_unique(self) -> int:
        u = self._next_unique
        self._next_unique += 2  # even ids, as the kernel's (odd ones mark interrupts)
        return u

    def needs_large(self, opcode: int, in_len: int) -> bool:
        return self.slots.needs_large(opcode, in_len)

    def try_acquire(self, large: bool = False) -> Slot | None:
        return self.slots.try_acquire(large)

    def acquire(self, large: bool = False, timeout: float | None = 30.0) -> Slot:
        """A free slot, waiting for completions while none is free: DeviceTimeoutError
        (a TimeoutError) when none is free after `timeout` s (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slot = self.try_acquire(large)
            if slot is not None:
                return slot
            self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                raise DeviceTimeoutError(
                    f"{self.transport.name}: no request buffer became free within {timeout} s "
                    f"(all {'large' if large else 'small'} ones wait for the device's replies)")

    # -- lending to native pumps ------------------------------------------------------
    def hand_over_request_queues(self) -> list[Virtqueue]:
        """The request queues, for native pumps that own them from now on: this
        object then harvests only hiprio and the notification queue. The queues must
        be idle: a pump knows nothing of chains put on them before."""
        busy = [qs.vq.index for qs in self.request_queues if qs.vq.in_flight or qs.pending]
        if busy:
            raise DeviceError(f"{self.transport.name}: request queue(s) {busy} still have "
                              "requests in flight: they cannot be handed to pumps")
        self.pumped = True
        self._harvest = self._hiprio_here()
        return [qs.vq for qs in self.request_queues]

    def take_back_request_queues(self) -> None:
        """The pumps have stopped: harvest the request queues here again (entries
        the pumps left in flight complete with no owner and are dropped)."""
        self.pumped = False
        self._harvest = [*self._hiprio_here(), *self.request_queues]

    def _hiprio_here(self) -> list[_QueueState]:
        # hiprio, unless the native sender owns it (for good: it has buffers on it)
        return [self.hiprio] if self.hiprio_sender is None and self.hiprio else []

    def hand_over_hiprio(self) -> HiprioSender | None:
        """The hiprio queue to a native sender, which owns it from now on (the pumps
        and the control thread send through it; this object stops harvesting it).
        None, and hiprio stays here, if it cannot be (chains of ours still in
        flight, no DMA memory for its buffers)."""
        if self.hiprio_sender is not None:
            return self.hiprio_sender
        assert self.hiprio is not None
        if not self.hiprio.vq.idle or self.hiprio.pending:
            return None
        try:
            sender = HiprioSender(self.hiprio.vq, self.transport.dma_pool(), self.transport)
        except (DmaError, OSError, ValueError) as exc:
            log.warning("hiprio stays with the control plane: %s", exc)
            return None
        self.hiprio_sender = sender
        self._harvest = [qs for qs in self._harvest if qs is not self.hiprio]
        return sender

    def send_hiprio(self, data: bytes) -> None:
        """Send a whole hiprio request (FORGET, BATCH_FORGET, INTERRUPT; no reply),
        through the native sender once it owns hiprio, else in slots; what finds no
        room waits in a backlog that process() retries."""
        try:
            self._send_hiprio(data)
        except RingError as exc:  # the sender broke (a bad used entry, a failed kick)
            self._break(exc)
            raise

    def _send_hiprio(self, data: bytes) -> None:
        sender = self.hiprio_sender
        if sender is None:
            self._queue_hiprio(split_hiprio(data, self.SLOT_SIZE_SMALL) or
                               self._unsendable(data))
            self._drain_hiprio()
            return
        if not self._hiprio_backlog:
            try:
                sender.send(data)
                sender.flush()
                return
            except HiprioFull:
                pass
            except ValueError:
                self._unsendable(data)
                return
        # behind what already waits, in pieces the sender takes one at a time
        self._queue_hiprio(split_hiprio(data, sender.limit))
        self._drain_hiprio()

    def _queue_hiprio(self, pieces: list[bytes]) -> None:
        """Into the backlog, up to HIPRIO_BACKLOG_MAX: a device that stops taking back
        its hiprio buffers must not grow it without end. What does not fit is
        dropped: a FORGET only leaves the device a reference it holds anyway, an
        INTERRUPT of a parked lock is answered by the relay after its grace."""
        room = self.HIPRIO_BACKLOG_MAX - len(self._hiprio_backlog)
        self._hiprio_backlog.extend(pieces[:max(room, 0)])
        dropped = len(pieces) - max(room, 0)
        if dropped > 0:
            if not self.stats["hiprio_dropped"]:
                log.warning("hiprio queue: the device has not taken back its buffers and "
                            "%d requests wait; dropping FORGET/INTERRUPT requests beyond "
                            "that (logged once)", self.HIPRIO_BACKLOG_MAX)
            self.stats["hiprio_dropped"] += dropped

    def _unsendable(self, data: bytes) -> list[bytes]:
        _len, opcode, unique = IN_HEADER_START.unpack_from(data, 0)
        log.warning("hiprio request %d (opcode %d) of %d bytes dropped", unique, opcode,
                    len(data))
        return []

    @property
    def hiprio_retry(self) -> float:
        """Seconds until the backlog is worth another try: 1 ms after a try that sent
        something, doubling up to HIPRIO_RETRY_MAX after tries that sent nothing (a
        device that stalls its hiprio queue must not keep the control thread busy)."""
        return self._hiprio_retry

    @property
    def hiprio_backlog(self) -> int:
        """hiprio requests waiting for room."""
        return len(self._hiprio_backlog)

    def _drain_hiprio(self) -> None:
        backlog = self._hiprio_backlog
        sender = self.hiprio_sender
        if sender is None:
            while backlog:
                slot = self.try_acquire(False)
                if slot is None:
                    return  # hiprio completions free slots; process() comes back
                data = backlog.popleft()
                slot.view[: len(data)] = data
                try:
                    self.submit(slot, len(data), None)
                except ValueError as exc:
                    self.release(slot)
                    log.warning("hiprio request not forwarded: %s", exc)
            return
        sent = False
        try:
            while backlog:
                sender.send(backlog[0])
                backlog.popleft()
                sent = True
        except HiprioFull:
            pass
        if sent:
            sender.flush()

    def lend_slots(self, small: int, large: int) -> list[Slot]:
        """Take free slots out of the pool (for a pump) until return_slots()."""
        return self.slots.lend(small, large)

    def return_slots(self, slots: list[Slot]) -> None:
        self.slots.give_back(slots)

    @property
    def free_slots(self) -> tuple[int, int]:
        return self.slots.free

    def release(self, slot: Slot) -> None:
        self.slots.release(slot)

    def submit(self, slot: Slot, in_len: int, on_done: OnDone | None, req_off: int = 0,
               publish: bool = True) -> None:
        """Send the request already written at slot.view[req_off:req_off + in_len]. Its
        fuse_in_header gives the opcode and unique; the reply room is sized from the
        opcode and placed by the core's layout rule (vfsdrv.fs.sizing). With
        publish=False it is added but the device sees it only at publish()."""
        self._check_usable()
        if in_len < IN_HEADER_SIZE or req_off < 0 or req_off + in_len > len(slot.view):
            raise ValueError(f"request length {in_len} out of range")
        hdr_len, opcode, unique = IN_HEADER_START.unpack_from(slot.view, req_off)
        if hdr_len != in_len:
            raise ValueError(f"fuse_in_header.len {hdr_len} != request length {in_len}")
        if unique in self._in_flight or unique in self.locks:
            raise ValueError(f"unique {unique} is already in flight")
        cap = reply_capacity(
            opcode, slot.view[req_off + IN_HEADER_SIZE : req_off + in_len], self.max_io)
        slot.unique, slot.opcode, slot.in_len, slot.reply_cap = unique, opcode, in_len, cap
        slot.req_off = req_off
        slot.on_done = on_done
        buf = slot.buf
        if cap is None:
            if self.hiprio_sender is not None:  # hiprio is the native sender's now
                data = bytes(slot.view[req_off : req_off + in_len])
                self.release(slot)
                self.send_hiprio(data)
                return
            readable = buf.segments(req_off, in_len)
            writable: list[tuple[int, int]] = []
            qs = self.hiprio
        else:
            reply_off = reply_offset(req_off, in_len)
            if reply_off + OUT_HEADER_SIZE + cap > len(slot.view):
                raise ValueError(f"reply room of {cap} bytes does not fit a slot")
            slot.reply_off = reply_off
            if buf.contiguous:  # the usual case: one segment each, no translation
                readable = [(buf.addr + req_off, in_len)]
                writable = [(buf.addr + reply_off, OUT_HEADER_SIZE + cap)]
            else:
                readable = buf.segments(req_off, in_len)
                writable = buf.segments(reply_off, OUT_HEADER_SIZE + cap)
            if self.pumped:
                raise ValueError("the request queues belong to the native pumps")
            qs = self._pick_request_queue()
        self._in_flight[unique] = slot
        self._enqueue(qs, (readable, writable, slot), publish)

    def _pick_request_queue(self) -> _QueueState:
        qs = self.request_queues
        if len(qs) == 1:
            return qs[0]
        self._rr = (self._rr + 1) % len(qs)
        best = max(range(len(qs)), key=lambda i: (qs[i].vq.num_free, i == self._rr))
        return qs[best]

    def _enqueue(self, qs: _QueueState, item, publish: bool = True) -> None:
        if qs.pending:
            qs.pending.append(item)  # keep order behind waiting requests
            return
        try:
            qs.vq.add(*item)
        except QueueFull:
            qs.pending.append(item)
            self.stats["queue_full"] += 1
            return
        if publish:
            self.dev.kick(qs.vq)
        else:
            self.defer_publish(qs)

    def defer_publish(self, qs: _QueueState) -> None:
        if qs not in self._unpublished:
            self._unpublished.append(qs)

    def publish(self) -> None:
        """Make every chain added with publish=False visible: one publish and at most
        one kick per queue."""
        while self._unpublished:
            self.dev.kick(self._unpublished.pop().vq)

    def _drain_pending(self, qs: _QueueState) -> None:
        added = False
        while qs.pending:
            try:
                qs.vq.add(*qs.pending[0])
            except QueueFull:
                break
            qs.pending.popleft()
            added = True
        if added:
            self.dev.kick(qs.vq)

    # -- completion ---------------------------------------------------------------
    def process(self) -> int:
        """Harvest every used ring; run completions. Returns how many were handled."""
        self._check_usable()
        if self._status_every is not None and time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + self._status_every
            self._check_needs_reset()
            self._check_usable()
        handled = 0
        try:
            if self.hiprio_sender is not None:
                self._check_hiprio_sender()
            if self._hiprio_backlog:
                waiting = len(self._hiprio_backlog)
                self._drain_hiprio()
                self._hiprio_retry = self.HIPRIO_RETRY_MIN \
                    if len(self._hiprio_backlog) < waiting else \
                    min(2 * self._hiprio_retry, self.HIPRIO_RETRY_MAX)
            if self.notify_vq is not None and self.notify_vq.has_used():
                handled += self._process_notifications()
            for qs in self._harvest:
                vq = qs.vq
                if vq.idle and not vq.has_used():
                    continue
                while True:
                    if self.batch is not None:  # it completes its own chains
                        used, n = self.batch.harvest(vq)
                        handled += n
                    else:
                        used = vq.get_used()
                        handled += len(used)
                    for slot, length in used:
                        if slot is not None:  # None: left by a pump that has stopped
                            self._complete(slot, length)
                    if self.poll or not vq.enable_interrupts():
                        break
                if qs.pending:
                    self._drain_pending(qs)
        except RingError as exc:
            self._break(exc)
            raise
        return handled

    def _check_hiprio_sender(self) -> None:
        # reclaim what the device used: a bad used entry raises RingError (process()
        # breaks the device with it), as does a sender a pump's send or flush broke
        assert self.hiprio_sender is not None
        self.hiprio_sender.reclaim()

    def _complete(self, slot: Slot, length: int) -> None:
        self._in_flight.pop(slot.unique, None)
        if slot.reply_cap is None:  # hiprio: no reply expected
            self.release(slot)
            return
        on_done = slot.on_done
        comp = self._check_reply(slot, length)
        self.stats["replies"] += 1
        if comp.error == FUSE_LOCK_WAIT:
            self.park_lock(slot.unique, slot.opcode, on_done)
            self.release(slot)
            return
        try:
            if on_done is not None:
                on_done(comp)
        finally:
            self.release(slot)

    def _check_reply(self, slot: Slot, length: int) -> Completion:
        """Validate the device's reply (the core's rule, the same the pump applies);
        a bad one completes the request with EIO. The header is judged and returned
        as a copy taken out of DMA memory: the device cannot change it afterwards."""
        off = slot.reply_off
        hdr = self._reply_hdr
        rc = lib.vfsdrv_check_reply(
            slot.buf.address_of() + off, length, slot.unique, slot.opcode,
            slot.reply_cap, int(self._may_wait(slot.opcode)), hdr, self._why, 120,
        )
        if rc != 0:
            self.stats["bad_reply"] += 1
            self.last_bad_reply = ffi.string(self._why).decode(errors="replace")
            log.warning("device sent a bad reply (%s): %s", abi.opcode_name(slot.opcode),
                        self.last_bad_reply)
            return synthetic(slot.unique, slot.opcode, -errno.EIO)
        # error and length come from the copy; the payload is read where it lies
        return Completion(hdr.unique, slot.opcode, hdr.error, slot.view[off : off + hdr.len])

    def _may_wait(self, opcode: int) -> bool:
        return opcode == Opcode.SETLKW and self.notification

    # -- blocking locks and notifications (vfsdrv.fs.notify) ----------------------------
    def park_lock(self, unique: int, opcode: int, on_done: OnDone | None) -> None:
        """A SETLKW the device answered "wait": `on_done` gets the final reply when
        its FUSE_NOTIFY_LOCK arrives (or at once, if it already has)."""
        self.locks.park(unique, opcode, on_done)

    def is_lock_waiter(self, unique: int) -> bool:
        return unique in self.locks

    def abandon_lock(self, unique: int, error: int) -> bool:
        """Answer a parked SETLKW with `error` now, without the device."""
        return self.locks.abandon(unique, error)

    @property
    def lock_waiters(self) -> int:
        return len(self.locks)

    def _setlkw_on_its_way(self, unique: int) -> bool:
        """Whether a SETLKW with this unique is still in flight (its "wait" reply
        not yet seen): here, or in the relay's native pumps."""
        slot = self._in_flight.get(unique)
        if slot is not None and slot.opcode == Opcode.SETLKW:
            return True
        return self.pending_setlkw is not None and self.pending_setlkw(unique)

    def _process_notifications(self) -> int:
        assert self.notifications is not None
        n = self.notifications.process(self.poll)
        self.dev.kick(self.notifications.vq)
        return n

    # -- waiting --------------------------------------------------------------------------
    def wait(self, timeout: float | None) -> int:
        """Block until something completes (or `timeout`), then process it."""
        self._check_usable()
        if self.poll:
            return self._poll_wait(timeout)
        assert self._poller is not None
        if self.max_wait is not None:
            timeout = self.max_wait if timeout is None else min(timeout, self.max_wait)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        for fd, _events in self._poller.poll(ms):
            self.on_fd_ready(fd)
        return self.process()

    def _poll_wait(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        while True:
            n = self.process()
            if n:
                return n
            spins += 1
            if spins % 1024 == 0:
                self._device_gone_check()
                time.sleep(0)
            if deadline is not None and time.monotonic() >= deadline:
                return 0

    def _device_gone_check(self) -> None:
        try:
            self.transport.check_alive()
        except DeviceGoneError as exc:
            self._break(exc)
            raise

    def fds(self) -> list[int]:
        """File descriptors a frontend's event loop should wait on, then call process()."""
        return list(self._fd_queue)

    def control_fds(self) -> list[int]:
        """fds() without the request queues' interrupts (those belong to the pumps:
        reading one here would swallow a pump's wake-up)."""
        request = {qs.vq.index for qs in self.request_queues}
        return [fd for fd, index in self._fd_queue.items() if index not in request]

    def on_fd_ready(self, fd: int) -> None:
        index = self._fd_queue.get(fd)
        if index == ERROR_FD:
            self._device_gone_check()
        elif index == CONFIG_FD:
            self._config_changed(fd)
        elif index is not None:
            self.transport.ack_interrupt(index)

    def _config_changed(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self._check_needs_reset()

    def _check_needs_reset(self) -> None:
        if self.dev.needs_reset():
            # nothing in flight will complete: tell every waiter now
            self._break(DeviceNeedsResetError(
                f"{self.transport.name}: the device set DEVICE_NEEDS_RESET; unmount, "
                "then mount again (the session cannot be resumed)"
            ))

    # -- synchronous calls (used by the client API and by INIT) ------------------------
    def call(
        self, opcode: int, nodeid: int, *parts: bytes | memoryview, timeout: float | None = 60.0,
        uid: int = 0, gid: int = 0, pid: int = 0,
    ) -> bytes:
        """Send one request and wait for its reply payload; OSError on a FUSE error."""
        start = time.monotonic()
        pending = self.call_async(opcode, nodeid, *parts, uid=uid, gid=gid, pid=pid,
                                  timeout=timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        return pending.result(left)

    def call_async(
        self, opcode: int, nodeid: int, *parts: bytes | memoryview,
        uid: int = 0, gid: int = 0, pid: int = 0, unique: int | None = None,
        publish: bool = True, timeout: float | None = 30.0,
    ) -> Pending:
        """Send one request; its Pending. `timeout`: how long to wait for a free request
        buffer (DeviceTimeoutError then)."""
        self._check_usable()  # closed or broken: say so, before touching a slot
        body_len = sum(len(p) for p in parts)
        in_len = IN_HEADER_SIZE + body_len
        req_off = request_offset(opcode)
        large = self.needs_large(opcode, in_len)
        if req_off + in_len > (self.slot_size_large if large else self.SLOT_SIZE_SMALL):
            raise ValueError(f"a {in_len}-byte request does not fit a request buffer")
        slot = self.acquire(large, timeout)
        if unique is None:
            unique = self.next_unique()
        pending = Pending(self, unique, opcode)
        try:
            view = slot.view
            try:
                IN_HEADER.pack_into(view, req_off, in_len, opcode, unique, nodeid, uid, gid,
                                    pid, 0, 0)
            except struct.error as exc:
                raise ValueError(f"a fuse_in_header field is out of range: {exc}") from None
            pos = req_off + IN_HEADER_SIZE
            for p in parts:
                view[pos : pos + len(p)] = p
                pos += len(p)
            self.submit(slot, in_len, pending._done, req_off, publish)
        except BaseException as exc:
            if self._in_flight.get(unique) is not slot:
                self.release(slot)  # never reached the ring: the slot is free again
            elif not isinstance(exc, VfsdrvError):
                # stopped (Ctrl-C) between adding the chain and the kick: the device
                # may own the slot, and may never be told of the chain
                self._break(DeviceError(
                    f"{self.transport.name}: interrupted while sending a request "
                    f"({type(exc).__name__}); the queue's state is unknown: close and "
                    "start again"))
            raise
        if slot.reply_cap is None:
            pending.completion = 0  # no reply on hiprio: done once queued
        return pending

    # -- failure and teardown ----------------------------------------------------------
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if not self.started:
            raise DeviceError(f"{self.transport.name}: not started: call start() first")

    def _break(self, exc: VfsdrvError) -> None:
        """The device is unusable: fail every request waiting on it."""
        if self._broken is not None:
            return
        self._broken = exc
        if not isinstance(exc, DeviceGoneError):
            self.dev.fail()
        waiting = list(self._in_flight.values())
        self._in_flight.clear()
        if self.batch is not None:
            self.batch.fail_all(-errno.ENOTCONN)
        for slot in waiting:
            if slot.on_done is not None and slot.reply_cap is not None:
                slot.on_done(synthetic(slot.unique, slot.opcode, -errno.ENOTCONN))
        self.locks.fail_all(-errno.ENOTCONN)

    def on_no_reply(self, pending: Pending) -> None:
        """A caller's wait for `pending` ran out (Pending.result raises TimeoutError
        next). Nothing here; a subclass may judge the device (vfsdrv check does)."""

    def give_up(self, exc: VfsdrvError) -> None:
        """A frontend judged the device dead (-o request_timeout): every request
        waiting on it fails with ENOTCONN, as after a broken ring."""
        self._break(exc)

    @property
    def broken(self) -> VfsdrvError | None:
        return self._broken

    def close(self) -> None:
        """Reset the device and release everything (no FUSE_DESTROY: the caller decides).
        Closed means closed: any later call raises instead of touching freed memory."""
        if self._broken is None:
            self._broken = DeviceError(f"{self.transport.name}: the device was closed")
        self.dev.close()
        if self.hiprio_sender is not None:  # after the reset: no buffer of it is read now
            self.hiprio_sender.close()
            self.hiprio_sender = None


class Pending:
    """A request in flight for the synchronous/client API."""

    __slots__ = ("fs", "unique", "opcode", "completion", "data")

    def __init__(self, fs: VirtioFs, unique: int, opcode: int) -> None:
        self.fs = fs
        self.unique = unique
        self.opcode = opcode
        self.completion: int | None = None  # the reply's error (0 or -errno) once done
        self.data = b""

    def _done(self, comp: Completion) -> None:
        # copy out of DMA memory: the slot is reused as soon as we return
        self.data = bytes(memoryview(comp.reply)[OUT_HEADER_SIZE:])
        self.completion = comp.error

    @property
    def done(self) -> bool:
        return self.completion is not None

    def result(self, timeout: float | None = 60.0) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.completion is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.fs.on_no_reply(self)
                raise TimeoutError(
                    f"{self.fs.transport.name}: no reply to {abi.opcode_name(self.opcode)} "
                    f"(unique {self.unique}) within {timeout:.3g} s"
                )
            try:
                self.fs.wait(remaining if remaining is None else min(remaining, 0.5))
            except VfsdrvError:
                if self.completion is None:
                    raise
        err = self.completion
        if err == -errno.ENOTCONN and self.fs.broken is not None:
            raise self.fs.broken  # the device failed: say why, not just ENOTCONN
        if err < 0:
            raise OSError(-err, f"{os.strerror(-err)} ({abi.opcode_name(self.opcode)})")
        return self.data
