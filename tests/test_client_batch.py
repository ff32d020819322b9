"""The typed client's batched path (FuseClient.submit_many / publish / reap; the
native core's vfsdrv_client_add and vfsdrv_client_harvest): many requests in flight,
one publish and one kick per batch, every completion of a wake harvested at once,
every reply checked by the core's rule -- against the null device, the reference
device (whose replies a test rewrites) and Debian's virtiofsd."""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfsdrv._native import ffi
from vfsdrv.errors import VfsdrvError
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.batch import CDONE, CREQ, BatchPending
from vfsdrv.fs.client import ROOT_ID, Attr, FuseClient, StatFs
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev import fuse_server
from vfsdrv.refdev.fuse_server import FuseServer
from vfsdrv.tools.nulldev import NullDevice
from vfsdrv.virtio.vhost_user import VhostUserTransport

GETATTR_IN = abi.pack("fuse_getattr_in")
PATTERN_MOD = 251  # the null device's "pattern" file: the byte at offset o is o % 251


pytestmark = pytest.mark.usefixtures("nulldev_source")


@pytest.fixture
def null(sock_dir: str) -> Iterator[tuple[NullDevice, FuseClient]]:
    sock = Path(sock_dir) / "n.sock"
    dev = NullDevice(sock, tag="batch")
    fs = None
    try:
        fs = VirtioFs(VhostUserTransport(str(sock))).start()
        c = FuseClient(fs)
        c.init()
        yield dev, c
        fs.close()
        dev.stop()
        assert dev.proc.returncode == 0, dev.log()  # a clean exit, no crash
        assert "broken" not in dev.log()
    finally:
        if fs is not None:
            fs.close()
        dev.stop()


def attr_of(reply: bytes) -> Attr:
    out = abi.unpack("fuse_attr_out", reply)  # the owner: .attr is a view into it
    return Attr.from_c(out.attr)


def statfs_of(reply: bytes) -> StatFs:
    out = abi.unpack("fuse_statfs_out", reply)
    st = out.st
    return StatFs(st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namelen,
                  st.frsize)


def reap_all(c: FuseClient, want: int) -> list:
    got: list = []
    while len(got) < want:
        done = c.reap(10)
        assert done, f"{len(got)} of {want} completed, then nothing for 10 s"
        got += done
    assert c.reap(0) == []  # nothing more than was sent
    return got


def _pattern(offset: int, size: int) -> bytes:
    return bytes((offset + i) % PATTERN_MOD for i in range(size))


# -- the null device ---------------------------------------------------------------------
def test_a_batch_is_published_once_with_one_kick(null) -> None:
    dev, c = null
    fs = c.fs
    vq = fs.request_queues[0].vq
    before = dev.counters()
    batch = c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 32)
    assert all(isinstance(p, BatchPending) for p in batch)
    done = reap_all(c, 32)
    delta = dev.counters() - before
    # the device was asleep: the batch costs it exactly one kick and one wake-up
    assert (delta.requests, delta.kicks, delta.wakes) == (32, 1, 1), delta
    assert {id(p) for p in done} == {id(p) for p in batch}
    for p in done:
        assert attr_of(p.result(0)).mode == 0o40755
    assert vq.in_flight == 0 and fs.batch.in_flight == 0

    # publish=False stages; nothing reaches the device before publish()
    before = dev.counters()
    staged = [c.submit(Opcode.GETATTR, ROOT_ID, GETATTR_IN, publish=False) for _ in range(8)]
    assert vq.in_flight == 0 and not any(p.done for p in staged)
    c.publish()
    assert vq.in_flight == 8
    reap_all(c, 8)
    delta = dev.counters() - before
    assert (delta.requests, delta.kicks) == (8, 1), delta

    # one at a time, as before: a kick per request
    before = dev.counters()
    for _ in range(5):
        assert c.getattr(ROOT_ID).mode == 0o40755
    assert (dev.counters() - before).kicks == 5


