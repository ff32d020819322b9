"""VIRTIO_F_ACCESS_PLATFORM for the reference device: the vhost-user IOTLB.

With ACCESS_PLATFORM negotiated, every address the driver hands the device (ring
addresses in SET_VRING_ADDR, descriptor addresses, indirect tables) is an I/O
virtual address (IOVA), not a guest-physical one. The frontend tells the backend
how IOVAs map to its own virtual addresses with VHOST_USER_IOTLB_MSG carrying a
`struct vhost_iotlb_msg` (QEMU docs/interop/vhost-user.rst, "IOMMU support"):

    UPDATE      iova, size, uaddr, perm: a mapping (uaddr inside a memory region)
    INVALIDATE  iova, size: every mapping overlapping the range goes
    MISS        (backend -> frontend) a translation the backend lacks
    ACCESS_FAIL (backend -> frontend) an access the IOTLB refused

The backend's messages travel on the backend channel (BACKEND_REQ protocol
feature, SET_BACKEND_REQ_FD). A translation the IOTLB lacks, met while the
session thread serves a queue, is asked for: MISS with NEED_REPLY (REPLY_ACK
negotiated), then the session serves the frontend's IOTLB_MSGs on the main socket
until the frontend acks the MISS on the backend channel (as QEMU answers a miss:
UPDATE first, then the ack), for at most MISS_TIMEOUT seconds. A translation
still missing, one without the permission the access needs, or a miss met while
a message is being handled (the frontend waits for that message's ack and cannot
answer), is refused: VHOST_IOTLB_ACCESS_FAIL on the backend channel (when the
frontend gave one) and the queue stops, as a device behind an IOMMU gets a fault.

`IotlbSession` is the vhost-user session with that added; `IotlbMemory` looks
like `GuestMemory` to the queues, so the ring code is the same in both modes.
"""

from __future__ import annotations

import bisect
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..errors import DeviceGoneError, TransportError
from ..virtio import vhost_user_proto as vu
from ..virtio.vhost_user_proto import ProtocolFeature, Request
from .guest_memory import GuestMemory, MemoryAccessError
from .vhost_session import MessageError, VhostUserSession

log = logging.getLogger(__name__)

#: virtio feature bit 33 (VIRTIO_F_IOMMU_PLATFORM in vhost-user's words)
VIRTIO_F_ACCESS_PLATFORM = 1 << 33

#: struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type;} padded to 32 bytes
IOTLB_MSG = struct.Struct("<QQQBB6x")
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
ACCESS_RO, ACCESS_WO, ACCESS_RW = 1, 2, 3
#: backend -> frontend request carrying a vhost_iotlb_msg
BACKEND_IOTLB_MSG = 1
#: mappings one session keeps (a frontend cannot make the device hoard memory)
MAX_ENTRIES = 4096
#: seconds a MISS waits for the frontend's answer before the access is refused
MISS_TIMEOUT = 2.0
#: misses one access may ask for (a range over several missing mappings)
MAX_MISSES = 8


class IotlbAccessError(MemoryAccessError):
    """An IOVA access the IOTLB does not allow (unmapped or lacking permission)."""

    def __init__(self, message: str, iova: int, perm: int, missing: bool = False) -> None:
        super().__init__(message)
        self.iova, self.perm = iova, perm
        self.missing = missing  #: unmapped (a MISS may help), not a permission fault


