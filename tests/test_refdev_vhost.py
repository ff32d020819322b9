"""The reference device's vhost-user backend and device-side rings, driven by a
minimal frontend written here, byte by byte: what a well-behaved frontend sees
(config space, queue numbers, indirect chains, EVENT_IDX, a notification held
until the driver posts a buffer) and what a hostile one gets (NACKs, a broken
queue, a closed connection), while the device keeps serving everyone else."""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.lock_table import F_UNLCK, F_WRLCK, OFFSET_MAX
from vfsdrv.virtio import ring_layout as rl
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.vhost_user_proto import ProtocolFeature, Request

MEM_SIZE = 1 << 20
USER_BASE = 0x7F00_0000_0000  # the frontend "virtual address" of GPA 0 (any value will do)
QSIZE = 16
F_NOTIFICATION = 1 << 0
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TIMEOUT = 5.0


class Ring:
    """Driver side of one split ring in the frontend's memory."""

    def __init__(self, fe: Frontend, index: int, base: int) -> None:
        self.fe, self.index = fe, index
        self.desc, self.avail, self.used = base, base + 0x400, base + 0x800
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.last_used = 0
        self.next_desc = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        rl.DESC.pack_into(self.fe.mem, self.desc + 16 * i, addr, length, flags, nxt)

    def publish(self, head: int, kick: bool = True) -> None:
        struct.pack_into("<H", self.fe.mem, self.avail + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.fe.mem, self.avail + 2, self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.fe.mem, self.used + 2)[0]

    def wait_used(self, timeout: float = TIMEOUT) -> tuple[int, int]:
        """(head, len) of the next used element."""
        while self.used_idx() == self.last_used:
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError(f"queue {self.index}: nothing used")
            os.eventfd_read(self.call)
        slot = self.used + 4 + 8 * (self.last_used % QSIZE)
        self.last_used = (self.last_used + 1) & 0xFFFF
        return struct.unpack_from("<II", self.fe.mem, slot)

    def nothing_used(self, wait: float = 0.2) -> bool:
        select.select([self.call], [], [], wait)
        return self.used_idx() == self.last_used

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.fe.mem, self.avail + rl.used_event_offset(QSIZE), value)

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.fe.mem, self.used + rl.avail_event_offset(QSIZE))[0]


