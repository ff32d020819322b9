"""The reference device's auditing mode against a small byte-level vhost-user
frontend written here: a conforming bring-up violates nothing, and each
deliberate misbehaviour is reported as a violation of the right statement
(and of no other)."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfsdrv.fs import abi
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.audit import (
    CHECKLIST_SIZE,
    HELD,
    NOT_EXERCISED,
    STATEMENTS,
    VIOLATED,
    AuditReport,
)
from vfsdrv.virtio import ring_layout as rl
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.vhost_user_proto import ProtocolFeature, Request

ACK, DRIVER, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 128
F_NOTIFICATION = 1 << 0
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
MEM_SIZE = 1 << 20
USER_BASE = 0x7F00_0000_0000  # the frontend addresses we announce for the region
IN_HEADER = struct.Struct("<IIQQIIIHH")
QSIZE = 8
HIPRIO, NOTIFY, REQUEST = 0, 1, 2


class RawQueue:
    """A split ring laid out by hand at GPA `base` in the frontend's memory."""

    def __init__(self, fe: RawFrontend, index: int, size: int = QSIZE) -> None:
        self.fe = fe
        self.index = index
        self.size = size
        base = 0x1000 * (1 + 2 * index)
        self.desc, self.avail, self.used = base, base + 0x800, base + 0xC00
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.avail_idx = 0
        self.next_desc = 0

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        rl.DESC.pack_into(self.fe.mem, self.desc + 16 * i, addr, length, flags, nxt)

    def chain(self, parts: list[tuple[int, int, int]]) -> int:
        """Descriptors (addr, len, flags) linked with NEXT; returns the head."""
        head = self.next_desc
        for n, (addr, length, flags) in enumerate(parts):
            i = self.next_desc
            self.next_desc = (self.next_desc + 1) % self.size
            last = n == len(parts) - 1
            self.write_desc(i, addr, length, flags | (0 if last else rl.VRING_DESC_F_NEXT),
                            0 if last else self.next_desc)
        return head

    def offer(self, head: int, kick: bool = True) -> None:
        slot = self.avail + rl.AVAIL_RING + 2 * (self.avail_idx % self.size)
        struct.pack_into("<H", self.fe.mem, slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)
        if kick:
            self.kick()

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.fe.mem, self.avail + rl.AVAIL_IDX, idx)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.fe.mem, self.avail + rl.AVAIL_FLAGS, flags)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.fe.mem, self.used + rl.USED_IDX)[0]

    def wait_used(self, n: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while self.used_idx() != n:
            assert time.monotonic() < deadline, f"queue {self.index}: used idx {self.used_idx()}"
            time.sleep(0.005)


class RawFrontend:
    """Just enough of a vhost-user frontend to misbehave on purpose."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.memfd = os.memfd_create("raw-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.heap = 0x40000
        self.status = 0
        self.queues: dict[int, RawQueue] = {}
        self.offered = self.get(Request.GET_FEATURES)
        proto = self.get(Request.GET_PROTOCOL_FEATURES)
        assert proto & ProtocolFeature.STATUS, "auditing mode offers STATUS"
        self.reply_ack = False
        self.send(Request.SET_PROTOCOL_FEATURES, vu.U64.pack(
            proto & (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                     | ProtocolFeature.STATUS)))
        self.reply_ack = True
        self.send(Request.SET_OWNER)

    def close(self) -> None:
        self.sock.close()
        for q in self.queues.values():
            os.close(q.kick_fd)
            os.close(q.call_fd)
        self.mem.close()
        os.close(self.memfd)

    # -- messages ------------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        """A message; with REPLY_ACK the ack's status (0 = accepted)."""
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if self.reply_ack else 0)
        vu.send_message(self.sock, request, payload, fds, flags)
        if not self.reply_ack:
            return 0
        return vu.U64.unpack(self._reply(request))[0]

    def call(self, request: int, payload: bytes = b"") -> bytes:
        vu.send_message(self.sock, request, payload)
        return self._reply(request)

    def _reply(self, request: int) -> bytes:
        rreq, _flags, data, fds = vu.recv_message(self.sock)
        for fd in fds:
            os.close(fd)
        assert rreq == request
        return data

    def get(self, request: int) -> int:
        return vu.U64.unpack(self.call(request))[0]

    # -- status and features ----------------------------------------------------------------
    def set_status(self, status: int) -> None:
        self.status = status
        assert self.send(Request.SET_STATUS, vu.U64.pack(status)) == 0

    def add_status(self, bit: int) -> None:
        self.set_status(self.status | bit)

    def read_status(self) -> int:
        return self.get(Request.GET_STATUS)

    def reset(self) -> None:
        self.set_status(0)
        assert self.read_status() == 0

    def set_features(self, features: int) -> int:
        self.features = features
        return self.send(Request.SET_FEATURES, vu.U64.pack(features))

    def standard_features(self, notification: bool = True) -> int:
        f = F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES | F_INDIRECT
        return f | (F_NOTIFICATION if notification else 0)

    def negotiate(self, features: int | None = None) -> None:
        """Steps 1-6 done right."""
        self.reset()
        self.add_status(ACK)
        self.add_status(DRIVER)
        self.set_features(self.standard_features() if features is None else features)
        self.add_status(FEATURES_OK)
        assert self.read_status() & FEATURES_OK

    # -- queues -----------------------------------------------------------------------------
    def mem_table(self) -> None:
        region = vu.MEM_REGION.pack(0, MEM_SIZE, USER_BASE, 0)
        assert self.send(Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(1, 0) + region,
                         (self.memfd,)) == 0

    def setup_queue(self, index: int, size: int = QSIZE, *, enable: bool = True,
                    addrs: tuple[int, int, int] | None = None) -> RawQueue:
        q = RawQueue(self, index, size)
        self.queues[index] = q
        desc, avail, used = addrs or (q.desc, q.avail, q.used)
        self.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(index, size))
        self.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
            index, 0, USER_BASE + desc, USER_BASE + used, USER_BASE + avail, 0))
        self.send(Request.SET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
        self.send(Request.SET_VRING_CALL, vu.U64.pack(index), (q.call_fd,))
        self.send(Request.SET_VRING_KICK, vu.U64.pack(index), (q.kick_fd,))
        if enable:
            self.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1))
        return q

    def alloc(self, size: int, data: bytes = b"") -> int:
        addr = self.heap
        self.heap += (size + 63) & ~63
        self.mem[addr : addr + len(data)] = data
        return addr

    def post_notify_buffers(self, n: int = 4, size: int = 64, readable: int = 0) -> None:
        q = self.queues[NOTIFY]
        for _ in range(n):
            parts = [(self.alloc(readable), readable, 0)] if readable else []
            parts.append((self.alloc(size), size, rl.VRING_DESC_F_WRITE))
            q.offer(q.chain(parts), kick=False)

    def bring_up(self, notify_buffers: int = 4) -> None:
        """A conforming bring-up: hiprio, notification and one request queue."""
        self.negotiate()
        self.mem_table()
        for i in (HIPRIO, NOTIFY, REQUEST):
            self.setup_queue(i)
        if notify_buffers:
            self.post_notify_buffers(notify_buffers)
        self.add_status(DRIVER_OK)
        self.queues[NOTIFY].kick()

    # -- FUSE -------------------------------------------------------------------------------
    def request(self, qi: int, opcode: int, body: bytes = b"", *, reply: int = 4096,
                unique: int = 2, nodeid: int = 1, big_endian: bool = False) -> int:
        """One request chain (readable, then a writable reply) offered and kicked."""
        n = abi.IN_HEADER_SIZE + len(body)
        head = IN_HEADER.pack(n, opcode, unique, nodeid, 0, 0, 0, 0, 0)
        if big_endian:
            head = struct.pack(">IIQQIIIHH", n, opcode, unique, nodeid, 0, 0, 0, 0, 0)
        q = self.queues[qi]
        parts = [(self.alloc(n, head + body), n, 0)]
        if reply:
            parts.append((self.alloc(reply), reply, rl.VRING_DESC_F_WRITE))
        h = q.chain(parts)
        q.offer(h)
        return h

    def init(self, qi: int = REQUEST, **kw) -> None:
        body = abi.pack("fuse_init_in", major=7, minor=38, max_readahead=0, flags=0)
        self.request(qi, abi.Opcode.INIT, body, **kw)


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def make_device(device_factory) -> Callable[..., RefDevice]:
    """The conftest's device_factory (an empty export), in auditing mode."""
    return lambda **options: device_factory(audit=True, **options)


