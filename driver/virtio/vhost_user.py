"""vhost-user transport: the driver plays the frontend (QEMU's role) toward a
vhost-user-fs backend (virtiofsd, or the project's reference device) on this host.

Guest memory is a memfd shared with the backend through SET_MEM_TABLE; its device
("guest-physical") addresses are offsets into the memfd and the frontend virtual
addresses announced for the rings are those of our own mapping. Kicks and calls are
eventfds. Device status is kept here (vhost-user has no status register unless
the STATUS protocol feature is offered); device config comes from GET_CONFIG when
the backend offers CONFIG, otherwise from what the caller says (virtiofsd 7.2 has no
config space: QEMU makes up tag and num_request_queues in its own device model).

VIRTIO_F_ACCESS_PLATFORM (a backend that offers it, such as `vfsdrv refdev
--access-platform`): the driver then works with I/O virtual addresses, the memfd
offset plus IOVA_BASE, so they differ from the guest-physical addresses of the
memory table; ring addresses in SET_VRING_ADDR are IOVAs too; and one
VHOST_USER_IOTLB_MSG UPDATE maps the whole memfd (IOVA_BASE -> our mapping, read-write)
before the first ring is set up. As QEMU requires, this needs the BACKEND_REQ and
REPLY_ACK protocol features: the backend reports IOTLB misses and access failures
on the backend channel (SET_BACKEND_REQ_FD), which is read and logged whenever the
device's liveness is checked; the whole memfd being mapped, a miss or failure means
the device went outside the driver's memory.

Every message has a deadline: `timeout` seconds for each reply (and for the backend
to take each message), and as much for the backend's share of the whole bring-up
(handshake to DRIVER_OK: a backend answering each message just in time cannot
stretch it to minutes), a shorter `teardown_timeout` for the whole of close(), and
reset(t) is bounded by t. A backend that misses one fails the transport with an
error naming the socket and the message; the connection is then out of step (a late
reply would be taken for the next message's), so every later message fails at once
(DeviceGoneError: the device cannot be reached any more).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .._native import ffi
from ..errors import DeviceGoneError, DeviceTimeoutError, FeatureNegotiationError, TransportError
from . import vhost_user_proto as vu
from .constants import Feature
from .memory import Arena, DmaError, DmaPool
from .packed_layout import INITIAL_BASE as INITIAL_PACKED_BASE
from .transport import QueueAddresses, Transport

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 64 << 20
#: seconds to wait for each reply: a silent backend fails `vfsdrv mount` well within 30 s
#: (connect, one message, teardown), yet a busy virtiofsd mapping memory has ample time
DEFAULT_TIMEOUT = 10.0
#: seconds for all of close(): stopping rings a stuck backend never stops must not
#: hold up the command that is already failing or finishing
DEFAULT_TEARDOWN_TIMEOUT = 2.0
#: virtiofsd (libvhost-user) accepts at most 1024 entries per ring
VHOST_USER_MAX_QUEUE_SIZE = 1024
WANTED_PROTOCOL = (
    vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG
    | vu.ProtocolFeature.STATUS
)
#: IOVA of memfd offset 0 with ACCESS_PLATFORM: far from every guest-physical address
#: of the memory table, so an address used untranslated is caught by the device
IOVA_BASE = 1 << 40
#: struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type;} padded to 32 bytes
IOTLB_MSG = struct.Struct("<QQQBB6x")
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
IOTLB_ACCESS_RW = 3
#: backend -> frontend request on the backend channel carrying a vhost_iotlb_msg
BACKEND_IOTLB_MSG = 1
#: IOTLB reports from the backend kept for inspection (VhostUserTransport.iotlb_events)
IOTLB_EVENTS_KEPT = 1024


def _exists_not_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class VhostUserTransport(Transport):
    def __init__(
        self,
        socket_path: str,
        *,
        memory_size: int = DEFAULT_MEMORY,
        config: bytes | None = None,
        num_queues: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        teardown_timeout: float = DEFAULT_TEARDOWN_TIMEOUT,
        connect_timeout: float | None = None,
    ) -> None:
        """`config`: device config bytes to present when the backend has none;
        `num_queues`: queue count to assume when the backend cannot tell (no MQ);
        `timeout`: seconds the backend has to answer each message;
        `teardown_timeout`: seconds close() may take in all;
        `connect_timeout`: seconds to keep trying to connect while nobody listens or
        the listener's backlog is full (default: `timeout`, at most 5)."""
        if timeout <= 0 or teardown_timeout <= 0:
            raise ValueError("vhost-user timeouts must be positive")
        self.name = f"vhost-user:{socket_path}"
        self.socket_path = socket_path
        self.timeout = float(timeout)
        self.teardown_timeout = float(teardown_timeout)
        #: an absolute time.monotonic() no message may wait past (reset, close)
        self._budget_end: float | None = None
        #: set once a message missed its deadline: the stream is out of step
        self._broken: str | None = None
        #: seconds of backend time left for the bring-up; None once started
        self._setup_left: float | None = self.timeout
        self._fallback_config = config
        self._fallback_num_queues = num_queues
        self._status = 0
        self._memory_sent = False
        self._started: set[int] = set()
        self._queues: dict[int, tuple[int, int]] = {}  # index -> (kick fd, call fd)
        self._sizes: dict[int, int] = {}
        self._packed = False  # VIRTIO_F_RING_PACKED accepted: rings start at wrap 1
        #: ACCESS_PLATFORM accepted: device addresses are IOVAs (memfd offset + this)
        self._iova_base = 0
        #: our end of the backend channel (SET_BACKEND_REQ_FD), for IOTLB events
        self._backend_channel: socket.socket | None = None
        #: (type, iova, perm) of the IOTLB messages the backend sent, the newest
        #: IOTLB_EVENTS_KEPT (a device may send them without end)
        self.iotlb_events: list[tuple[int, int, int]] = []
        self._closed = False
        self.sock = self._connect(
            socket_path, min(self.timeout, 5.0) if connect_timeout is None else connect_timeout
        )
        try:
            self._memfd = os.memfd_create("vfsdrv-guest-memory", os.MFD_CLOEXEC)
            os.ftruncate(self._memfd, memory_size)
            self._mm = mmap.mmap(self._memfd, memory_size, mmap.MAP_SHARED)
            view = memoryview(self._mm)
            pointer = ffi.cast("char *", ffi.from_buffer(view))
            self._va = int(ffi.cast("uintptr_t", pointer))
            # guest-physical address == offset in the memfd (IOVA: plus IOVA_BASE);
            # one region, contiguous
            self._arena = Arena(
                view, lambda off: (self._iova_base + off, memory_size - off), pointer)
            self._memory_size = memory_size
            self._handshake()
        except BaseException:
            self.close()
            raise

    # -- connection and handshake ------------------------------------------------
    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                # non-blocking: a listener whose backlog is full makes connect() fail
                # with EAGAIN (retried below) instead of waiting without limit
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(path)
                return sock
            except BlockingIOError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise DeviceTimeoutError(
                        f"vhost-user:{path}: the backend did not accept the connection within "
                        f"{_secs(timeout)} s (its listen backlog is full)"
                    ) from exc
                time.sleep(0.02)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if _exists_not_socket(path):  # a file, a directory: no use waiting
                    raise TransportError(f"{path} is not a socket (a vhost-user backend "
                                         "listens on a unix socket)") from exc
                if time.monotonic() >= deadline:
                    busy = (" and free (virtiofsd serves one driver at a time and does not "
                            "listen meanwhile)" if isinstance(exc, ConnectionRefusedError)
                            else "")
                    raise TransportError(
                        f"cannot connect to vhost-user socket {path}: {exc.strerror}; is the "
                        f"backend (virtiofsd, vfsdrv refdev) running and listening there{busy}?"
                    ) from exc
                time.sleep(0.02)
            except OSError as exc:
                sock.close()
                raise TransportError(f"cannot connect to vhost-user socket {path}: {exc}") from exc

    def _handshake(self) -> None:
        self._features = self._get_u64(vu.Request.GET_FEATURES)
        self.protocol_features = 0
        self.reply_ack = False
        self.backend_queue_num: int | None = None
        if self._features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            offered = self._get_u64(vu.Request.GET_PROTOCOL_FEATURES)
            wanted = WANTED_PROTOCOL
            if self._features & Feature.ACCESS_PLATFORM:
                wanted |= vu.ProtocolFeature.BACKEND_REQ  # for the IOTLB's messages
            self.protocol_features = offered & wanted
            self._send(vu.Request.SET_PROTOCOL_FEATURES, vu.U64.pack(self.protocol_features))
            self.reply_ack = bool(self.protocol_features & vu.ProtocolFeature.REPLY_ACK)
            if self.protocol_features & vu.ProtocolFeature.MQ:
                n = self._get_u64(vu.Request.GET_QUEUE_NUM)
                if not 1 <= n <= 0x10000:  # a queue index is 16 bits
                    raise TransportError(
                        f"{self.name}: the backend's GET_QUEUE_NUM answered {n} queues "
                        "(1 to 65536 can be)")
                self.backend_queue_num = n
            if self.protocol_features & vu.ProtocolFeature.BACKEND_REQ:
                ours, theirs = socket.socketpair(
                    socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    self._send(vu.Request.SET_BACKEND_REQ_FD, b"", (theirs.fileno(),))
                except BaseException:
                    ours.close()
                    raise
                finally:
                    theirs.close()
                ours.setblocking(False)
                self._backend_channel = ours
        self._send(vu.Request.SET_OWNER)
        log.debug(
            "%s: features %#x, protocol features %#x, queues %s", self.name, self._features,
            self.protocol_features, self.backend_queue_num,
        )

    # -- messages, each with its deadline -----------------------------------------------
    def _deadline(self, request: int) -> tuple[float, float, str]:
        """(absolute deadline, seconds allowed, why not `timeout`) for the next message."""
        if self._broken is not None:
            raise DeviceGoneError(f"{self._broken}; the connection is no longer usable")
        now = time.monotonic()
        allowed, why = self.timeout, ""
        if self._setup_left is not None and self._setup_left < allowed:
            allowed = self._setup_left
            why = f" (the bring-up may take {_secs(self.timeout)} s in all)"
            if allowed <= 0:
                raise DeviceTimeoutError(
                    f"{self.name}: the backend took more than {_secs(self.timeout)} s to answer "
                    f"the bring-up, {_request_name(request)} not sent"
                )
        end = now + allowed
        if self._budget_end is not None and self._budget_end < end:
            end, why = self._budget_end, ""
        return end, max(0.0, end - now), why

    def _charge(self, since: float) -> None:
        """Count backend time against the bring-up."""
        if self._setup_left is not None:
            self._setup_left -= time.monotonic() - since

    @contextmanager
    def _bounded(self, seconds: float) -> Iterator[None]:
        """Every message inside finishes within `seconds` from now, all together."""
        outer = self._budget_end
        end = time.monotonic() + seconds
        self._budget_end = end if outer is None else min(outer, end)
        try:
            yield
        finally:
            self._budget_end = outer

    def _missed(self, what: str, request: int, limit: tuple[float, float, str],
                exc: BaseException) -> None:
        _, allowed, why = limit
        self._broken = (
            f"{self.name}: {what} {_request_name(request)} within {_secs(allowed)} s{why}"
        )
        raise DeviceTimeoutError(self._broken) from exc

    def _post(self, request: int, payload: bytes, fds: tuple[int, ...], flags: int,
              limit: tuple[float, float, str]) -> None:
        try:
            vu.send_message(self.sock, request, payload, fds, flags, deadline=limit[0])
        except TimeoutError as exc:
            self._missed("the backend did not take", request, limit, exc)
        except DeviceGoneError as exc:
            raise DeviceGoneError(
                f"{self.name}: {exc} (sending {_request_name(request)})"
            ) from exc

    def _send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        """A message without a defined reply; with REPLY_ACK we ask for and check one."""
        ack = self.reply_ack
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if ack else 0)
        limit = self._deadline(request)
        start = time.monotonic()
        try:
            self._post(request, payload, fds, flags, limit)
            data = self._reply(request, limit) if ack else b""
        finally:
            self._charge(start)
        if ack:
            if len(data) != 8:
                raise TransportError(f"{self.name}: malformed ack to request {request}")
            status = vu.U64.unpack(data)[0]
            if status != 0:
                # a refused SET_FEATURES is the device not taking the features, as a
                # cleared FEATURES_OK is on PCI: the same error for both transports
                cls = FeatureNegotiationError if request == vu.Request.SET_FEATURES \
                    else TransportError
                raise cls(
                    f"{self.name}: backend refused {vu.Request(request).name} (status {status})"
                )

    def _call(self, request: int, payload: bytes = b"") -> bytes:
        limit = self._deadline(request)
        start = time.monotonic()
        try:
            self._post(request, payload, (), vu.VERSION, limit)
            return self._reply(request, limit)
        finally:
            self._charge(start)

    def _reply(self, request: int, limit: tuple[float, float, str]) -> bytes:
        try:
            rreq, rflags, data, fds = vu.recv_message(self.sock, limit[0])
        except TimeoutError as exc:
            self._missed("no reply to", request, limit, exc)
        except DeviceGoneError as exc:
            raise DeviceGoneError(
                f"{self.name}: {exc} (waiting for the reply to {_request_name(request)})"
            ) from exc
        except TransportError as exc:  # malformed: what follows cannot be trusted
            self._broken = f"{self.name}: {exc} (the reply to {_request_name(request)})"
            raise TransportError(self._broken) from exc
        for fd in fds:
            os.close(fd)
        if rreq != request or not rflags & vu.FLAG_REPLY:
            self._broken = (
                f"{self.name}: expected the reply to {_request_name(request)}, got "
                f"{_request_name(rreq)} with flags {rflags:#x}"
            )
            raise TransportError(self._broken)
        return data

    def _get_u64(self, request: int) -> int:
        data = self._call(request)
        if len(data) != 8:
            raise TransportError(f"{self.name}: reply to request {request} is {len(data)} bytes")
        return vu.U64.unpack(data)[0]

    # -- Transport: status and features -----------------------------------------
    @property
    def has_status(self) -> bool:
        """The backend keeps a device status (STATUS protocol feature)."""
        return bool(self.protocol_features & vu.ProtocolFeature.STATUS)

    def get_status(self) -> int:
        self.check_alive()
        if self.has_status:
            return self._get_u64(vu.Request.GET_STATUS) & 0xFF
        return self._status

    def set_status(self, status: int) -> None:
        self.check_alive()
        if self.has_status:
            self._send(vu.Request.SET_STATUS, vu.U64.pack(status))
        self._status = status

    def reset(self, timeout: float = 5.0) -> None:
        """Within `timeout` seconds in all (messages included), or TransportError."""
        # A fresh connection is a reset device; after start, stop the rings.
        with self._bounded(timeout):
            self._stop_rings(raise_errors=True)
            self._status = 0
            if self.has_status and not self._closed:
                self._send(vu.Request.SET_STATUS, vu.U64.pack(0))
                deadline = time.monotonic() + timeout
                while self.get_status() != 0:
                    if time.monotonic() > deadline:
                        raise TransportError(f"{self.name}: device status not 0 after reset")
                    time.sleep(0.001)

    def device_features(self) -> int:
        return self._features

    def transport_features(self, offered: int) -> int:
        """PROTOCOL_FEATURES, and ACCESS_PLATFORM when the backend channel that the
        IOTLB needs is up (QEMU's rule: BACKEND_REQ and REPLY_ACK)."""
        accept = vu.VHOST_USER_F_PROTOCOL_FEATURES
        if self._backend_channel is not None and self.reply_ack:
            accept |= Feature.ACCESS_PLATFORM
        return accept & offered

    def set_driver_features(self, features: int) -> None:
        base = IOVA_BASE if features & Feature.ACCESS_PLATFORM else 0
        if self._memory_sent and base != self._iova_base:
            # buffers already handed out carry addresses of the other mode
            raise TransportError(f"{self.name}: ACCESS_PLATFORM changed after the rings")
        self._send(vu.Request.SET_FEATURES, vu.U64.pack(features))
        self._packed = bool(features & Feature.RING_PACKED)
        self._iova_base = base

    @property
    def iova_mode(self) -> bool:
        """ACCESS_PLATFORM negotiated: descriptors and rings carry IOVAs."""
        return self._iova_base != 0

    # -- Transport: config ------------------------------------------------------
    def config_generation(self) -> int:
        return 0

    def read_config(self, offset: int, length: int) -> bytes:
        if self.protocol_features & vu.ProtocolFeature.CONFIG:
            payload = vu.CONFIG_HEAD.pack(offset, length, 0) + bytes(length)
            data = self._call(vu.Request.GET_CONFIG, payload)
            if len(data) != vu.CONFIG_HEAD.size + length:
                raise TransportError(
                    f"{self.name}: GET_CONFIG of {length} bytes at {offset} returned "
                    f"{len(data)} bytes"
                )
            return data[vu.CONFIG_HEAD.size :]
        if self._fallback_config is None:
            raise TransportError(
                f"{self.name}: the backend has no config space (no CONFIG protocol feature); "
                "give the tag and queue count as options"
            )
        data = self._fallback_config[offset : offset + length]
        return data + bytes(length - len(data))

    @property
    def has_config_space(self) -> bool:
        return bool(self.protocol_features & vu.ProtocolFeature.CONFIG)

    # -- Transport: queues ------------------------------------------------------
    def num_queues(self) -> int:
        if self.backend_queue_num is not None:
            return self.backend_queue_num
        return self._fallback_num_queues or 0

    def queue_max_size(self, index: int) -> int:
        n = self.num_queues()
        if n and index >= n:
            return 0
        return VHOST_USER_MAX_QUEUE_SIZE

    def _send_memory_table(self) -> None:
        region = vu.MEM_REGION.pack(0, self._memory_size, self._va, 0)
        self._send(vu.Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(1, 0) + region, (self._memfd,))
        self._memory_sent = True

    def _send_iotlb_update(self) -> None:
        """One mapping for the whole memfd: every buffer the driver hands out lies in it."""
        msg = IOTLB_MSG.pack(self._iova_base, self._memory_size, self._va, IOTLB_ACCESS_RW,
                             IOTLB_UPDATE)
        self._send(vu.Request.IOTLB_MSG, msg)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        if not self._memory_sent:
            self._send_memory_table()
            if self.iova_mode:
                self._send_iotlb_update()  # before any ring address needs it
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._queues[index] = (kick, call)
        self._sizes[index] = size
        self._send(vu.Request.SET_VRING_NUM, vu.VRING_STATE.pack(index, size))
        # ring addresses are frontend virtual addresses (translated via the region),
        # or with ACCESS_PLATFORM IOVAs (translated via the IOTLB): the device addresses
        va = 0 if self.iova_mode else self._va
        self._send(
            vu.Request.SET_VRING_ADDR,
            vu.VRING_ADDR.pack(index, 0, va + addrs.desc, va + addrs.used, va + addrs.avail, 0),
        )
        # packed: position 0, wrap counter 1 (bit 15), as QEMU sends it
        base = INITIAL_PACKED_BASE if self._packed else 0
        self._send(vu.Request.SET_VRING_BASE, vu.VRING_STATE.pack(index, base))
        # libvhost-user starts the queue thread on KICK, so CALL goes first
        self._send(vu.Request.SET_VRING_CALL, vu.U64.pack(index), (call,))
        self._send(vu.Request.SET_VRING_KICK, vu.U64.pack(index), (kick,))

    def enable_queue(self, index: int) -> None:
        if self._features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self._send(vu.Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1))
        self._started.add(index)

    def start(self) -> None:
        # DRIVER_OK: the bring-up is over; from now on each message has `timeout`
        self._setup_left = None

    def notify(self, index: int, data: int | None = None) -> None:
        try:
            os.eventfd_write(self._queues[index][0], 1)
        except OSError as exc:
            raise TransportError(f"{self.name}: kick of queue {index} failed: {exc}") from exc

    def interrupt_fd(self, index: int) -> int | None:
        return self._queues[index][1]

    def native_kick(self, index: int) -> tuple[int, object, int, int] | None:
        return (self._queues[index][0], None, 0, 0)  # the kick eventfd

    def ack_interrupt(self, index: int) -> None:
        try:
            os.eventfd_read(self._queues[index][1])
        except BlockingIOError:
            pass

    def error_fd(self) -> int | None:
        return self.sock.fileno() if not self._closed else None

    def check_alive(self) -> None:
        """The backend never writes unprompted on this socket: readable means closed,
        or out of step (a late reply, a message nobody asked for): gone either way, or
        the event loop watching error_fd() would spin on it."""
        if self._closed:
            raise DeviceGoneError(f"{self.name}: transport is closed")
        if self._broken is not None:
            raise DeviceGoneError(f"{self._broken}; the connection is no longer usable")
        self._read_backend_channel()
        r, _, _ = select.select([self.sock], [], [], 0)
        if r:
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            except OSError as exc:
                raise DeviceGoneError(f"{self.name}: backend connection broken: {exc}") from exc
            if not data:
                raise DeviceGoneError(f"{self.name}: backend closed the connection")
            self._broken = f"{self.name}: the backend sent a message nobody asked for"
            raise DeviceGoneError(self._broken)

    def dma_pool(self) -> DmaPool:
        return self._arena

    def _read_backend_channel(self) -> None:
        """Log the IOTLB misses and access failures the backend reported (no reply
        is asked for: the whole memfd is mapped, there is nothing more to map)."""
        ch = self._backend_channel
        while ch is not None:
            try:
                request, flags, payload, fds = vu.recv_message(ch)
            except (BlockingIOError, InterruptedError):
                return
            except (DeviceGoneError, TransportError, OSError) as exc:
                log.debug("%s: backend channel closed: %s", self.name, exc)
                ch.close()
                self._backend_channel = ch = None
                return
            for fd in fds:
                os.close(fd)
            if request == BACKEND_IOTLB_MSG and len(payload) >= IOTLB_MSG.size:
                iova, _size, _uaddr, perm, kind = IOTLB_MSG.unpack_from(payload)
                self.iotlb_events.append((kind, iova, perm))
                del self.iotlb_events[:-IOTLB_EVENTS_KEPT]
                what = {IOTLB_MISS: "an IOTLB miss", IOTLB_ACCESS_FAIL: "an access failure"}
                log.error("%s: the device reported %s at IOVA %#x (perm %d): outside the "
                          "driver's memory", self.name, what.get(kind, f"IOTLB event {kind}"),
                          iova, perm)
            else:
                log.warning("%s: backend request %d on the backend channel ignored",
                            self.name, request)
            if flags & vu.FLAG_NEED_REPLY:
                try:
                    vu.send_message(ch, request, vu.U64.pack(1), flags=vu.VERSION | vu.FLAG_REPLY)
                except OSError:
                    pass

    # -- teardown -----------------------------------------------------------------
    def _stop_rings(self, raise_errors: bool = False) -> None:
        """GET_VRING_BASE stops each ring in the backend (its in-flight state ends).
        A backend that misses the deadline stops nothing more: the rings are given up."""
        started, self._started = sorted(self._started), set()
        for index in started:
            try:
                self._call(vu.Request.GET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
            except (TransportError, OSError) as exc:
                log.debug("%s: GET_VRING_BASE(%d): %s", self.name, index, exc)
                if raise_errors:
                    raise
                break

    def close(self) -> None:
        if self._closed:
            return
        if hasattr(self, "sock"):
            try:
                if self._broken is None:
                    with self._bounded(min(self.teardown_timeout, self.timeout)):
                        self._stop_rings()
            except Exception as exc:  # noqa: BLE001 - closing must finish
                log.debug("%s: stopping rings: %s", self.name, exc)
            self.sock.close()
        if getattr(self, "_backend_channel", None) is not None:
            self._backend_channel.close()
            self._backend_channel = None
        self._closed = True
        for kick, call in self._queues.values():
            for fd in (kick, call):
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
        self._queues.clear()
        if hasattr(self, "_memfd"):
            os.close(self._memfd)
        if hasattr(self, "_arena"):
            self._arena.close()
            # its address rule refers back to this object: without the cycle, the
            # mapping (and the fd mmap keeps) goes as soon as the last view of it does
            self._arena.translate = _closed_translate
            if not self.keep_memory_mapped:
                try:
                    self._arena.view.release()  # our own view of the mapping
                except BufferError:
                    pass  # exported: the mapping goes with the last export
        if hasattr(self, "_mm") and not self.keep_memory_mapped:
            try:
                self._mm.close()  # at once when nothing of it is still exported
            except BufferError:
                pass  # views of it live on (slots the caller keeps): freed with them


def _closed_translate(offset: int) -> tuple[int, int]:
    raise DmaError("DMA memory used after its device was closed")


def _request_name(request: int) -> str:
    try:
        return vu.Request(request).name
    except ValueError:
        return f"request {request}"


def _secs(seconds: float) -> str:
    """10.0 -> '10', 0.5 -> '0.5' (as a user would write it)."""
    return f"{round(seconds, 2):g}"