class Frontend:
    """What QEMU does for vhost-user-fs, reduced to the bone."""

    #: what ring addresses are given as: the frontend's address of a ring offset
    ring_base = USER_BASE

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(TIMEOUT)
        self.fd = os.memfd_create("fe-mem", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, MEM_SIZE)
        self.mem = mmap.mmap(self.fd, MEM_SIZE)
        self.reply_ack = False
        self.rings: dict[int, Ring] = {}
        self.brk = 0x10000  # buffers above the rings

    def close(self) -> None:
        self.sock.close()
        for r in self.rings.values():
            os.close(r.kick)
            os.close(r.call)
        os.close(self.fd)

    def alloc(self, size: int) -> int:
        addr = self.brk
        self.brk = (self.brk + size + 63) & ~63
        return addr

    # -- messages -------------------------------------------------------------------------
    def get(self, request: int, payload: bytes = b"") -> bytes:
        vu.send_message(self.sock, request, payload)
        req, flags, data, _ = vu.recv_message(self.sock)
        assert req == request and flags & vu.FLAG_REPLY
        return data

    def get_u64(self, request: int) -> int:
        return vu.U64.unpack(self.get(request))[0]

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bool:
        """Send; with REPLY_ACK, True when the backend acked success."""
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if self.reply_ack else 0)
        vu.send_message(self.sock, request, payload, fds, flags)
        if not self.reply_ack:
            return True
        req, _, data, _ = vu.recv_message(self.sock)
        assert req == request
        return vu.U64.unpack(data)[0] == 0

    def handshake(self, features: int) -> None:
        offered = self.get_u64(Request.GET_FEATURES)
        assert features & ~offered == 0
        self.get_u64(Request.GET_PROTOCOL_FEATURES)
        vu.send_message(
            self.sock, Request.SET_PROTOCOL_FEATURES,
            vu.U64.pack(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ),
        )
        self.reply_ack = True
        assert self.send(Request.SET_OWNER)
        acked = features | vu.VHOST_USER_F_PROTOCOL_FEATURES
        assert self.send(Request.SET_FEATURES, vu.U64.pack(acked))
        table = vu.MEM_TABLE_HEAD.pack(1, 0) + vu.MEM_REGION.pack(0, MEM_SIZE, USER_BASE, 0)
        assert self.send(Request.SET_MEM_TABLE, table, (self.fd,))

    @staticmethod
    def ring_offset(index: int) -> int:
        """Where ring `index` lives in the frontend's memory (one page each)."""
        return 0x1000 * (index + 1)

    def setup_ring(self, index: int) -> Ring:
        ring = Ring(self, index, self.ring_offset(index))
        assert self.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(index, QSIZE))
        base = self.ring_base
        assert self.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
            index, 0, base + ring.desc, base + ring.used, base + ring.avail, 0))
        assert self.send(Request.SET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
        assert self.send(Request.SET_VRING_CALL, vu.U64.pack(index), (ring.call,))
        assert self.send(Request.SET_VRING_KICK, vu.U64.pack(index), (ring.kick,))
        assert self.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1))
        self.rings[index] = ring
        return ring

    # -- FUSE -----------------------------------------------------------------------------
    def request(
        self, ring: Ring, opcode: int, nodeid: int, body: bytes, unique: int, reply: int = 4096
    ) -> tuple[int, int]:
        """Post a two-descriptor request; returns (request addr, reply addr)."""
        req = abi.pack(
            "fuse_in_header", len=abi.IN_HEADER_SIZE + len(body), opcode=opcode,
            unique=unique, nodeid=nodeid,
        ) + body
        a, b = self.alloc(len(req)), self.alloc(reply)
        self.mem[a : a + len(req)] = req
        d = ring.next_desc
        ring.next_desc = (d + 2) % QSIZE
        ring.set_desc(d, a, len(req), rl.VRING_DESC_F_NEXT, d + 1)
        ring.set_desc(d + 1, b, reply, rl.VRING_DESC_F_WRITE)
        ring.publish(d)
        return a, b

    def out_header(self, addr: int) -> tuple[int, int, int]:
        return struct.unpack_from("<IiQ", self.mem, addr)

    def call(self, ring: Ring, opcode: int, nodeid: int, body: bytes, unique: int) -> bytes:
        _, reply = self.request(ring, opcode, nodeid, body, unique)
        _head, length = ring.wait_used()
        out_len, error, got = self.out_header(reply)
        assert got == unique and out_len == length
        if error:
            raise OSError(-error, os.strerror(-error))
        return bytes(self.mem[reply + 16 : reply + out_len])

    def init(self, ring: Ring) -> None:
        body = abi.pack("fuse_init_in", major=7, minor=38, flags=abi.InitFlag.POSIX_LOCKS)
        out = abi.unpack("fuse_init_out", self.call(ring, Opcode.INIT, 0, body, 2))
        assert out.major == 7 and out.minor == 38


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "file").write_bytes(b"0123456789")
    return d


@pytest.fixture
def device(sock_dir: str, export_dir: Path) -> Iterator[RefDevice]:
    with RefDevice(os.path.join(sock_dir, "dev.sock"), str(export_dir), tag="t") as dev:
        yield dev


@pytest.fixture
def frontends(device: RefDevice) -> Iterator:
    made: list[Frontend] = []

    def make() -> Frontend:
        fe = Frontend(device.socket_path)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()


def ready(make, features: int = F_VERSION_1 | F_NOTIFICATION) -> tuple[Frontend, Ring, Ring]:
    """A frontend with hiprio and first request queue set up and FUSE initialised."""
    fe = make()
    fe.handshake(features)
    hiprio = fe.setup_ring(0)
    req = fe.setup_ring(2 if features & F_NOTIFICATION else 1)
    fe.init(req)
    return fe, hiprio, req


