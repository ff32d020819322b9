"""The reference device's FUSE server on its own: framing, session rules, errors,
and the SETLKW wait protocol as bytes on the wire."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev.fuse_server import FuseServer
from vfsdrv.refdev.lock_table import F_WRLCK, OFFSET_MAX, LockTable

ROOM = 1 << 16


def request(opcode: int, unique: int, nodeid: int = 1, body: bytes = b"") -> bytes:
    head = abi.pack(
        "fuse_in_header", len=abi.IN_HEADER_SIZE + len(body), opcode=opcode, unique=unique,
        nodeid=nodeid,
    )
    return head + body


def reply(data: bytes | None) -> tuple[int, int, int, bytes]:
    assert data is not None
    length, error, unique = struct.unpack_from("<IiQ", data)
    assert length == len(data)
    return length, error, unique, data[16:]


def init(server: FuseServer, minor: int = 38) -> tuple[int, int, int, bytes]:
    return reply(server.handle(
        request(Opcode.INIT, 2, 0, abi.pack("fuse_init_in", major=7, minor=minor)), ROOM
    ))


@pytest.fixture
def server(tmp_path: Path) -> FuseServer:
    (tmp_path / "f").write_bytes(b"abc")
    return FuseServer(str(tmp_path), 1, LockTable())


def test_requests_before_init_get_eio_and_old_protocols_eproto(server: FuseServer) -> None:
    assert reply(server.handle(request(Opcode.GETATTR, 4, body=bytes(16)), ROOM))[1] == -errno.EIO
    assert init(server, minor=26)[1] == -errno.EPROTO
    _, error, unique, payload = init(server)
    out = abi.unpack("fuse_init_out", payload)
    assert (error, unique, out.major, out.minor) == (0, 2, 7, 38)
    assert out.max_write == 1 << 20 and out.max_pages == 256


def test_minor_is_the_smaller_of_both(server: FuseServer) -> None:
    assert abi.unpack("fuse_init_out", init(server, minor=31)[3]).minor == 31


def test_unknown_opcode_short_body_and_bad_length(server: FuseServer) -> None:
    init(server)
    assert reply(server.handle(request(Opcode.IOCTL, 4), ROOM))[1] == -errno.ENOSYS
    assert reply(server.handle(request(Opcode.GETLK, 6, body=bytes(8)), ROOM))[1] == -errno.EINVAL
    bad = bytearray(request(Opcode.GETATTR, 8, body=bytes(16)))
    bad[0:4] = struct.pack("<I", 1000)  # longer than what was sent
    assert reply(server.handle(bytes(bad), ROOM))[1] == -errno.EINVAL


def test_a_reply_that_does_not_fit_is_eoverflow(server: FuseServer) -> None:
    init(server)
    assert reply(server.handle(request(Opcode.GETATTR, 4, body=bytes(16)), 40))[1] == (
        -errno.EOVERFLOW
    )


def test_names_with_a_slash_are_refused(server: FuseServer) -> None:
    init(server)
    assert reply(server.handle(request(Opcode.LOOKUP, 4, body=b"../etc\0"), ROOM))[1] == (
        -errno.EINVAL
    )


def _open(server: FuseServer, unique: int) -> tuple[int, int]:
    entry = abi.unpack("fuse_entry_out", reply(server.handle(
        request(Opcode.LOOKUP, unique, body=b"f\0"), ROOM))[3])
    nodeid = entry.nodeid
    out = abi.unpack("fuse_open_out", reply(server.handle(
        request(Opcode.OPEN, unique + 2, nodeid, abi.pack("fuse_open_in", flags=os.O_RDWR)),
        ROOM))[3])
    return nodeid, out.fh


def _lk(fh: int, owner: int) -> bytes:
    return abi.pack("fuse_lk_in", fh=fh, owner=owner,
                    lk=dict(start=0, end=OFFSET_MAX, type=F_WRLCK, pid=0))


def test_setlkw_wait_reply_then_notification(server: FuseServer) -> None:
    sent: list[tuple[int, int]] = []
    server.notify_lock = lambda unique, error: sent.append((unique, error))
    init(server)
    nodeid, fh = _open(server, 4)
    assert reply(server.handle(request(Opcode.SETLK, 8, nodeid, _lk(fh, 1)), ROOM))[1] == 0
    wait = server.handle(request(Opcode.SETLKW, 10, nodeid, _lk(fh, 2)), ROOM)
    assert wait == abi.pack("fuse_out_header", len=16, error=abi.FUSE_LOCK_WAIT, unique=10)
    assert sent == []
    flush = abi.pack("fuse_flush_in", fh=fh, lock_owner=1)
    assert reply(server.handle(request(Opcode.FLUSH, 12, nodeid, flush), ROOM))[1] == 0
    assert sent == [(10, 0)]


def test_interrupt_read_before_its_setlkw_still_interrupts(server: FuseServer) -> None:
    server.notify_lock = lambda unique, error: None
    init(server)
    nodeid, fh = _open(server, 4)
    server.handle(request(Opcode.SETLK, 8, nodeid, _lk(fh, 1)), ROOM)
    interrupt = request(Opcode.INTERRUPT, 11, 0, abi.pack("fuse_interrupt_in", unique=10))
    assert server.handle(interrupt, ROOM) is None  # no reply, nothing to cancel yet
    got = reply(server.handle(request(Opcode.SETLKW, 10, nodeid, _lk(fh, 2)), ROOM))
    assert got[1] == -errno.EINTR
    assert server.locks.waiting() == 0


def test_destroy_and_a_new_init_end_the_session(server: FuseServer) -> None:
    init(server)
    nodeid, fh = _open(server, 4)
    server.handle(request(Opcode.SETLK, 8, nodeid, _lk(fh, 1)), ROOM)
    assert server.locks.locks((os.stat(server.source + "/f").st_dev,
                               os.stat(server.source + "/f").st_ino))
    init(server)  # a new session: the old nodes, handles and locks are gone
    assert reply(server.handle(request(Opcode.GETATTR, 10, nodeid, bytes(16)), ROOM))[1] == (
        -errno.ESTALE
    )
    st = os.stat(server.source + "/f")
    assert server.locks.locks((st.st_dev, st.st_ino)) == []
    assert reply(server.handle(request(Opcode.DESTROY, 12, 0), ROOM))[1] == 0
    assert reply(server.handle(request(Opcode.GETATTR, 14, 1, bytes(16)), ROOM))[1] == -errno.EIO


def test_random_requests_always_get_a_well_formed_answer(
    server: FuseServer, caplog: pytest.LogCaptureFixture
) -> None:
    """3000 requests with random opcodes, node ids and bodies (seeded): each gets
    a well-formed reply (or none, for FORGET/INTERRUPT) and nothing escapes."""
    import random

    rng = random.Random(7)
    server.notify_lock = lambda unique, error: None
    # MKNOD is left out: random modes would create device nodes as root
    opcodes = [op for op in Opcode if op != Opcode.MKNOD] + [0, 99, 4096]
    init(server)
    for i in range(3000):
        if i % 500 == 0:
            init(server)
        opcode = rng.choice(opcodes)
        body = rng.randbytes(rng.choice([0, 1, 8, 16, 24, 40, 48, 64, 100]))
        if rng.random() < 0.5:
            body += rng.choice([b"f\0", b"new\0", b"..\0", b"d\0x\0"])
        nodeid = rng.choice([0, 1, 2, 3, 1 << 40])
        data = server.handle(request(opcode, 2 * i + 100, nodeid, body), ROOM)
        if data is None:
            assert opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT)
            continue
        length, error, unique, _ = reply(data)
        assert unique == 2 * i + 100
        assert -4095 <= error <= 0 or (opcode == Opcode.SETLKW and error == abi.FUSE_LOCK_WAIT)
        assert error == 0 or length == 16
    # every failure was an expected one: none went through the catch-all for bugs
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_times_before_1970_and_negative_lseek_offsets_are_signed(server: FuseServer) -> None:
    """fuse_attr's and fuse_setattr_in's seconds and fuse_lseek_in's offset are u64
    on the wire, signed (two's complement) for the kernel."""
    init(server)
    nodeid, fh = _open(server, 4)
    setattr = abi.pack("fuse_setattr_in", valid=abi.FATTR_ATIME | abi.FATTR_MTIME,
                       atime=(-315619200) & (2**64 - 1), atimensec=250_000_000,
                       mtime=(-1) & (2**64 - 1), mtimensec=500_000_000)
    _, error, _, payload = reply(server.handle(request(Opcode.SETATTR, 8, nodeid, setattr),
                                               ROOM))
    assert error == 0
    st = os.stat(server.source + "/f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-315619200 * 10**9 + 250_000_000, -500_000_000)
    for data in (payload, reply(server.handle(request(Opcode.GETATTR, 10, nodeid, bytes(16)),
                                              ROOM))[3]):
        attr = abi.unpack("fuse_attr_out", data).attr
        signed = struct.unpack("<qq", struct.pack("<QQ", attr.atime, attr.mtime))
        assert signed == (-315619200, -1)
        assert (attr.atimensec, attr.mtimensec) == (250_000_000, 500_000_000)
    lseek = abi.pack("fuse_lseek_in", fh=fh, offset=(-1) & (2**64 - 1), whence=os.SEEK_DATA)
    assert reply(server.handle(request(Opcode.LSEEK, 12, nodeid, lseek), ROOM))[1] == -errno.ENXIO
    lseek = abi.pack("fuse_lseek_in", fh=fh, offset=1, whence=os.SEEK_DATA)
    _, error, _, payload = reply(server.handle(request(Opcode.LSEEK, 14, nodeid, lseek), ROOM))
    assert error == 0 and abi.unpack("fuse_lseek_out", payload).offset == 1


def test_a_write_goes_where_the_kernel_says(server: FuseServer) -> None:
    """The host file is opened without O_APPEND, and each WRITE lands at its offset,
    O_APPEND in its flags or not: the kernel works an append's offset out, and the
    chunks of one direct write may be served in any order by several queues."""
    init(server)
    entry = abi.unpack("fuse_entry_out", reply(server.handle(
        request(Opcode.LOOKUP, 4, body=b"f\0"), ROOM))[3])
    opened = abi.pack("fuse_open_in", flags=os.O_WRONLY | os.O_APPEND)
    fh = abi.unpack("fuse_open_out", reply(server.handle(
        request(Opcode.OPEN, 6, entry.nodeid, opened), ROOM))[3]).fh

    def write(unique: int, offset: int, flags: int, data: bytes) -> None:
        body = abi.pack("fuse_write_in", fh=fh, offset=offset, size=len(data), flags=flags)
        _, error, _, payload = reply(server.handle(
            request(Opcode.WRITE, unique, entry.nodeid, body + data), ROOM))
        assert error == 0 and abi.unpack("fuse_write_out", payload).size == len(data)

    write(8, 0, os.O_WRONLY, b"Z")  # O_APPEND cleared by F_SETFL: in place
    write(12, 5, os.O_WRONLY | os.O_APPEND, b"Q")  # a later chunk, served first
    write(10, 3, os.O_WRONLY | os.O_APPEND, b"XY")  # the kernel's append offset
    assert (Path(server.source) / "f").read_bytes() == b"ZbcXYQ"
