"""One frontend connection: the vhost-user backend protocol, its virtqueues and its
FUSE session, all driven by one thread.

The thread waits (select) on the socket, on every queue's kick eventfd and on a
wake eventfd that other threads write when they hand this session a lock
notification. Requests are served inline: none of them blocks (a SETLKW that must
wait is parked in the lock table), so the hiprio queue is never held up by a
request queue for longer than one request (virtio 1.2 5.11.6.2: "MUST NOT pause
processing of the hiprio queue due to activity on a normal request queue").

Queue layout: 0 hiprio; with VIRTIO_FS_F_NOTIFICATION negotiated 1 is the
notification queue and requests start at 2; without it requests start at 1 (what
every driver and device does, although the spec text numbers them from 2).
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeviceGoneError, TransportError, VfsdrvError
from ..fs import abi
from ..virtio import vhost_user_proto as vu
from ..virtio.vhost_user_proto import ProtocolFeature, Request
from .audit import (
    PROBE_REFUSE_FEATURES_OK,
    PROBE_UNKNOWN_FEATURE,
    UNKNOWN_FEATURE,
    Auditor,
    QueueAudit,
    SessionAudit,
)
from .device_queue import Chain, DeviceQueue
from .fuse_server import FuseServer
from .guest_memory import GuestMemory
from .lock_table import LockTable

log = logging.getLogger(__name__)

VIRTIO_FS_F_NOTIFICATION = 1 << 0
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_RING_PACKED = 1 << 34
VIRTIO_F_IN_ORDER = 1 << 35  # every queue is served in order (batched with packed rings)
#: `ring` choices: None offers packed (the driver picks), "split" does not offer it,
#: "packed" offers it and refuses a feature set without it
RING_LAYOUTS = ("split", "packed")

PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
#: device status bits the session acts on (only with the STATUS protocol feature)
STATUS_FEATURES_OK = 8
STATUS_DRIVER_OK = 4
#: auditing mode: seconds between the checks for lost kicks
AUDIT_TICK = 0.2
LOCK_NOTIFY_LEN = abi.OUT_HEADER_SIZE + abi.sizeof("fuse_notify_lock_out")
#: request queues the reference device offers at most
MAX_REQUEST_QUEUES = 64


@dataclass(frozen=True)
class DeviceConfig:
    source: str
    tag: str = "refdev"
    request_queues: int = 1
    notify_buf_size: int = 64
    notification: bool = True
    notify_lock_code: int = abi.DEFAULT_NOTIFY_LOCK_CODE
    ring: str | None = None

    def __post_init__(self) -> None:
        if self.ring not in (None, *RING_LAYOUTS):
            raise ValueError(f"ring must be one of {', '.join(RING_LAYOUTS)}")
        if not 1 <= self.request_queues <= MAX_REQUEST_QUEUES:  # "MUST set ... to 1 or greater"
            raise ValueError(f"request_queues must be 1..{MAX_REQUEST_QUEUES}")
        if len(self.tag.encode()) > 36 or not self.tag:
            raise ValueError("the tag must be 1..36 bytes of UTF-8")
        if self.notify_buf_size < LOCK_NOTIFY_LEN:
            # "MUST set notify_buf_size to be large enough to hold any of the FUSE
            # notify messages that this device emits"
            raise ValueError(f"notify_buf_size must be at least {LOCK_NOTIFY_LEN}")

    @property
    def features(self) -> int:
        return (
            VIRTIO_F_VERSION_1
            | vu.VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | (VIRTIO_F_RING_PACKED if self.ring != "split" else 0)
            | VIRTIO_F_IN_ORDER
            | (VIRTIO_FS_F_NOTIFICATION if self.notification else 0)
        )

    @property
    def max_queues(self) -> int:
        return 1 + int(self.notification) + self.request_queues

    def config_space(self) -> bytes:
        """struct virtio_fs_config: the tag NUL-padded (not terminated when 36 bytes long)."""
        cfg = abi.new(
            "virtio_fs_config",
            num_request_queues=self.request_queues,
            notify_buf_size=self.notify_buf_size if self.notification else 0,
        )
        cfg.tag = list(self.tag.encode().ljust(36, b"\0"))
        return bytes(abi.ffi.buffer(cfg))


class Role(enum.Enum):
    HIPRIO = "hiprio"
    NOTIFY = "notification"
    REQUEST = "request"


class MessageError(VfsdrvError):
    """A frontend message was refused (NACKed when REPLY_ACK is negotiated)."""


class VhostUserSession:
    def __init__(
        self,
        sock: socket.socket,
        config: DeviceConfig,
        session_id: int,
        locks: LockTable,
        on_exit: Callable[[VhostUserSession], None] | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.sock = sock
        self.config = config
        self.id = session_id
        self.locks = locks
        self.on_exit = on_exit
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        # Auditing mode offers STATUS (SET_STATUS/GET_STATUS) to see every status write.
        self.offered_protocol = PROTOCOL_FEATURES | (
            ProtocolFeature.STATUS if auditor is not None else 0
        )
        self.status = 0
        self._msg_flags = 0
        self._last_tick = 0.0
        self.memory = GuestMemory.empty()
        self.queues = [DeviceQueue(i) for i in range(config.max_queues)]
        self.audit: SessionAudit | None = None
        #: feature bits offered (an auditing probe may add one the spec leaves undefined)
        self.offered = config.features
        if auditor is not None:
            # the auditor's ring checks read split rings; IN_ORDER is among the
            # features the auditing device does not offer (docs/audit.rst)
            self.offered &= ~(VIRTIO_F_RING_PACKED | VIRTIO_F_IN_ORDER)
            if PROBE_UNKNOWN_FEATURE in auditor.probes:
                self.offered |= UNKNOWN_FEATURE
            self.audit = SessionAudit(
                auditor, session_id, self.offered,
                config.notify_buf_size if config.notification else 0,
            )
            for q in self.queues:
                q.audit = QueueAudit(self.audit, q.index)
        self.server = FuseServer(config.source, session_id, locks)
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._pending_mutex = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_mutex = threading.Lock()  # the wake fd is written by other threads
        self._closed = False
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._handlers: dict[int, Callable[[bytes, list[int]], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: lambda payload, fds: None,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_QUEUE_NUM: lambda payload, fds: vu.U64.pack(config.max_queues),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }

    # -- thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"refdev-session-{self.id}")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Ask the session thread to end (from any thread) and wait for it."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def run(self) -> None:
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        try:
            while not self._stopping:
                events = self._selector.select(AUDIT_TICK if self.audit is not None else None)
                if self.audit is not None:
                    self._audit_tick()
                for key, _ in events:
                    if key.fileobj is self.sock:
                        self._serve_message()
                    elif key.fileobj == self._wake_fd:
                        _drain(self._wake_fd)
                        self._deliver_notifications()
                    else:
                        self._on_kick(key.data)
                    if self._stopping:
                        break
        except DeviceGoneError:
            log.info("session %d: frontend disconnected", self.id)
        except TransportError as exc:
            log.warning("session %d: closing the connection: %s", self.id, exc)
        except Exception:
            log.exception("session %d: internal error, closing the connection", self.id)
        finally:
            self._close()

    def _close(self) -> None:
        if self.audit is not None:
            self.audit.closed()
        # Locks go first: other frontends' waiters wake as soon as possible.
        self.server.close()
        self._selector.close()
        for q in self.queues:
            q.close()
        self.memory.close()
        self.sock.close()
        with self._wake_mutex:
            self._closed = True
            os.close(self._wake_fd)
        if self.on_exit is not None:
            self.on_exit(self)

    # -- roles --------------------------------------------------------------------------
    @property
    def notification(self) -> bool:
        return bool(self.features & VIRTIO_FS_F_NOTIFICATION)

    def role(self, index: int) -> Role:
        if index == 0:
            return Role.HIPRIO
        if self.notification and index == 1:
            return Role.NOTIFY
        return Role.REQUEST

    def _queue(self, index: int) -> DeviceQueue:
        usable = 1 + int(self.notification) + self.config.request_queues
        if not self.features_set:
            usable = self.config.max_queues
        if self.audit is not None:
            self.audit.queue_index(index, usable)
        if not 0 <= index < usable:
            raise MessageError(f"queue index {index} outside 0..{usable - 1}")
        return self.queues[index]

    # -- messages -----------------------------------------------------------------------
    def _serve_message(self) -> None:
        request, flags, payload, fds = vu.recv_message(self.sock)
        log.debug(
            "session %d: %s (%d bytes, %d fds)", self.id, _name(request), len(payload), len(fds)
        )
        handler = self._handlers.get(request)
        reply: bytes | None = None
        ok = True
        self._msg_flags = flags
        if request == Request.SET_CONFIG and self.audit is not None:
            self.audit.set_config(payload)
        try:
            if handler is None:
                raise MessageError(f"unsupported vhost-user request {request}")
            reply = handler(payload, fds)
        except (VfsdrvError, ValueError, OSError) as exc:
            ok = False
            log.warning("session %d: request %s refused: %s", self.id, _name(request), exc)
        finally:
            for fd in fds:  # handlers take the fds they keep out of the list
                os.close(fd)
        if request in vu.REPLY_REQUESTS:
            # a failed GET_* still gets its reply: empty (GET_CONFIG's error form) or 0
            if reply is None:
                reply = b"" if request == Request.GET_CONFIG else vu.U64.pack(0)
            vu.send_message(self.sock, request, reply, flags=vu.VERSION | vu.FLAG_REPLY)
        elif flags & vu.FLAG_NEED_REPLY and self.protocol_features & ProtocolFeature.REPLY_ACK:
            vu.send_message(
                self.sock, request, vu.U64.pack(0 if ok else 1), flags=vu.VERSION | vu.FLAG_REPLY
            )

    @staticmethod
    def _u64(payload: bytes) -> int:
        if len(payload) < vu.U64.size:
            raise MessageError("payload shorter than a u64")
        return vu.U64.unpack_from(payload)[0]

    @staticmethod
    def _state(payload: bytes) -> tuple[int, int]:
        if len(payload) < vu.VRING_STATE.size:
            raise MessageError("payload shorter than a vring state")
        return vu.VRING_STATE.unpack_from(payload)

    def _get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.U64.pack(self.offered)

    def _set_features(self, payload: bytes, fds: list[int]) -> None:
        features = self._u64(payload)
        if self.audit is not None:
            self.audit.set_features(features)
        if features & ~self.offered:
            raise MessageError(f"features {features:#x} include some never offered")
        if any(q.started for q in self.queues):
            raise MessageError("SET_FEATURES while queues run")
        if self.config.ring == "packed" and not features & VIRTIO_F_RING_PACKED:
            raise MessageError("this device runs packed virtqueues only (--ring packed)")
        self.features = features
        self.features_set = True
        for q in self.queues:
            q.event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
            q.indirect = bool(features & VIRTIO_RING_F_INDIRECT_DESC)
            q.packed = bool(features & VIRTIO_F_RING_PACKED)
            q.in_order = bool(features & VIRTIO_F_IN_ORDER)
        notify = self._post_lock_notification if self.notification else None
        self.server.notify_lock = notify
        for q in self.queues:
            if q.audit is not None:
                q.audit.role = self.role(q.index).value

    def _get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.U64.pack(self.offered_protocol)

    def _set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        features = self._u64(payload)
        if features & ~self.offered_protocol:
            raise MessageError(f"protocol features {features:#x} include some never offered")
        self.protocol_features = features
        if self.audit is not None:
            self.audit.status_negotiated = self.status_negotiated
            self.audit.config_negotiated = bool(features & ProtocolFeature.CONFIG)

    # -- device status (STATUS protocol feature, auditing mode) --------------------------
    @property
    def status_negotiated(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.STATUS)

    @property
    def live(self) -> bool:
        """May the device consume buffers? With STATUS only after DRIVER_OK (without it
        there is no status: the ring enable stands for it)."""
        return not self.status_negotiated or bool(self.status & STATUS_DRIVER_OK)

    def _set_status(self, payload: bytes, fds: list[int]) -> None:
        if not self.status_negotiated:
            raise MessageError("SET_STATUS without the STATUS protocol feature")
        value = self._u64(payload) & 0xFF
        old = self.status
        starting = bool(value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK)
        if self.audit is not None:
            if starting:
                kicked = [q.index for q in self.queues if q.kick_fd is not None
                          and _readable(q.kick_fd)]
                acked = bool(self._msg_flags & vu.FLAG_NEED_REPLY
                             and self.protocol_features & ProtocolFeature.REPLY_ACK)
                self.audit.kicks_at_driver_ok(kicked, acked)
        requested = value
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK and (
            not self.features_set
            or self.audit is not None and PROBE_REFUSE_FEATURES_OK in self.audit.a.probes
        ):
            value &= ~STATUS_FEATURES_OK  # no (acceptable) feature set
        if self.audit is not None:
            self.audit.set_status(requested, value)
        if value == 0:  # reset: the rings stop
            for q in self.queues:
                self._stop_queue(q)
            self.status = 0
            return
        self.status = value
        if starting:
            self._check_notify_buffers_at_driver_ok()
            for q in self.queues:
                self._run_queue(q)
            if self.audit is not None:
                self.audit.driver_ok_done()

    def _get_status(self, payload: bytes, fds: list[int]) -> bytes:
        if not self.status_negotiated:
            raise MessageError("GET_STATUS without the STATUS protocol feature")
        if self.audit is not None:
            self.audit.status_read()
        return vu.U64.pack(self.status)

    def _check_notify_buffers_at_driver_ok(self) -> None:
        if self.audit is None or not self.notification:
            return
        q = self.queues[1]
        available = 0
        if q.started and not q.broken:
            try:
                available = q.pending()
            except VfsdrvError:
                return  # reported by the ring checks
        self.audit.a.check(
            "64", available > 0,
            f"session {self.id}: no notification buffer available when DRIVER_OK was set",
        )

    def _reset_owner(self, payload: bytes, fds: list[int]) -> None:
        for q in self.queues:
            self._stop_queue(q)

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        taken = list(fds)
        fds.clear()
        memory = GuestMemory.from_message(payload, taken)
        old, self.memory = self.memory, memory
        for q in self.queues:
            if q.started:
                q.stop()
                q.start(self._ring_memory())  # ring addresses re-resolved in the new table
        old.close()

    def _ring_memory(self) -> GuestMemory:
        """Where ring and buffer addresses are looked up (refdev/iotlb.py: the IOTLB)."""
        return self.memory

    def _set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._state(payload)
        if self.audit is not None:
            self.audit.vring_num(index, num)
        self._queue(index).set_size(num)

    def _set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        if len(payload) < vu.VRING_ADDR.size:
            raise MessageError("SET_VRING_ADDR payload too short")
        index, _flags, desc, used, avail, _log = vu.VRING_ADDR.unpack_from(payload)
        q = self._queue(index)
        if q.audit is not None:
            q.audit.set_addresses(q, desc, used, avail, self.memory.user_to_gpa)
        q.set_addresses(desc, used, avail)

    def _set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, base = self._state(payload)
        self._queue(index).set_base(base)

    def _get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        index, _ = self._state(payload)
        q = self._queue(index)
        base = q.last_avail
        self._stop_queue(q)
        return vu.VRING_STATE.pack(index, base)

    def _stop_queue(self, q: DeviceQueue) -> None:
        if q.kick_fd is not None:
            self._selector.unregister(q.kick_fd)
            q.set_kick(None)
        q.stop()
        q.enabled = False

    def _vring_fd(self, payload: bytes, fds: list[int]) -> tuple[DeviceQueue, int | None]:
        value = self._u64(payload)
        q = self._queue(value & vu.VRING_IDX_MASK)
        if value & vu.VRING_NOFD_MASK:
            return q, None
        if not fds:
            raise MessageError("vring fd message without a file descriptor")
        return q, fds.pop(0)

    def _set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        q, fd = self._vring_fd(payload, fds)
        if self.audit is not None:
            self.audit.setup_step(f"SET_VRING_KICK({q.index})")
        if fd is None:
            raise MessageError("polled queues (no kick fd) are not supported")
        if q.kick_fd is not None:
            self._selector.unregister(q.kick_fd)
        q.set_kick(fd)
        self._selector.register(fd, selectors.EVENT_READ, q)
        if not q.started:
            q.start(self._ring_memory())  # as libvhost-user: the kick fd starts the ring
            if not self.protocol_features_acked:
                q.enabled = True  # without PROTOCOL_FEATURES rings start enabled
        self._run_queue(q)

    @property
    def protocol_features_acked(self) -> bool:
        return bool(self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        q, fd = self._vring_fd(payload, fds)
        q.set_call(fd)

    def _set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        _q, fd = self._vring_fd(payload, fds)
        if fd is not None:
            os.close(fd)  # the device never reports queue errors this way

    def _set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._state(payload)
        if num not in (0, 1):
            raise MessageError(f"SET_VRING_ENABLE with {num}")
        q = self._queue(index)
        if self.audit is not None:
            self.audit.vring_enable(q, num)
        q.enabled = bool(num)
        self._run_queue(q)

    def _get_config(self, payload: bytes, fds: list[int]) -> bytes:
        if len(payload) < vu.CONFIG_HEAD.size:
            raise MessageError("GET_CONFIG payload too short")
        offset, size, flags = vu.CONFIG_HEAD.unpack_from(payload)
        if self.audit is not None:
            self.audit.get_config(offset, size)
        space = self.config.config_space()
        if size != len(payload) - vu.CONFIG_HEAD.size or offset + size > len(space):
            raise MessageError(f"GET_CONFIG of {offset}+{size} outside {len(space)} bytes")
        return vu.CONFIG_HEAD.pack(offset, size, flags) + space[offset : offset + size]

    # -- queues -------------------------------------------------------------------------
    def _on_kick(self, q: DeviceQueue) -> None:
        q.drain_kick()
        if self.audit is not None and q.kick_fd is not None:  # not stopped in this batch
            reply_ack = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
            self.audit.kick(q.index, self.sock, reply_ack)
            if q.audit is not None and q.started:
                q.audit.kicked(q)
            if q.audit is not None and q.started:
                q.audit.scan(q)  # chains the device may not pop for a while (notifications)
        self._run_queue(q)

    def _audit_tick(self) -> None:
        """Queues the device asked to be kicked for whose avail idx moved without a
        kick (a lost notification)."""
        now = time.monotonic()
        if now - self._last_tick < AUDIT_TICK or not self.live:
            return
        self._last_tick = now
        for q in self.queues:
            if q.audit is not None and q.ready and q.kick_fd is not None:
                q.audit.tick(q, _readable(q.kick_fd), now)

    def _run_queue(self, q: DeviceQueue) -> None:
        if not q.ready or not self.live:
            return
        if self.role(q.index) is Role.NOTIFY:
            self._deliver_notifications()
            return
        hiprio = self.role(q.index) is Role.HIPRIO
        try:
            while True:
                while (chain := q.pop()) is not None:
                    self._serve_chain(q, chain, hiprio)
                if not q.arm_kick():
                    break
        except VfsdrvError as exc:
            # A driver that breaks the ring rules gets no more service on this
            # queue (libvhost-user's vu_panic); the device and other queues go on.
            log.error("session %d: queue %d broken: %s", self.id, q.index, exc)
            q.broken = True
        q.flush()  # in-order batches end here
        q.signal()

    def _serve_chain(self, q: DeviceQueue, chain: Chain, hiprio: bool) -> None:
        request = chain.read_all()
        if self.audit is not None:
            self.audit.request(self.role(q.index).value, request)
        if hiprio and not _is_hiprio_request(request):
            log.warning("session %d: normal request on the hiprio queue", self.id)
            reply = _error_reply(request, 22)  # EINVAL: "MUST not submit normal requests"
        else:
            reply = self.server.handle(request, chain.writable_len)
        written = 0
        if reply is not None:
            if len(reply) > chain.writable_len:
                log.warning(
                    "session %d: no room for a %d-byte reply (%d writable)",
                    self.id,
                    len(reply),
                    chain.writable_len,
                )
            else:
                written = chain.write(reply)
        q.push(chain, written)

    # -- notifications ------------------------------------------------------------------
    def _post_lock_notification(self, unique: int, error: int) -> None:
        """Called by the lock table, from any session's thread."""
        with self._pending_mutex:
            self._pending.append((unique, error))
        self._wake()

    def _wake(self) -> None:
        with self._wake_mutex:
            if not self._closed:
                os.eventfd_write(self._wake_fd, 1)

    def _deliver_notifications(self) -> None:
        """Send what is pending while the driver has notification buffers; the rest
        waits for the next kick of the notification queue (never dropped)."""
        if not self.notification:
            return
        q = self.queues[1]
        if not q.ready or not self.live:
            return
        try:
            while True:
                while self._pending:
                    chain = q.pop()
                    if self.audit is not None:
                        self.audit.a.check(
                            "64", chain is not None,
                            f"session {self.id}: a notification to deliver and no buffer",
                        )
                    if chain is None:
                        break
                    if chain.readable or chain.writable_len < self.config.notify_buf_size:
                        # driver bug ("MUST provide buffers of at least notify_buf_size
                        # bytes"): hand the buffer back unused (len 0), keep the message
                        log.error(
                            "session %d: notification buffer %d of %d writable bytes "
                            "(%d readable) refused; notify_buf_size is %d",
                            self.id,
                            chain.head,
                            chain.writable_len,
                            chain.readable_len,
                            self.config.notify_buf_size,
                        )
                        q.push(chain, 0)
                        continue
                    with self._pending_mutex:
                        unique, error = self._pending.popleft()
                    q.push(chain, chain.write(self._lock_message(unique, error)))
                if not self._pending or not q.arm_kick():
                    break
        except VfsdrvError as exc:
            log.error("session %d: notification queue broken: %s", self.id, exc)
            q.broken = True
        q.flush()  # in-order batches end here
        q.signal()

    def _lock_message(self, unique: int, error: int) -> bytes:
        head = abi.pack(
            "fuse_out_header", len=LOCK_NOTIFY_LEN, error=self.config.notify_lock_code, unique=0
        )
        return head + abi.pack("fuse_notify_lock_out", unique=unique, error=error)


def _is_hiprio_request(request: bytes) -> bool:
    if len(request) < abi.IN_HEADER_SIZE:
        return True  # let the server reject it
    return abi.unpack("fuse_in_header", request).opcode in abi.HIPRIO_OPCODES


def _error_reply(request: bytes, err: int) -> bytes:
    unique = abi.unpack("fuse_in_header", request).unique
    return abi.pack("fuse_out_header", len=abi.OUT_HEADER_SIZE, error=-err, unique=unique)


def _readable(fd: int) -> bool:
    """An eventfd with a non-zero counter (a kick not read yet)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return str(request)