def test_many_in_flight_of_every_kind_all_correct(null) -> None:
    dev, c = null
    pat = c.lookup(ROOT_ID, "pattern")
    ph = c.open(pat.nodeid)
    data = os.urandom(9000)
    reqs: list[tuple] = []
    checks = []
    for i in range(60):
        kind = i % 4
        if kind == 0:
            reqs.append((Opcode.GETATTR, pat.nodeid, GETATTR_IN))
            checks.append(lambda r: attr_of(r).size == 64 << 20)
        elif kind == 1:
            reqs.append((Opcode.LOOKUP, ROOT_ID, b"pattern\0"))
            checks.append(lambda r: abi.unpack("fuse_entry_out", r).nodeid == pat.nodeid)
        elif kind == 2:  # large slots: more than the pool's 16, so staging waits for some
            reqs.append((Opcode.READ, pat.nodeid,
                         abi.pack("fuse_read_in", fh=ph.fh, offset=i * 4099, size=4096 + i)))
            checks.append(lambda r, i=i: bytes(r) == _pattern(i * 4099, 4096 + i))
        else:  # two parts, as write() sends them
            size = 100 + i * 37
            reqs.append((Opcode.WRITE, pat.nodeid,
                         abi.pack("fuse_write_in", fh=ph.fh, offset=i, size=size), data[:size]))
            checks.append(lambda r, size=size: abi.unpack("fuse_write_out", r).size == size)
    pendings = c.submit_many(reqs)
    done = reap_all(c, len(reqs))
    assert len({id(p) for p in done}) == len(reqs)
    for k, (p, check) in enumerate(zip(pendings, checks, strict=True)):
        assert check(p.result(0)), (k, reqs[k][0])
    # more requests than small slots (64): the pool runs dry and refills mid-batch
    many = c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 200)
    reap_all(c, 200)  # some completed while staging waited for slots: reaped all the same
    assert all(attr_of(p.result(0)).ino == ROOT_ID for p in many)
    assert c.fs.free_slots == (64, 16)
    c.release(pat.nodeid, ph.fh)


def test_one_at_a_time_calls_share_the_queue_with_a_batch(null) -> None:
    dev, c = null
    c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 16)
    # a synchronous call while the batch is in flight: its chain is the Python
    # path's (a token), harvested with the batch's by the native harvest
    e = c.lookup(ROOT_ID, "hello")
    h = c.open(e.nodeid)
    assert c.read(e.nodeid, h.fh, 0, 4096) == b"hello from the null device\n"
    done = reap_all(c, 16)
    assert all(p.completion == 0 for p in done)
    # result() of a staged request publishes it first
    p = c.submit(Opcode.GETATTR, ROOT_ID, GETATTR_IN, publish=False)
    assert attr_of(p.result(5)).ino == ROOT_ID
    assert c.reap(0) == [p]
    # an error reply completes its request with the errno
    p = c.submit_many([(Opcode.LOOKUP, ROOT_ID, b"missing\0"),
                       (Opcode.GETXATTR, ROOT_ID, abi.pack("fuse_getxattr_in", size=64),
                        b"user.x\0")])
    reap_all(c, 2)
    with pytest.raises(FileNotFoundError):
        p[0].result()
    with pytest.raises(OSError) as exc:
        p[1].result()
    assert exc.value.errno == errno.ENODATA
    # a request with no body, and one whose body comes in parts
    st, mk = c.submit_many([(Opcode.STATFS, ROOT_ID),
                            (Opcode.LOOKUP, ROOT_ID, b"hel", b"lo\0")])
    reap_all(c, 2)
    assert statfs_of(st.result(0)).namelen == 255
    assert abi.unpack("fuse_entry_out", mk.result(0)).nodeid == e.nodeid
    # hiprio requests in a batch go the one-at-a-time way (no reply: done at once)
    f = c.submit_many([(Opcode.FORGET, e.nodeid, abi.pack("fuse_forget_in", nlookup=1)),
                       (Opcode.GETATTR, ROOT_ID, GETATTR_IN)])
    assert not isinstance(f[0], BatchPending) and isinstance(f[1], BatchPending)
    assert len(reap_all(c, 2)) == 2
    assert c.getattr(ROOT_ID).mode == 0o40755