def still_serving(make) -> None:
    """The device answers a fresh frontend: the previous abuse did not hurt it."""
    fe, _, req = ready(make)
    attr = abi.unpack("fuse_attr_out", fe.call(req, Opcode.GETATTR, 1, bytes(16), 4))
    assert attr.attr.mode & 0o170000 == 0o040000


# -- discovery ----------------------------------------------------------------------------
def test_features_protocol_features_and_queue_count(frontends) -> None:
    fe = frontends()
    features = fe.get_u64(Request.GET_FEATURES)
    assert features == (
        F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES | F_NOTIFICATION | F_INDIRECT | F_EVENT_IDX
        | 1 << 34 | 1 << 35  # VIRTIO_F_RING_PACKED, VIRTIO_F_IN_ORDER
    )
    proto = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert proto == ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
    assert fe.get_u64(Request.GET_QUEUE_NUM) == 3  # hiprio, notification, one request queue


def test_get_config_whole_and_by_field(frontends) -> None:
    fe = frontends()
    data = fe.get(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 44, 0) + bytes(44))
    offset, size, _ = vu.CONFIG_HEAD.unpack_from(data)
    cfg = data[vu.CONFIG_HEAD.size :]
    assert (offset, size, len(cfg)) == (0, 44, 44)
    assert cfg[:36] == b"t" + bytes(35)  # NUL-padded tag
    assert struct.unpack_from("<II", cfg, 36) == (1, 64)
    part = fe.get(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(36, 4, 0) + bytes(4))
    assert struct.unpack_from("<I", part, vu.CONFIG_HEAD.size)[0] == 1
    # beyond the config space: the zero-size error reply
    assert fe.get(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(40, 8, 0) + bytes(8)) == b""


# -- a hostile frontend -------------------------------------------------------------------
def test_invalid_messages_are_nacked(frontends) -> None:
    fe = frontends()
    fe.handshake(F_VERSION_1 | F_NOTIFICATION)
    assert not fe.send(Request.SET_FEATURES, vu.U64.pack(1 << 38))  # never offered
    assert not fe.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 100))  # not a power of 2
    assert not fe.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 65536))
    assert not fe.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(9, 16))  # no queue 9
    assert not fe.send(Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 1 << 16))
    assert not fe.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(0, 0, 3, 0, 0, 0))  # misaligned
    assert not fe.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 7))
    assert not fe.send(Request.SET_CONFIG, vu.CONFIG_HEAD.pack(0, 4, 0) + bytes(4))
    assert not fe.send(99)  # unknown request
    assert not fe.send(Request.SET_VRING_KICK, vu.U64.pack(0))  # no fd
    assert not fe.send(Request.SET_VRING_KICK, vu.U64.pack(vu.VRING_NOFD_MASK))  # polling
    # memory tables: fd count, a region beyond its file, overlapping regions
    region = vu.MEM_REGION.pack(0, MEM_SIZE, USER_BASE, 0)
    assert not fe.send(Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(2, 0) + region * 2, (fe.fd,))
    big = vu.MEM_REGION.pack(0, 2 * MEM_SIZE, USER_BASE, 0)
    assert not fe.send(Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(1, 0) + big, (fe.fd,))
    assert not fe.send(
        Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(2, 0) + region * 2, (fe.fd, fe.fd)
    )
    # rings outside the shared memory cannot start
    assert fe.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, QSIZE))
    assert fe.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(0, 0, 0x1000, 0x2000, 0x3000, 0))
    kick = os.eventfd(0)
    try:
        assert not fe.send(Request.SET_VRING_KICK, vu.U64.pack(0), (kick,))
    finally:
        os.close(kick)
    # and after all that the connection still works
    ring = fe.setup_ring(2)
    fe.init(ring)


def test_malformed_header_closes_only_that_connection(frontends) -> None:
    fe = frontends()
    fe.sock.sendall(struct.pack("<III", Request.GET_FEATURES, 0x2, 0))  # bad version
    assert fe.sock.recv(1) == b""  # closed by the device
    still_serving(frontends)


