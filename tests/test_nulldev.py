"""The null device (benchmarks/nulldev.c), the fixture `vfsdrv bench` measures the
driver against: built with the system's C compiler, started as its own process, and
driven over vhost-user by the driver's typed client with 16 requests in flight on
every request queue; then by a raw client that breaks the rules, which the device
must refuse loudly and survive."""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfsdrv._native import lib
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.tools.bench import RawClient
from vfsdrv.tools.nulldev import Counters, NullDevice
from vfsdrv.virtio.vhost_user import VhostUserTransport

DEPTH = 16
PER_OP = 200  # requests of each kind
PATTERN_MOD = 251  # the "pattern" file: the byte at offset o is o % 251
STATUS_NEEDS_RESET = 64


pytestmark = pytest.mark.usefixtures("nulldev_source")


@pytest.fixture
def sock_path() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="nulldev-", dir="/tmp")  # short: sun_path is 108 bytes
    yield Path(d) / "n.sock"
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def _attr_size(reply: bytes) -> int:
    out = abi.unpack("fuse_attr_out", reply)  # kept alive: .attr is a view into it
    return out.attr.size


def _expect_pattern(offset: int, size: int) -> bytes:
    return bytes((offset + i) % PATTERN_MOD for i in range(size))


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_typed_client_at_depth_16_on_every_queue(sock_path: Path, event_idx: bool) -> None:
    with NullDevice(sock_path, queues=3, tag="nulltest", event_idx=event_idx) as dev:
        fs = VirtioFs(VhostUserTransport(str(sock_path))).start()
        try:
            # the device's config space, not a fallback: tag and queue count
            assert fs.config.tag == "nulltest"
            assert fs.config.num_request_queues == 3
            assert len(fs.request_queues) == 3
            c = FuseClient(fs)
            out = c.init()
            assert (out.major, out.max_write) == (7, 1 << 20)
            assert c.getattr(ROOT_ID).mode == 0o40755
            hello = c.lookup(ROOT_ID, "hello")
            h = c.open(hello.nodeid)
            assert c.read(hello.nodeid, h.fh, 0, 4096) == b"hello from the null device\n"
            pat = c.lookup(ROOT_ID, "pattern")
            ph = c.open(pat.nodeid)
            with pytest.raises(FileNotFoundError):
                c.lookup(ROOT_ID, "missing")
            with pytest.raises(OSError) as exc:
                c.getxattr(ROOT_ID, "user.x")
            assert exc.value.errno == errno.ENODATA

            # 16 in flight at all times, each kind of request in turn; every reply checked
            data = os.urandom(8192)
            kinds = {
                "getattr": lambda i: ((Opcode.GETATTR, pat.nodeid, abi.pack("fuse_getattr_in")),
                                      lambda r: _attr_size(r) == 64 << 20),
                "lookup": lambda i: ((Opcode.LOOKUP, ROOT_ID, b"pattern\0"),
                                     lambda r: abi.unpack("fuse_entry_out", r).nodeid
                                     == pat.nodeid),
                "read": lambda i: ((Opcode.READ, pat.nodeid,
                                    abi.pack("fuse_read_in", fh=ph.fh, offset=i * 4099,
                                             size=4096 + i)),
                                   lambda r, i=i: bytes(r) == _expect_pattern(i * 4099, 4096 + i)),
                "write": lambda i: ((Opcode.WRITE, pat.nodeid,
                                     abi.pack("fuse_write_in", fh=ph.fh, offset=i,
                                              size=100 + i * 37), data[:100 + i * 37]),
                                    lambda r, i=i: abi.unpack("fuse_write_out", r).size
                                    == 100 + i * 37),
            }
            for name, make in kinds.items():
                inflight: deque = deque()
                done = 0
                for i in range(PER_OP):
                    (op, node, *parts), check = make(i)
                    inflight.append((c.submit(op, node, *parts), check, i))
                    if len(inflight) == DEPTH:
                        p, chk, k = inflight.popleft()
                        assert chk(p.result(10)), (name, k)
                        done += 1
                while inflight:
                    p, chk, k = inflight.popleft()
                    assert chk(p.result(10)), (name, k)
                    done += 1
                assert done == PER_OP
            c.release(pat.nodeid, ph.fh)
            c.release(hello.nodeid, h.fh)
            assert c.statfs().namelen == 255
        finally:
            fs.close()
        dev.stop()
        assert dev.proc.returncode == 0, dev.log()  # a clean exit on SIGTERM, no crash
        served = dev.queue_requests()
    # every request queue (1..3) carried part of the load; hiprio (0) none of it
    assert set(served) >= {1, 2, 3}, dev.log()
    assert sum(served[q] for q in (1, 2, 3)) >= 4 * PER_OP, served
    assert "broken" not in dev.log()