def test_a_full_ring_queues_the_rest_in_order(sock_dir: str) -> None:
    sock = Path(sock_dir) / "n.sock"
    with NullDevice(sock, tag="batch") as dev:
        fs = VirtioFs(VhostUserTransport(str(sock)), queue_size=8).start()
        try:
            c = FuseClient(fs)
            c.init()
            vq = fs.request_queues[0].vq
            pendings = c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 40)
            # as many as the ring holds went in; the rest wait behind it
            assert vq.in_flight <= 8 and len(fs.request_queues[0].pending) >= 32
            assert fs.stats["queue_full"] >= 1
            done = reap_all(c, 40)
            assert {id(p) for p in done} == {id(p) for p in pendings}
            assert all(attr_of(p.result(0)).ino == ROOT_ID
                       for p in pendings)
            assert vq.in_flight == 0 and fs.free_slots == (64, 16)
            assert dev.counters().requests >= 41  # INIT and the 40
        finally:
            fs.close()


# -- the reference device, one reply rewritten ------------------------------------------------
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("fault", ["unique", "positive-error", "too-long"])
def test_a_bad_reply_in_a_batch_fails_only_its_request(monkeypatch, device_factory, connect,
                                                        export_dir: Path, ring: str,
                                                        fault: str) -> None:
    real = FuseServer.handle

    def handle(self: FuseServer, request: bytes, reply_room: int):
        out = real(self, request, reply_room)
        opcode = struct.unpack_from("<I", request, 4)[0]
        if opcode == Opcode.LOOKUP and request[abi.IN_HEADER_SIZE:] == b"f7\0":
            edited = bytearray(out)
            if fault == "unique":
                struct.pack_into("<Q", edited, 8, struct.unpack_from("<Q", edited, 8)[0] + 2)
            elif fault == "positive-error":
                struct.pack_into("<i", edited, 4, 5)
            else:  # the header claims more than the device wrote
                struct.pack_into("<I", edited, 0, len(edited) + 8)
            return bytes(edited)
        return out

    monkeypatch.setattr(fuse_server.FuseServer, "handle", handle)
    for i in range(16):
        (export_dir / f"f{i}").write_bytes(b"x" * i)
    dev = device_factory()
    fs = VirtioFs(VhostUserTransport(dev.socket_path))
    fs.dev.ring = ring
    fs.start()
    try:
        c = FuseClient(fs)
        c.init()
        assert fs.request_queues[0].vq.packed == (ring == "packed")
        pendings = c.submit_many([(Opcode.LOOKUP, ROOT_ID, f"f{i}".encode() + b"\0")
                                  for i in range(16)])
        reap_all(c, 16)
        for i, p in enumerate(pendings):
            if i == 7:
                with pytest.raises(OSError) as exc:
                    p.result(0)
                assert exc.value.errno == errno.EIO
            else:
                e = abi.unpack("fuse_entry_out", p.result(0))
                assert (e.attr.size, stat.S_IFMT(e.attr.mode)) == (i, stat.S_IFREG)
        assert fs.stats["bad_reply"] == 1 and fs.batch.bad_replies == 1
        # the queue goes on
        assert c.lookup(ROOT_ID, "f3").attr.size == 3
        again = c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 4)
        reap_all(c, 4)
        assert all(p.completion == 0 for p in again)
    finally:
        fs.close()