@pytest.mark.parametrize(
    "attack",
    ["head_out_of_range", "loop", "outside_memory", "readable_after_writable",
     "indirect_not_negotiated", "avail_idx_runs_ahead"],
)
def test_bad_descriptor_chains_break_only_that_queue(frontends, attack: str) -> None:
    fe, _, req = ready(frontends, F_VERSION_1)
    ring = req
    buf = fe.alloc(64)
    if attack == "head_out_of_range":
        ring.publish(QSIZE + 3)
    elif attack == "loop":
        ring.set_desc(0, buf, 8, rl.VRING_DESC_F_NEXT, 1)
        ring.set_desc(1, buf, 8, rl.VRING_DESC_F_NEXT, 0)
        ring.publish(0)
    elif attack == "outside_memory":
        ring.set_desc(0, MEM_SIZE - 8, 64, 0)
        ring.publish(0)
    elif attack == "readable_after_writable":
        ring.set_desc(0, buf, 8, rl.VRING_DESC_F_WRITE | rl.VRING_DESC_F_NEXT, 1)
        ring.set_desc(1, buf, 8, 0)
        ring.publish(0)
    elif attack == "indirect_not_negotiated":
        ring.set_desc(0, buf, 32, rl.VRING_DESC_F_INDIRECT)
        ring.publish(0)
    elif attack == "avail_idx_runs_ahead":
        struct.pack_into("<H", fe.mem, ring.avail + 2, ring.avail_idx + QSIZE + 1)
        os.eventfd_write(ring.kick, 1)
    assert ring.nothing_used()
    # the queue is dead for this frontend...
    fe.request(ring, Opcode.GETATTR, 1, bytes(16), 6)
    assert ring.nothing_used()
    # ...but its socket and every other frontend are served
    assert fe.get_u64(Request.GET_FEATURES)
    still_serving(frontends)


# -- rings ----------------------------------------------------------------------------------
def test_indirect_chain_with_split_buffers(frontends) -> None:
    fe, _, req = ready(frontends, F_VERSION_1 | F_INDIRECT)
    body = abi.pack("fuse_getattr_in")
    head = abi.pack("fuse_in_header", len=40 + len(body), opcode=Opcode.GETATTR, unique=8, nodeid=1)
    parts = [head[:10], head[10:] + body]  # readable part in two pieces
    out_a, out_b = fe.alloc(16), fe.alloc(200)  # header and payload in separate buffers
    table = fe.alloc(16 * 4)
    addrs = []
    for p in parts:
        a = fe.alloc(len(p))
        fe.mem[a : a + len(p)] = p
        addrs.append(a)
    for i, (addr, length, flags) in enumerate(
        [(addrs[0], len(parts[0]), 0), (addrs[1], len(parts[1]), 0),
         (out_a, 16, rl.VRING_DESC_F_WRITE), (out_b, 200, rl.VRING_DESC_F_WRITE)]
    ):
        last = i == 3
        rl.DESC.pack_into(fe.mem, table + 16 * i, addr, length,
                          flags | (0 if last else rl.VRING_DESC_F_NEXT), i + 1)
    req.set_desc(5, table, 64, rl.VRING_DESC_F_INDIRECT)
    req.publish(5)
    used_head, length = req.wait_used()
    assert used_head == 5
    out_len, error, unique = fe.out_header(out_a)
    assert (error, unique) == (0, 8) and length == out_len == 16 + abi.sizeof("fuse_attr_out")
    attr = abi.unpack("fuse_attr_out", bytes(fe.mem[out_b : out_b + 200]))
    assert attr.attr.mode & 0o170000 == 0o040000