@pytest.fixture
def device(make_device) -> RefDevice:
    return make_device()


@pytest.fixture
def frontend(device: RefDevice) -> Iterator[RawFrontend]:
    fe = RawFrontend(device.socket_path)
    yield fe
    fe.close()


def settle(device: RefDevice, fe: RawFrontend) -> AuditReport:
    """Everything sent so far has been handled: a GET_STATUS round trip after the
    session thread has drained its kicks."""
    time.sleep(0.05)
    fe.read_status()
    return device.audit_report()


def wait_result(device: RefDevice, sid: str, result: str = VIOLATED,
                timeout: float = 3.0) -> AuditReport:
    deadline = time.monotonic() + timeout
    while True:
        report = device.audit_report()
        if report.result(sid) == result or time.monotonic() > deadline:
            assert report.result(sid) == result, report.format_table()
            return report
        time.sleep(0.01)


def violated_ids(report: AuditReport) -> set[str]:
    return {e.id for e in report.entries if e.result == VIOLATED}


def assert_only(report: AuditReport, *ids: str) -> None:
    assert violated_ids(report) == set(ids), report.format_table()


# -- the baseline ---------------------------------------------------------------------------
def test_statements_are_tied_to_checklist_items() -> None:
    ids = [s.id for s in STATEMENTS]
    assert len(ids) == len(set(ids))
    for s in STATEMENTS:
        assert 1 <= s.checklist <= CHECKLIST_SIZE
        assert s.level in ("MUST", "SHOULD") and s.level in s.text
        assert s.id.rstrip("abcd") == str(s.checklist)


