"""vhost-user wire protocol (QEMU docs/interop/vhost-user.rst): message codes, flags,
payload layouts and framed I/O with file descriptors. Shared by the driver's
frontend transport and the reference device's backend, which play the two roles.
"""

from __future__ import annotations

import array
import enum
import socket
import struct
import time

from ..errors import DeviceGoneError, TransportError

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION_MASK = 0x3

MAX_PAYLOAD = 4096 + 8 * 32  # generous: mem tables of 32 regions, config of 256 bytes
MAX_FDS = 32
#: SET_VRING_KICK/CALL payload bit: no fd follows, use polling
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class Request(enum.IntEnum):
    """Front-end message types."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


#: messages whose reply is defined by the protocol (the rest reply only with NEED_REPLY)
REPLY_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


#: virtio feature bit 30 reused by vhost-user: the backend speaks protocol features
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Give the next socket call what is left until `deadline` (None: block, as the
    reference device does). A deadline already past raises TimeoutError."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("vhost-user deadline passed")
    sock.settimeout(left)


def send_message(
    sock: socket.socket,
    request: int,
    payload: bytes = b"",
    fds: tuple[int, ...] | list[int] = (),
    flags: int = VERSION,
    deadline: float | None = None,
) -> None:
    """One message; fds travel as SCM_RIGHTS in the same sendmsg as the header
    (libvhost-user reads them together with the header). With `deadline` (a
    time.monotonic() value) a peer that does not take it in time raises TimeoutError."""
    data = HEADER.pack(request, flags, len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        _arm(sock, deadline)
        sent = sock.sendmsg([data], anc)
        while sent < len(data):
            _arm(sock, deadline)
            sent += sock.send(data[sent:])
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise DeviceGoneError(f"vhost-user peer closed the socket ({exc})") from exc


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            _arm(sock, deadline)
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError as exc:
            raise DeviceGoneError("vhost-user peer reset the connection") from exc
        if not chunk:
            raise DeviceGoneError("vhost-user peer closed the socket")
        buf += chunk
    return bytes(buf)


def recv_message(
    sock: socket.socket, deadline: float | None = None
) -> tuple[int, int, bytes, list[int]]:
    """(request, flags, payload, fds). Validates size and version before trusting them.
    With `deadline` (a time.monotonic() value), the whole message must have arrived by
    then, or TimeoutError: a peer trickling bytes cannot stretch it."""
    fds = array.array("i")
    try:
        _arm(sock, deadline)
        head, anc, _msg_flags, _ = sock.recvmsg(
            HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
        )
    except ConnectionResetError as exc:
        raise DeviceGoneError("vhost-user peer reset the connection") from exc
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not head:
        for fd in fds:
            _close_quietly(fd)
        raise DeviceGoneError("vhost-user peer closed the socket")
    if len(head) < HEADER.size:
        head += recv_exact(sock, HEADER.size - len(head), deadline)
    request, flags, size = HEADER.unpack(head)
    if flags & VERSION_MASK != VERSION or size > MAX_PAYLOAD:
        for fd in fds:
            _close_quietly(fd)
        raise TransportError(
            f"malformed vhost-user message: request {request} flags {flags:#x} size {size}"
        )
    try:
        payload = recv_exact(sock, size, deadline) if size else b""
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise
    return request, flags, payload, list(fds)


def _close_quietly(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