def test_event_idx_suppresses_interrupts_and_publishes_avail_event(frontends) -> None:
    fe, _, req = ready(frontends, F_VERSION_1 | F_EVENT_IDX)
    assert req.avail_event() == req.avail_idx  # "kick me at the next entry"
    req.set_used_event(req.last_used + 5)  # no interrupt before the 6th completion from here
    # the set-up's own completions were seen in the ring before the device signalled
    # them: let those signals land, then forget them (else they read as interrupts here)
    time.sleep(0.2)
    try:
        os.eventfd_read(req.call)
    except BlockingIOError:
        pass
    for i in range(3):
        fe.request(req, Opcode.GETATTR, 1, bytes(16), 10 + 2 * i)
    deadline_ok = select.select([req.call], [], [], 0.3)[0]
    assert not deadline_ok  # completions happened without an interrupt
    assert req.used_idx() == req.last_used + 3
    req.set_used_event(req.last_used + 3)  # the next completion crosses it
    fe.request(req, Opcode.GETATTR, 1, bytes(16), 20)
    assert select.select([req.call], [], [], TIMEOUT)[0]
    assert req.avail_event() == req.avail_idx


def test_forget_on_hiprio_is_returned_empty_and_normal_requests_refused(frontends) -> None:
    fe, hiprio, req = ready(frontends)
    fe.call(req, Opcode.LOOKUP, 1, b"file\0", 4)
    a = fe.alloc(48)
    fe.mem[a : a + 48] = abi.pack(
        "fuse_in_header", len=48, opcode=Opcode.FORGET, unique=0, nodeid=2
    ) + abi.pack("fuse_forget_in", nlookup=1)
    hiprio.set_desc(0, a, 48, 0)
    hiprio.publish(0)
    assert hiprio.wait_used() == (0, 0)
    _, reply = fe.request(hiprio, Opcode.GETATTR, 1, bytes(16), 6)
    _, length = hiprio.wait_used()
    assert length == 16 and fe.out_header(reply)[1] == -errno.EINVAL


def test_get_vring_base_stops_the_ring(frontends) -> None:
    fe, _, req = ready(frontends)
    fe.call(req, Opcode.GETATTR, 1, bytes(16), 4)
    state = fe.get(Request.GET_VRING_BASE, vu.VRING_STATE.pack(2, 0))
    assert vu.VRING_STATE.unpack(state) == (2, req.avail_idx)
    fe.request(req, Opcode.GETATTR, 1, bytes(16), 6)
    assert req.nothing_used()


# -- the notification queue ------------------------------------------------------------------
def _lock_in(fh: int, owner: int, type_: int = F_WRLCK) -> bytes:
    return abi.pack(
        "fuse_lk_in", fh=fh, owner=owner, lk=dict(start=0, end=OFFSET_MAX, type=type_, pid=1)
    )


def _open_file(fe: Frontend, req: Ring, unique: int) -> tuple[int, int]:
    entry = abi.unpack("fuse_entry_out", fe.call(req, Opcode.LOOKUP, 1, b"file\0", unique))
    nodeid = entry.nodeid
    out = abi.unpack(
        "fuse_open_out",
        fe.call(req, Opcode.OPEN, nodeid, abi.pack("fuse_open_in", flags=os.O_RDWR), unique + 2),
    )
    return nodeid, out.fh


def test_lock_notification_waits_for_a_buffer_and_skips_short_ones(frontends) -> None:
    a, _, areq = ready(frontends)
    b, _, breq = ready(frontends)
    notify = b.setup_ring(1)  # no buffers posted yet
    na, fa = _open_file(a, areq, 10)
    nb, fb = _open_file(b, breq, 10)
    a.call(areq, Opcode.SETLK, na, _lock_in(fa, 1), 20)
    _, reply = b.request(breq, Opcode.SETLKW, nb, _lock_in(fb, 1), 22)
    breq.wait_used()
    assert b.out_header(reply) == (16, abi.FUSE_LOCK_WAIT, 22)  # wait: no payload
    a.call(areq, Opcode.SETLK, na, _lock_in(fa, 1, F_UNLCK), 24)
    assert notify.nothing_used()  # granted, but no buffer to tell it in
    short, good = b.alloc(32), b.alloc(64)
    notify.set_desc(0, short, 32, rl.VRING_DESC_F_WRITE)  # below notify_buf_size (64)
    notify.set_desc(1, good, 64, rl.VRING_DESC_F_WRITE)
    notify.publish(0, kick=False)
    notify.publish(1)  # the kick wakes the delivery
    assert notify.wait_used() == (0, 0)  # the short buffer comes back unused
    assert notify.wait_used() == (1, 32)
    length, code, unique = b.out_header(good)
    assert (length, code, unique) == (32, abi.DEFAULT_NOTIFY_LOCK_CODE, 0)
    msg = abi.unpack("fuse_notify_lock_out", bytes(b.mem[good + 16 : good + 32]))
    assert (msg.unique, msg.error) == (22, 0)