# -- Debian's virtiofsd ------------------------------------------------------------------
def test_batches_against_virtiofsd(client: FuseClient, export_dir: Path) -> None:
    for i in range(40):
        (export_dir / f"n{i}").write_bytes(os.urandom(i * 100))
    c = client
    looked = c.submit_many([(Opcode.LOOKUP, ROOT_ID, f"n{i}".encode() + b"\0")
                            for i in range(40)])
    reap_all(c, 40)
    entries = [abi.unpack("fuse_entry_out", p.result(0)) for p in looked]
    assert [e.attr.size for e in entries] == [i * 100 for i in range(40)]
    assert len({e.nodeid for e in entries}) == 40
    ids = [e.nodeid for e in entries]
    # a second batch on the node ids: attributes, then reads of the data
    attrs = c.submit_many([(Opcode.GETATTR, n, GETATTR_IN) for n in ids])
    opens = c.submit_many([(Opcode.OPEN, n, abi.pack("fuse_open_in", flags=os.O_RDONLY))
                           for n in ids[:10]])
    reap_all(c, 50)
    assert [attr_of(p.result(0)).ino for p in attrs] == \
        [os.stat(export_dir / f"n{i}").st_ino for i in range(40)]
    fhs = [abi.unpack("fuse_open_out", p.result(0)).fh for p in opens]
    reads = c.submit_many([(Opcode.READ, ids[i], abi.pack("fuse_read_in", fh=fhs[i],
                                                          size=4096)) for i in range(10)])
    reap_all(c, 10)
    for i, p in enumerate(reads):
        assert p.result(0) == (export_dir / f"n{i}").read_bytes()
    rel = c.submit_many([(Opcode.RELEASE, ids[i], abi.pack("fuse_release_in", fh=fhs[i]))
                         for i in range(10)])
    missing = c.submit_many([(Opcode.LOOKUP, ROOT_ID, b"nothing-here\0")])
    reap_all(c, 11)
    assert all(p.result(0) == b"" for p in rel)
    with pytest.raises(FileNotFoundError):
        missing[0].result(0)
    # one at a time still works on the same queue
    assert c.getattr(ids[5]).size == 500
    assert c.fs.free_slots == (64, 16)


def test_a_device_that_dies_fails_the_whole_batch(sock_dir: str) -> None:
    sock = Path(sock_dir) / "n.sock"
    with NullDevice(sock, tag="batch") as dev:
        fs = VirtioFs(VhostUserTransport(str(sock))).start()
        try:
            c = FuseClient(fs)
            c.init()
            os.kill(dev.pid, signal.SIGSTOP)  # it cannot answer any of them
            pendings = c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)] * 8)
            assert fs.batch.in_flight == 8
            os.kill(dev.pid, signal.SIGKILL)
            done = c.reap(10)
            assert {id(p) for p in done} == {id(p) for p in pendings}
            for p in done:
                with pytest.raises(VfsdrvError):  # why the device failed, not ENOTCONN
                    p.result(0)
            assert fs.batch.in_flight == 0 and fs.broken is not None
            with pytest.raises(VfsdrvError):
                c.submit_many([(Opcode.GETATTR, ROOT_ID, GETATTR_IN)])
        finally:
            fs.close()


def test_the_native_records_match_their_struct_layouts() -> None:
    # the Python side packs and unpacks them by hand: the C compiler's view must agree
    assert CREQ.size == ffi.sizeof("struct vfsdrv_creq") == 40
    assert CDONE.size == ffi.sizeof("struct vfsdrv_cdone") == 32
    for name, off in [("slot", 0), ("opcode", 4), ("unique", 8), ("nodeid", 16), ("uid", 24),
                      ("gid", 28), ("pid", 32), ("body_len", 36)]:
        assert ffi.offsetof("struct vfsdrv_creq", name) == off
    for name, off in [("slot", 0), ("head", 4), ("len", 8), ("error", 12),
                      ("payload_off", 16), ("payload_len", 20), ("bad", 24)]:
        assert ffi.offsetof("struct vfsdrv_cdone", name) == off