@dataclass(frozen=True)
class Mapping:
    iova: int
    size: int
    uaddr: int
    perm: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class Iotlb:
    """IOVA -> frontend virtual address mappings, sorted by IOVA, never overlapping
    (an UPDATE over an existing range replaces what it overlaps)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: dict[int, Mapping] = {}

    def __len__(self) -> int:
        return len(self._starts)

    def update(self, m: Mapping) -> None:
        if m.size == 0 or m.end > 1 << 64 or m.uaddr + m.size > 1 << 64:
            raise MessageError(f"IOTLB update of {m.size:#x} bytes at IOVA {m.iova:#x}")
        if not m.perm or m.perm & ~ACCESS_RW:
            raise MessageError(f"IOTLB update with permissions {m.perm:#x}")
        self.invalidate(m.iova, m.size)
        if len(self._starts) >= MAX_ENTRIES:
            raise MessageError(f"IOTLB full ({MAX_ENTRIES} mappings)")
        bisect.insort(self._starts, m.iova)
        self._maps[m.iova] = m

    def invalidate(self, iova: int, size: int) -> int:
        """Drop every mapping overlapping [iova, iova+size); how many went."""
        gone = [s for s in self._starts if s < iova + size and self._maps[s].end > iova]
        for s in gone:
            self._starts.remove(s)
            del self._maps[s]
        return len(gone)

    def translate(self, iova: int, length: int, perm: int) -> int:
        """The frontend virtual address of [iova, iova+length), which must lie in one
        mapping, or in mappings that follow each other in both spaces."""
        start, need, pos = None, length, iova
        while True:
            i = bisect.bisect_right(self._starts, pos) - 1
            m = self._maps[self._starts[i]] if i >= 0 else None
            if m is None or pos >= m.end:
                raise IotlbAccessError(
                    f"IOVA range {iova:#x}+{length:#x}: {pos:#x} is not mapped", pos, perm,
                    missing=True)
            if m.perm & perm != perm:
                raise IotlbAccessError(
                    f"IOVA {pos:#x} mapped with permissions {m.perm}, access needs {perm}",
                    pos, perm)
            ua = m.uaddr + pos - m.iova
            if start is None:
                start = ua
            elif ua != start + (pos - iova):
                raise IotlbAccessError(
                    f"IOVA range {iova:#x}+{length:#x} is not contiguous in frontend memory",
                    pos, perm)
            run = m.end - pos
            if run >= need:
                return start
            pos, need = pos + run, need - run


class IotlbMemory:
    """What the queues see with ACCESS_PLATFORM: GuestMemory's interface, every
    address an IOVA. Ring parts and buffers are translated through the IOTLB, then
    found in the memory table by their frontend virtual address."""

    def __init__(self, session: IotlbSession) -> None:
        self._session = session

    def _resolve(self, addr: int, length: int, perm: int) -> memoryview:
        s = self._session
        try:
            asked: set[int] = set()
            while True:
                try:
                    uaddr = s.iotlb.translate(addr, length, perm)
                    break
                except IotlbAccessError as exc:
                    # each missing IOVA is asked for once: still missing is a fault
                    if not (exc.missing and exc.iova not in asked and len(asked) < MAX_MISSES
                            and s.may_ask()):
                        raise
                    asked.add(exc.iova)
                    if not s.ask_miss(exc.iova, exc.perm):
                        raise
            return s.memory.user_addr(uaddr, length)
        except IotlbAccessError as exc:
            s.access_failed(exc.iova, exc.perm)
            raise
        except MemoryAccessError:
            s.access_failed(addr, perm)
            raise

    def gpa(self, addr: int, length: int) -> memoryview:
        # the queue decides read or write only after fetching: the driver maps its
        # buffers read-write, and a read-only mapping serves as a readable buffer
        return self._resolve(addr, length, ACCESS_RO)

    def user_addr(self, addr: int, length: int) -> memoryview:
        return self._resolve(addr, length, ACCESS_RW)  # rings are written by both sides

    def user_to_gpa(self, addr: int) -> int | None:
        return None

    def close(self) -> None:
        pass  # the session's GuestMemory owns the mappings


class IotlbSession(VhostUserSession):
    """A session that offers ACCESS_PLATFORM and the BACKEND_REQ protocol feature,
    keeps an IOTLB per frontend and sends ACCESS_FAIL on the backend channel."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.offered |= VIRTIO_F_ACCESS_PLATFORM
        self.offered_protocol |= ProtocolFeature.BACKEND_REQ
        self.iotlb = Iotlb()
        self.iova_memory = IotlbMemory(self)
        self.backend_channel: socket.socket | None = None
        #: (iova, perm) of every ACCESS_FAIL this session reported, every MISS it sent
        self.access_failures: list[tuple[int, int]] = []
        self.misses: list[tuple[int, int]] = []
        self._handling = 0  # inside a message handler: a MISS cannot be answered
        self._in_miss = False
        self._reresolve_pending = False
        self._handlers[Request.IOTLB_MSG] = self._iotlb_msg
        self._handlers[Request.SET_BACKEND_REQ_FD] = self._set_backend_req_fd

    @property
    def access_platform(self) -> bool:
        return bool(self.features & VIRTIO_F_ACCESS_PLATFORM)

    def _ring_memory(self) -> GuestMemory | IotlbMemory:  # type: ignore[override]
        return self.iova_memory if self.access_platform else self.memory

    def _set_backend_req_fd(self, payload: bytes, fds: list[int]) -> None:
        if not self.protocol_features & ProtocolFeature.BACKEND_REQ:
            raise MessageError("SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature")
        if not fds:
            raise MessageError("SET_BACKEND_REQ_FD without a file descriptor")
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = socket.socket(fileno=fds.pop(0))

    def _iotlb_msg(self, payload: bytes, fds: list[int]) -> None:
        if len(payload) < IOTLB_MSG.size:
            raise MessageError(f"IOTLB_MSG of {len(payload)} bytes")
        iova, size, uaddr, perm, kind = IOTLB_MSG.unpack_from(payload)
        if kind == IOTLB_UPDATE:
            # the spec: "Addresses and size must be within vhost memory regions"
            try:
                self.memory.user_addr(uaddr, size)
            except MemoryAccessError as exc:
                raise MessageError(f"IOTLB update for IOVA {iova:#x}: {exc}") from exc
            self.iotlb.update(Mapping(iova, size, uaddr, perm))
            log.debug("session %d: IOTLB %#x+%#x -> %#x perm %d", self.id, iova, size,
                      uaddr, perm)
        elif kind == IOTLB_INVALIDATE:
            if self.iotlb.invalidate(iova, size):
                if self._in_miss:  # mid-chain: the rings are looked up once it is done
                    self._reresolve_pending = True
                else:
                    self._reresolve_rings()
        else:
            raise MessageError(f"IOTLB message of type {kind} from the frontend")

    def _reresolve_rings(self) -> None:
        """Running rings hold views of their memory: look them up again, so a ring
        whose mapping went stops instead of being used through a stale view."""
        if not self.access_platform:
            return
        for q in self.queues:
            if q.started:
                q.stop()
                try:
                    q.start(self.iova_memory)
                except Exception as exc:  # noqa: BLE001 - the queue stops either way
                    log.error("session %d: queue %d stopped: %s", self.id, q.index, exc)
                    q.broken = True

    # -- misses ---------------------------------------------------------------------------
    def _serve_message(self) -> None:
        self._handling += 1
        try:
            super()._serve_message()
        finally:
            self._handling -= 1

    def _run_queue(self, q) -> None:
        super()._run_queue(q)
        self._after_miss()

    def _deliver_notifications(self) -> None:
        super()._deliver_notifications()
        self._after_miss()

    def _after_miss(self) -> None:
        if self._reresolve_pending and not self._in_miss:
            self._reresolve_pending = False
            self._reresolve_rings()

    def may_ask(self) -> bool:
        """Can a MISS be answered now? Only in the session thread, serving a queue
        (not a message: its ack is still owed), with a backend channel and REPLY_ACK."""
        return (self.backend_channel is not None and not self._handling
                and not self._in_miss and threading.current_thread() is self._thread
                and bool(self.protocol_features & ProtocolFeature.REPLY_ACK))

    def ask_miss(self, iova: int, perm: int) -> bool:
        """Send MISS (NEED_REPLY) and serve the frontend's IOTLB messages until it acks
        the MISS; False when it did not within MISS_TIMEOUT, or sent another message
        (which stays for the main loop)."""
        ch = self.backend_channel
        assert ch is not None
        self.misses.append((iova, perm))
        log.info("session %d: IOTLB miss at IOVA %#x (perm %d)", self.id, iova, perm)
        deadline = time.monotonic() + MISS_TIMEOUT
        self._in_miss = True
        try:
            vu.send_message(ch, BACKEND_IOTLB_MSG, IOTLB_MSG.pack(iova, 0, 0, perm, IOTLB_MISS),
                            flags=vu.VERSION | vu.FLAG_NEED_REPLY, deadline=deadline)
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock, ch], [], [], left)
                if ch in ready:
                    request, flags, payload, fds = vu.recv_message(ch, deadline)
                    for fd in fds:
                        socket.close(fd)
                    if request == BACKEND_IOTLB_MSG and flags & vu.FLAG_REPLY:
                        # 0: done (an update came first); else the frontend refused it
                        return payload[:8] == bytes(8)
                if self.sock in ready:
                    head = self.sock.recv(vu.HEADER.size, socket.MSG_PEEK)
                    if len(head) < vu.HEADER.size or vu.HEADER.unpack(head)[0] != Request.IOTLB_MSG:
                        return False  # closed, or not an IOTLB message: the main loop's
                    self._serve_message()
            return False
        except (OSError, TimeoutError, DeviceGoneError, TransportError) as exc:
            log.warning("session %d: IOTLB miss unanswered: %s", self.id, exc)
            return False
        finally:
            self._in_miss = False

    def access_failed(self, iova: int, perm: int) -> None:
        """VHOST_IOTLB_ACCESS_FAIL on the backend channel (best effort)."""
        self.access_failures.append((iova, perm))
        log.error("session %d: IOTLB refused an access at IOVA %#x (perm %d)", self.id,
                  iova, perm)
        if self.backend_channel is None:
            return
        msg = IOTLB_MSG.pack(iova, 0, 0, perm, IOTLB_ACCESS_FAIL)
        try:
            self.backend_channel.setblocking(False)
            vu.send_message(self.backend_channel, BACKEND_IOTLB_MSG, msg)
        except (OSError, DeviceGoneError) as exc:
            log.warning("session %d: ACCESS_FAIL not sent: %s", self.id, exc)

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            if self.backend_channel is not None:
                self.backend_channel.close()
                self.backend_channel = None