def test_a_conforming_frontend_violates_nothing(device: RefDevice, frontend: RawFrontend) -> None:
    assert device.audit_report().result("16") == NOT_EXERCISED
    frontend.bring_up()
    frontend.init()
    frontend.queues[REQUEST].wait_used(1)
    frontend.request(REQUEST, abi.Opcode.GETATTR, abi.pack("fuse_getattr_in"), unique=4)
    frontend.queues[REQUEST].wait_used(2)
    forget = abi.pack("fuse_forget_in", nlookup=1)
    frontend.request(HIPRIO, abi.Opcode.FORGET, forget, reply=0, unique=6)
    frontend.queues[HIPRIO].wait_used(1)
    report = settle(device, frontend)
    assert report.ok and not report.warnings, report.format_table()
    for sid in ("1", "2", "5", "7", "10", "16", "20", "21", "26", "27", "35", "36", "50", "51a",
                "58", "59", "60", "61", "63", "64", "67", "67b"):
        assert report.result(sid) == HELD, sid
    assert report.result("3") == NOT_EXERCISED
    assert len(report.covered) >= 25
    assert f"covered {len(report.covered)} of {CHECKLIST_SIZE}" in report.summary()


# -- status and features ----------------------------------------------------------------
def test_driver_ok_before_features_ok(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.reset()
    frontend.add_status(ACK)
    frontend.add_status(DRIVER)
    frontend.set_features(frontend.standard_features(notification=False))
    frontend.add_status(DRIVER_OK)
    report = device.audit_report()
    assert_only(report, "1", "16")
    assert "DRIVER_OK" in report.entry("1").observed
    assert "FEATURES_OK was never set" in report.entry("16").observed
    assert not report.ok


def test_clearing_a_status_bit(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.negotiate()
    frontend.set_status(ACK | FEATURES_OK)
    assert_only(device.audit_report(), "2")


def test_status_write_after_reset_without_reading_it_back(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.set_status(0)
    frontend.set_status(ACK)
    report = device.audit_report()
    assert_only(report, "21")


def test_features_never_offered_undefined_and_no_version_1(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.reset()
    frontend.add_status(ACK | DRIVER)
    assert frontend.set_features(vu.VHOST_USER_F_PROTOCOL_FEATURES | 1 << 5) != 0  # refused
    report = device.audit_report()
    assert_only(report, "5", "7", "10")
    assert "0x20" in report.entry("5").observed


def test_features_after_features_ok(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.negotiate()
    frontend.set_features(frontend.standard_features() & ~F_INDIRECT)
    assert_only(device.audit_report(), "18")


def test_reinitializing_after_failed_without_reset(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.reset()
    frontend.add_status(ACK | DRIVER)
    frontend.add_status(FAILED)
    frontend.set_features(frontend.standard_features())
    assert_only(device.audit_report(), "3")


def test_failed_then_reset_holds(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.reset()
    frontend.add_status(ACK | DRIVER)
    frontend.add_status(FAILED)
    frontend.reset()
    frontend.negotiate()
    report = device.audit_report()
    assert report.result("3") == HELD and report.ok


def test_kick_before_driver_ok(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.negotiate()
    frontend.mem_table()
    for i in (HIPRIO, NOTIFY, REQUEST):
        frontend.setup_queue(i)
    frontend.init()  # offered and kicked before DRIVER_OK
    time.sleep(0.1)
    assert frontend.queues[REQUEST].used_idx() == 0  # the device did not consume it
    report = wait_result(device, "20")
    assert "queue 2" in report.entry("20").observed
    frontend.post_notify_buffers()
    frontend.add_status(DRIVER_OK)
    frontend.queues[REQUEST].wait_used(1)  # served once the device is live
    assert_only(settle(device, frontend), "20")


def test_set_config(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.reset()
    frontend.add_status(ACK | DRIVER)
    assert frontend.send(Request.SET_CONFIG, vu.CONFIG_HEAD.pack(0, 4, 0) + b"evil") != 0
    report = device.audit_report()
    assert_only(report, "17", "58")
    assert "SET_CONFIG of 4 bytes at offset 0" in report.entry("58").observed


def test_reading_notify_buf_size_when_not_offered(make_device) -> None:
    dev = make_device(notification=False)
    fe = RawFrontend(dev.socket_path)
    try:
        assert not fe.offered & F_NOTIFICATION
        fe.call(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 40, 0) + bytes(40))  # fine
        assert dev.audit_report().result("23") == NOT_EXERCISED
        fe.call(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(36, 8, 0) + bytes(8))
        assert_only(dev.audit_report(), "23")
    finally:
        fe.close()


# -- queue set-up -------------------------------------------------------------------------
def test_misaligned_ring_and_bad_size_and_queue_outside_layout(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.negotiate()
    frontend.mem_table()
    q = RawQueue(frontend, REQUEST)
    frontend.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
        REQUEST, 0, USER_BASE + q.desc + 8, USER_BASE + q.used + 2, USER_BASE + q.avail + 1, 0))
    frontend.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(REQUEST, 12))
    frontend.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(7, 8))  # 3 queues only
    os.close(q.kick_fd)
    os.close(q.call_fd)
    report = device.audit_report()
    assert_only(report, "26", "50", "59")
    observed = report.entry("26").observed
    assert "descriptor table" in observed and "available ring" in observed
    assert "used ring" in observed
    assert "size 12" in report.entry("50").observed


def test_used_flags_not_zero(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.negotiate()
    frontend.mem_table()
    struct.pack_into("<H", frontend.mem, RawQueue(frontend, HIPRIO).used, 1)
    frontend.setup_queue(HIPRIO)
    assert_only(device.audit_report(), "35")


def test_enable_before_addresses_and_disable_while_live(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.negotiate()
    frontend.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(REQUEST, 1))
    assert_only(device.audit_report(), "51a")
    frontend.mem_table()
    for i in (HIPRIO, NOTIFY, REQUEST):
        frontend.setup_queue(i)
    frontend.post_notify_buffers()
    frontend.add_status(DRIVER_OK)
    frontend.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(REQUEST, 0))
    assert_only(device.audit_report(), "51a", "51b")


# -- descriptor chains --------------------------------------------------------------------
@pytest.fixture
def live(device: RefDevice, frontend: RawFrontend) -> RawFrontend:
    frontend.bring_up()
    frontend.init()
    frontend.queues[REQUEST].wait_used(1)
    assert device.audit_report().ok
    return frontend


def _getattr_request(fe: RawFrontend, opcode: int = abi.Opcode.GETATTR) -> tuple[int, int]:
    if opcode == abi.Opcode.INIT:
        body = abi.pack("fuse_init_in", major=7, minor=38, max_readahead=0, flags=0)
    else:
        body = abi.pack("fuse_getattr_in")
    n = abi.IN_HEADER_SIZE + len(body)
    data = IN_HEADER.pack(n, opcode, 8, 1, 0, 0, 0, 0, 0) + body
    return fe.alloc(n, data), n


def test_writable_before_readable(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    addr, n = _getattr_request(live)
    q.offer(q.chain([(live.alloc(256), 256, rl.VRING_DESC_F_WRITE), (addr, n, 0)]))
    report = wait_result(device, "27")
    assert_only(report, "27")
    assert "queue 2 (request) chain" in report.entry("27").observed


def test_indirect_rules(make_device) -> None:
    """INDIRECT without negotiation; with NEXT; nested; a table longer than the queue."""
    cases = {
        "30a": dict(negotiate=False),
        "30c": dict(with_next=True),
        "30b": dict(nested=True),
        "30d": dict(entries=QSIZE + 1),
    }
    for sid, case in cases.items():
        dev = make_device()
        fe = RawFrontend(dev.socket_path)
        try:
            features = fe.standard_features()
            if not case.get("negotiate", True):
                features &= ~F_INDIRECT
            fe.negotiate(features)
            fe.mem_table()
            for i in (HIPRIO, NOTIFY, REQUEST):
                fe.setup_queue(i)
            fe.post_notify_buffers()
            fe.add_status(DRIVER_OK)
            q = fe.queues[REQUEST]
            addr, n = _getattr_request(fe, abi.Opcode.INIT)
            entries = case.get("entries", 2)
            table = fe.alloc(16 * entries)
            for i in range(entries):
                last = i == entries - 1
                if case.get("nested") and last:
                    sub = fe.alloc(16)
                    rl.DESC.pack_into(fe.mem, sub, fe.alloc(64), 64, rl.VRING_DESC_F_WRITE, 0)
                    desc = (sub, 16, rl.VRING_DESC_F_INDIRECT, 0)
                elif i == 0:
                    desc = (addr, n, rl.VRING_DESC_F_NEXT, 1)
                else:
                    flags = rl.VRING_DESC_F_WRITE | (0 if last else rl.VRING_DESC_F_NEXT)
                    desc = (fe.alloc(64), 64, flags, 0 if last else i + 1)
                rl.DESC.pack_into(fe.mem, table + 16 * i, *desc)
            flags = rl.VRING_DESC_F_INDIRECT
            if case.get("with_next"):
                flags |= rl.VRING_DESC_F_NEXT
                q.write_desc(1, fe.alloc(64), 64, rl.VRING_DESC_F_WRITE)
            q.write_desc(0, table, 16 * entries, flags, 1)
            q.offer(0)
            report = wait_result(dev, sid)
            assert_only(report, sid)
        finally:
            fe.close()


def test_chain_longer_than_four_gib(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    addr, n = _getattr_request(live)
    big = rl.VRING_DESC_F_WRITE
    q.offer(q.chain([(addr, n, 0), (0x80000, 0xFFFF_FFFF, big), (0x80000, 0xFFFF_FFFF, big)]))
    report = wait_result(device, "28")
    assert_only(report, "28")


def test_avail_idx_decremented(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    q.set_avail_idx(0)  # was 1
    q.kick()
    report = wait_result(device, "31")
    assert "from 1 to 0" in report.entry("31").observed
    assert_only(report, "31")


def test_avail_idx_too_far_ahead(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    q.set_avail_idx(1 + QSIZE + 1)
    q.kick()
    assert_only(wait_result(device, "31b"), "31b")


def test_avail_flags_other_than_0_or_1(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    q.set_avail_flags(2)
    addr, n = _getattr_request(live)
    q.offer(q.chain([(addr, n, 0), (live.alloc(256), 256, rl.VRING_DESC_F_WRITE)]))
    q.wait_used(2)
    assert_only(wait_result(device, "32"), "32")


def test_buffers_made_available_without_a_kick(device: RefDevice, live: RawFrontend) -> None:
    q = live.queues[REQUEST]
    addr, n = _getattr_request(live)
    q.offer(q.chain([(addr, n, 0), (live.alloc(256), 256, rl.VRING_DESC_F_WRITE)]), kick=False)
    report = wait_result(device, "36")
    assert "avail idx went from 1 to 2" in report.entry("36").observed
    assert_only(report, "36")
    q.kick()  # late: the device serves it now
    q.wait_used(2)


def test_no_kick_past_avail_event(make_device) -> None:
    dev = make_device()
    fe = RawFrontend(dev.socket_path)
    try:
        fe.negotiate(fe.standard_features() | F_EVENT_IDX)
        fe.mem_table()
        for i in (HIPRIO, NOTIFY, REQUEST):
            fe.setup_queue(i)
        fe.post_notify_buffers()
        fe.add_status(DRIVER_OK)
        fe.queues[NOTIFY].kick()
        fe.init()
        q = fe.queues[REQUEST]
        q.wait_used(1)
        avail_event = rl.avail_event_offset(QSIZE)
        deadline = time.monotonic() + 3
        while struct.unpack_from("<H", fe.mem, q.used + avail_event)[0] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        addr, n = _getattr_request(fe)
        q.offer(q.chain([(addr, n, 0), (fe.alloc(256), 256, rl.VRING_DESC_F_WRITE)]),
                kick=False)
        report = wait_result(dev, "37")
        assert "avail_event asked for a kick at 1" in report.entry("37").observed
        assert_only(report, "37")
    finally:
        fe.close()


def test_exposed_descriptor_altered(device: RefDevice, live: RawFrontend) -> None:
    """A notification buffer waits in the ring; the driver rewrites its descriptor
    before the device uses it."""
    q = live.queues[NOTIFY]
    assert q.avail_idx == 4
    q.write_desc(0, q.fe.alloc(128), 128, rl.VRING_DESC_F_WRITE)
    session = device.sessions[0]
    session._post_lock_notification(1234, 0)  # what the lock table does on a grant
    q.wait_used(1)
    report = wait_result(device, "25")
    assert_only(report, "25")
    assert "chain 0" in report.entry("25").observed


# -- the virtio-fs queues -----------------------------------------------------------------
@pytest.mark.parametrize("buffer,observed", [
    ({"size": 48}, "48 writable"),  # too small
    ({"readable": 16}, "16 readable"),  # a notification buffer is device-writable only
])
def test_notification_buffer_unfit(device: RefDevice, frontend: RawFrontend, buffer: dict,
                                   observed: str) -> None:
    frontend.negotiate()
    frontend.mem_table()
    for i in (HIPRIO, NOTIFY, REQUEST):
        frontend.setup_queue(i)
    frontend.post_notify_buffers(1, **buffer)
    frontend.add_status(DRIVER_OK)
    frontend.queues[NOTIFY].kick()
    report = wait_result(device, "63")
    assert observed in report.entry("63").observed
    assert_only(report, "63")


def test_no_notification_buffer_at_driver_ok_is_a_warning(
    device: RefDevice, frontend: RawFrontend
) -> None:
    frontend.bring_up(notify_buffers=0)
    frontend.init()
    frontend.queues[REQUEST].wait_used(1)
    report = settle(device, frontend)
    assert_only(report, "64")
    assert report.ok and [e.id for e in report.warnings] == ["64"]
    assert "warning" in report.format_table()


def test_normal_request_on_hiprio(device: RefDevice, live: RawFrontend) -> None:
    live.request(HIPRIO, abi.Opcode.GETATTR, abi.pack("fuse_getattr_in"), unique=10)
    live.queues[HIPRIO].wait_used(1)
    report = wait_result(device, "61")
    assert "GETATTR on the hiprio queue" in report.entry("61").observed
    assert_only(report, "61")


def test_forget_on_a_request_queue(device: RefDevice, live: RawFrontend) -> None:
    live.request(REQUEST, abi.Opcode.FORGET, abi.pack("fuse_forget_in", nlookup=1), reply=0)
    live.queues[REQUEST].wait_used(2)
    report = wait_result(device, "60")
    assert "FORGET on a request queue" in report.entry("60").observed
    assert_only(report, "60")


def test_request_before_fuse_init(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.bring_up()
    frontend.request(REQUEST, abi.Opcode.GETATTR, abi.pack("fuse_getattr_in"))
    frontend.queues[REQUEST].wait_used(1)
    assert_only(wait_result(device, "67"), "67")


def test_big_endian_fuse_init(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.bring_up()
    frontend.init(big_endian=True)
    frontend.queues[REQUEST].wait_used(1)
    report = wait_result(device, "67b")
    assert_only(report, "67b")
    # §1.5 lets the driver choose the byte order: a warning (for interop), not a failure
    assert report.entry("67b").level == "SHOULD" and report.ok, report.format_table()


# -- probes ---------------------------------------------------------------------------------
def test_probe_refuse_features_ok_catches_a_driver_that_goes_on(make_device) -> None:
    dev = make_device(audit_probes={"refuse-features-ok"})
    fe = RawFrontend(dev.socket_path)
    try:
        fe.reset()
        fe.add_status(ACK)
        fe.add_status(DRIVER)
        fe.set_features(fe.standard_features())
        fe.add_status(FEATURES_OK)
        assert not fe.read_status() & FEATURES_OK  # refused
        fe.mem_table()
        fe.setup_queue(HIPRIO)  # goes on regardless
    finally:
        fe.close()
    assert dev.wait_sessions_closed()
    report = dev.audit_report()
    assert_only(report, "19", "19b")
    assert "after the device refused FEATURES_OK" in report.entry("19").observed
    assert "no FAILED" in report.entry("19b").observed


def test_probe_refuse_features_ok_a_frontend_that_stops(make_device) -> None:
    dev = make_device(audit_probes={"refuse-features-ok"})
    fe = RawFrontend(dev.socket_path)
    try:
        fe.reset()
        fe.add_status(ACK | DRIVER)
        fe.set_features(fe.standard_features())
        fe.add_status(FEATURES_OK)
        assert not fe.read_status() & FEATURES_OK
        fe.add_status(FAILED)
        fe.reset()
    finally:
        fe.close()
    assert dev.wait_sessions_closed()
    report = dev.audit_report()
    assert report.ok and not report.warnings, report.format_table()
    assert {report.result(s) for s in ("3", "19", "19b")} == {HELD}


def test_probe_unknown_feature(make_device) -> None:
    dev = make_device(audit_probes={"unknown-feature"})
    fe = RawFrontend(dev.socket_path)
    try:
        assert fe.offered & 1 << 23
        fe.reset()
        fe.add_status(ACK | DRIVER)
        fe.set_features(fe.standard_features() | 1 << 23)  # accepts what it cannot know
    finally:
        fe.close()  # and gives up before DRIVER_OK
    assert dev.wait_sessions_closed()
    report = dev.audit_report()
    assert_only(report, "7", "9")
    assert "0x800000" in report.entry("7").observed


def test_unknown_probe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit probe"):
        RefDevice(str(tmp_path / "s.sock"), str(tmp_path), audit=True, audit_probes={"x"})


def test_report_as_dict(device: RefDevice, frontend: RawFrontend) -> None:
    frontend.bring_up()
    frontend.set_status(ACK)  # clears DRIVER, FEATURES_OK, DRIVER_OK
    d = device.audit_report().to_dict()
    assert d["ok"] is False and d["violated"] == ["2"]
    assert d["checklist_size"] == CHECKLIST_SIZE and d["covered"] == len(d["covered_items"])
    entry = next(s for s in d["statements"] if s["id"] == "2")
    assert entry["result"] == VIOLATED and entry["level"] == "MUST"
    assert "clears" in entry["observed"] and entry["statement"].startswith("The driver MUST")
    assert {s["result"] for s in d["statements"]} <= {HELD, VIOLATED, NOT_EXERCISED}


def test_the_device_without_audit_offers_no_status(tmp_path: Path, sock_dir: str) -> None:
    dev = RefDevice(os.path.join(sock_dir, "plain.sock"), str(tmp_path))
    with dev:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(dev.socket_path)
        vu.send_message(s, Request.GET_PROTOCOL_FEATURES)
        _, _, data, _ = vu.recv_message(s)
        s.close()
        assert not vu.U64.unpack(data)[0] & ProtocolFeature.STATUS
        with pytest.raises(Exception, match="auditing mode"):
            dev.audit_report()