def test_random_messages_leave_the_device_serving(frontends) -> None:
    """400 messages of random type and content (seeded), some with file
    descriptors: every one is answered or NACKed, and nothing breaks."""
    import random

    rng = random.Random(20261124)
    fe = frontends()
    fe.handshake(F_VERSION_1 | F_NOTIFICATION)
    kinds = [r for r in Request if r != Request.SET_PROTOCOL_FEATURES] + [0, 77, 4096]
    for _ in range(400):
        request = rng.choice(kinds)
        payload = rng.randbytes(rng.choice([0, 3, 8, 12, 20, 40, 44, 48, 300]))
        if request in vu.REPLY_REQUESTS:
            fe.get(request, payload)
            continue
        fds: tuple[int, ...] = ()
        extra = os.eventfd(0) if rng.random() < 0.3 else None
        if extra is not None:
            fds = (fe.fd,) if request == Request.SET_MEM_TABLE else (extra,)
        try:
            fe.send(request, payload, fds)
        finally:
            if extra is not None:
                os.close(extra)
    assert fe.get_u64(Request.GET_FEATURES)
    still_serving(frontends)


def test_two_memory_regions_translate_by_gpa_and_by_frontend_address(frontends) -> None:
    """Region A holds the rings (reached by frontend address), region B the
    buffers (reached by GPA, far from A's); both are parts of one memfd here."""
    half = MEM_SIZE // 2
    high_gpa, high_user = 1 << 32, USER_BASE + (1 << 30)
    fe = frontends()
    fe.get_u64(Request.GET_FEATURES)
    vu.send_message(fe.sock, Request.SET_PROTOCOL_FEATURES, vu.U64.pack(ProtocolFeature.REPLY_ACK))
    fe.reply_ack = True
    assert fe.send(Request.SET_FEATURES, vu.U64.pack(F_VERSION_1))
    table = vu.MEM_TABLE_HEAD.pack(2, 0) + vu.MEM_REGION.pack(
        0, half, USER_BASE, 0
    ) + vu.MEM_REGION.pack(high_gpa, half, high_user, half)
    assert fe.send(Request.SET_MEM_TABLE, table, (fe.fd, fe.fd))
    fe.setup_ring(0)
    req = fe.setup_ring(1)
    body = abi.pack("fuse_init_in", major=7, minor=38)
    msg = abi.pack("fuse_in_header", len=40 + len(body), opcode=Opcode.INIT, unique=2) + body
    a, b = half + 0x1000, half + 0x2000  # offsets in the memfd, inside region B
    fe.mem[a : a + len(msg)] = msg
    req.set_desc(0, high_gpa + (a - half), len(msg), rl.VRING_DESC_F_NEXT, 1)
    req.set_desc(1, high_gpa + (b - half), 4096, rl.VRING_DESC_F_WRITE)
    req.publish(0)
    _, length = req.wait_used()
    out_len, error, unique = fe.out_header(b)
    assert (error, unique) == (0, 2) and out_len == length == 16 + abi.sizeof("fuse_init_out")
    # a buffer running past the end of region A is refused (its bytes continue
    # in the memfd, but not at those GPAs): the queue stops
    req.set_desc(2, half - 8, 16, 0)
    req.publish(2)
    assert req.nothing_used()