def _raw(sock_path: Path) -> RawClient:
    raw = RawClient(sock_path, 4, 4096)
    raw.set_request(0, Opcode.INIT, 0, abi.pack(
        "fuse_init_in", major=7, minor=38, max_readahead=4096), 64)
    raw.post(0)
    raw.kick()
    assert raw.reap() == [0]
    return raw


def test_a_request_with_a_lying_header_gets_einval(sock_path: Path) -> None:
    with NullDevice(sock_path) as dev:
        raw = _raw(sock_path)
        try:
            raw.set_request(1, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
            struct.pack_into("<I", raw.bufs[1][0].view, 0, 4000)  # fuse_in_header.len
            raw.post(1)
            raw.kick()
            assert raw.reap() == [1]
            length, error = struct.unpack_from("<Ii", raw.bufs[1][1].view, 4096 - 16)
            assert (length, error) == (16, -errno.EINVAL)
            # and the queue goes on: a proper GETATTR is answered
            raw.set_request(1, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
            raw.post(1)
            raw.kick()
            assert raw.reap() == [1]
            length, error = struct.unpack_from("<Ii", raw.bufs[1][1].view, 4096 - 16)
            assert (length, error) == (16 + 104, 0)
        finally:
            raw.close()
        dev.stop()
        assert dev.proc.returncode == 0, dev.log()
        assert "header says 4000 bytes" in dev.log()


@pytest.mark.parametrize("fault", ["head", "next", "address", "avail-idx"])
def test_a_broken_ring_is_refused_loudly_and_the_device_survives(sock_path: Path,
                                                                 fault: str) -> None:
    with NullDevice(sock_path) as dev:
        raw = _raw(sock_path)
        try:
            raw.set_request(1, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
            if fault == "head":
                raw.post(1)
                struct.pack_into("<H", raw.avail, 4 + 2 * ((raw.avail_idx - 1) % raw.size),
                                 raw.size + 5)
            elif fault == "next":
                struct.pack_into("<H", raw.desc, 32 + 14, raw.size)  # desc 2's next
                raw.post(1)
            elif fault == "address":
                struct.pack_into("<Q", raw.desc, 32 + 16, 1 << 40)  # desc 3's address
                raw.post(1)
            else:  # the driver claims more entries than the ring holds
                raw.avail_idx = (raw.avail_idx + raw.size + 1) & 0xFFFF
                lib.vfsdrv_store_release_u16(raw._avail_idx_ptr, raw.avail_idx)
            raw.kick()
            # the device stops the queue and says so in its status (with STATUS)
            _until(dev, lambda: raw.t.get_status() & STATUS_NEEDS_RESET)
            assert dev.proc.poll() is None
        finally:
            raw.close()
        # the next connection is served as if nothing happened
        fs = VirtioFs(VhostUserTransport(str(sock_path))).start()
        try:
            c = FuseClient(fs)
            c.init()
            assert c.getattr(ROOT_ID).ino == ROOT_ID
        finally:
            fs.close()
        dev.stop()
        assert dev.proc.returncode == 0, dev.log()
        log = dev.log()
    assert "queue 1 broken" in log, log
    expected = {"head": "out of range", "next": "next", "address": "outside guest memory",
                "avail-idx": "more than the size"}[fault]
    assert expected in log, log


def _until(dev: NullDevice, cond: Callable[[], object]) -> None:
    """Wait (5 s at most) until cond() holds; else fail with the device's log."""
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, dev.log()
        time.sleep(0.001)


def _settled(dev: NullDevice, cond: Callable[[Counters], bool]) -> Counters:
    deadline = time.monotonic() + 5
    while not cond(c := dev.counters()):
        assert time.monotonic() < deadline, c
        time.sleep(0.001)
    return c


def test_one_kick_for_sixteen_requests_is_one_batch_and_one_interrupt(sock_path: Path) -> None:
    with NullDevice(sock_path) as dev:
        raw = RawClient(sock_path, DEPTH, 4096)
        try:
            raw.set_request(0, Opcode.INIT, 0, abi.pack(
                "fuse_init_in", major=7, minor=38, max_readahead=4096), 64)
            raw.post(0)
            raw.kick()
            raw.reap()
            # the device counts a batch and its interrupt just after publishing it, and
            # INIT's kick maybe later (a thread that found INIT before its first sleep)
            before = _settled(dev, lambda c: c.interrupts == 1 and c.kicks == 1)
            time.sleep(0.02)  # usually back in poll(): see the bounds below for when not
            for k in range(DEPTH):
                raw.set_request(k, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
                raw.post(k)
            raw.kick()
            done: list[int] = []
            while len(done) < DEPTH:
                done += raw.reap()
            assert sorted(done) == list(range(DEPTH))
            c = _settled(dev, lambda c: c.kicks > before.kicks
                         and c.requests == before.requests + DEPTH) - before
            # one kick, one wake; the 16 in one batch with one interrupt, or in two if the
            # thread was still on its last look at the ring when the first ones came
            assert (c.requests, c.kicks, c.wakes) == (DEPTH, 1, 1)
            assert 1 <= c.interrupts <= c.batches <= 2, c
        finally:
            raw.close()


def test_no_interrupt_while_the_driver_suppresses_them(sock_path: Path) -> None:
    with NullDevice(sock_path, event_idx=False) as dev:
        raw = _raw(sock_path)
        try:
            struct.pack_into("<H", raw.avail, 0, 1)  # avail->flags: VRING_AVAIL_F_NO_INTERRUPT
            before = _settled(dev, lambda c: c.interrupts == 1)  # INIT's
            try:
                os.eventfd_read(raw.call_fd)  # INIT's interrupt, if reap left it
            except BlockingIOError:
                pass
            raw.set_request(1, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
            raw.post(1)
            raw.kick()
            _until(dev, lambda: lib.vfsdrv_load_acquire_u16(raw._used_idx_ptr) != raw.last_used)
            c = dev.counters() - before
            assert (c.requests, c.interrupts) == (1, 0)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(raw.call_fd)  # nothing signalled
        finally:
            raw.close()


def test_event_idx_kicks_and_interrupts_as_the_indexes_say(sock_path: Path) -> None:
    with NullDevice(sock_path) as dev:
        raw = RawClient(sock_path, 4, 4096, event_idx=True)
        try:
            used_event = 4 + 2 * raw.size  # after avail->ring[size]
            avail_event = 4 + 8 * raw.size  # after used->ring[size]
            raw.set_request(0, Opcode.INIT, 0, abi.pack(
                "fuse_init_in", major=7, minor=38, max_readahead=4096), 64)
            raw.post(0)
            raw.kick()
            assert raw.reap() == [0]
            # asleep, the device asks for a kick when entry 1 is made available
            _until(dev, lambda: struct.unpack_from("<H", raw.used, avail_event)[0] == 1)
            _settled(dev, lambda c: c.interrupts == 1)
            try:
                os.eventfd_read(raw.call_fd)
            except BlockingIOError:
                pass
            # used_event far ahead: the completion comes without an interrupt
            struct.pack_into("<H", raw.avail, used_event, raw.last_used + 100)
            raw.set_request(1, Opcode.GETATTR, ROOT_ID, abi.pack("fuse_getattr_in"), 104)
            raw.post(1)
            raw.kick()
            _until(dev, lambda: lib.vfsdrv_load_acquire_u16(raw._used_idx_ptr) != raw.last_used)
            assert raw.reap() == [1]
            assert _settled(dev, lambda c: c.requests == 2).interrupts == 1
            with pytest.raises(BlockingIOError):
                os.eventfd_read(raw.call_fd)
            # used_event at the next entry: that completion interrupts (reap waits for it)
            struct.pack_into("<H", raw.avail, used_event, raw.last_used)
            raw.post(1)
            raw.kick()
            assert raw.reap() == [1]
            assert raw.stalls == 0
            assert _settled(dev, lambda c: c.requests == 3).interrupts == 2
        finally:
            raw.close()


def test_vfsdrv_check_passes_the_null_device(sock_path: Path) -> None:
    """The fixture is a conformant device as far as `vfsdrv check` sees it (a name
    over NAME_MAX is ENAMETOOLONG, as any file system's)."""
    from vfsdrv.conformance import CheckOptions
    from vfsdrv.tools.check import check_vhost_user

    with NullDevice(sock_path):
        report = check_vhost_user(str(sock_path), CheckOptions(timeout=2.0))
    assert report.ok, report.table()
    checks = {c.id: c for c in report.checks}
    assert checks["fuse.errors[ENAMETOOLONG]"].result == "pass"
