"""The reference device's FUSE server against what users found (issue 10): names over
NAME_MAX, O_DIRECT files, locks that outlived their file or their open file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_refdev_fuse_server import ROOM, init, reply, request
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev.fuse_server import FuseServer
from vfsdrv.refdev.lock_table import F_RDLCK, F_WRLCK, OFFSET_MAX, Lock, LockTable

LONG = b"n" * 256


@pytest.fixture
def server(tmp_path: Path) -> FuseServer:
    (tmp_path / "f").write_bytes(b"abcdefgh" * 1024)
    (tmp_path / "d").mkdir()
    s = FuseServer(str(tmp_path), 1, LockTable())
    init(s)
    return s


def _err(server: FuseServer, opcode: int, body: bytes, nodeid: int = 1) -> int:
    return reply(server.handle(request(opcode, 100, nodeid, body), ROOM))[1]


def _lookup(server: FuseServer, name: bytes, parent: int = 1) -> int:
    got = reply(server.handle(request(Opcode.LOOKUP, 4, parent, name + b"\0"), ROOM))
    assert got[1] == 0, got
    return abi.unpack("fuse_entry_out", got[3]).nodeid


def test_names_over_name_max_are_enametoolong(server: FuseServer) -> None:
    f = _lookup(server, b"f")
    long0 = LONG + b"\0"
    cases = {
        Opcode.LOOKUP: long0,
        Opcode.CREATE: abi.pack("fuse_create_in", flags=os.O_RDWR, mode=0o644) + long0,
        Opcode.MKDIR: abi.pack("fuse_mkdir_in", mode=0o755) + long0,
        Opcode.MKNOD: abi.pack("fuse_mknod_in", mode=0o100644) + long0,
        Opcode.SYMLINK: long0 + b"target\0",
        Opcode.UNLINK: long0,
        Opcode.RMDIR: long0,
        Opcode.RENAME: abi.pack("fuse_rename_in", newdir=1) + b"f\0" + long0,
        Opcode.RENAME2: abi.pack("fuse_rename2_in", newdir=1) + long0 + b"g\0",
        Opcode.LINK: abi.pack("fuse_link_in", oldnodeid=f) + long0,
    }
    got = {op.name: _err(server, op, body) for op, body in cases.items()}
    assert got == {op.name: -errno.ENAMETOOLONG for op in cases}
    # 255 bytes is still a name; a slash or an empty name stays EINVAL
    assert _err(server, Opcode.MKDIR, abi.pack("fuse_mkdir_in", mode=0o755) + LONG[1:] + b"\0") == 0
    assert _err(server, Opcode.LOOKUP, b"a/b\0") == -errno.EINVAL
    assert _err(server, Opcode.UNLINK, b"\0") == -errno.EINVAL


def _open(server: FuseServer, nodeid: int, flags: int) -> int:
    got = reply(server.handle(
        request(Opcode.OPEN, 6, nodeid, abi.pack("fuse_open_in", flags=flags)), ROOM))
    assert got[1] == 0, got
    return abi.unpack("fuse_open_out", got[3]).fh


def _create(server: FuseServer, name: bytes, flags: int = os.O_RDWR) -> tuple[int, int]:
    body = abi.pack("fuse_create_in", flags=flags | os.O_CREAT, mode=0o644) + name + b"\0"
    got = reply(server.handle(request(Opcode.CREATE, 8, 1, body), ROOM))
    assert got[1] == 0, got
    entry = abi.unpack("fuse_entry_out", got[3])
    out = abi.unpack("fuse_open_out", got[3], abi.sizeof("fuse_entry_out"))
    return entry.nodeid, out.fh


def test_o_direct_reads_and_writes_at_any_offset(server: FuseServer, tmp_path: Path) -> None:
    f = _lookup(server, b"f")
    fh = _open(server, f, os.O_RDWR | os.O_DIRECT)
    read = abi.pack("fuse_read_in", fh=fh, offset=3, size=5)
    got = reply(server.handle(request(Opcode.READ, 10, f, read), ROOM))
    assert (got[1], got[3]) == (0, b"defgh")
    write = abi.pack("fuse_write_in", fh=fh, offset=1, size=3) + b"XYZ"
    got = reply(server.handle(request(Opcode.WRITE, 12, f, write), ROOM))
    assert got[1] == 0 and abi.unpack("fuse_write_out", got[3]).size == 3
    assert (tmp_path / "f").read_bytes()[:5] == b"aXYZe"
    node, fh2 = _create(server, b"new", os.O_RDWR | os.O_DIRECT)
    write = abi.pack("fuse_write_in", fh=fh2, offset=0, size=7) + b"created"
    assert reply(server.handle(request(Opcode.WRITE, 14, node, write), ROOM))[1] == 0
    assert (tmp_path / "new").read_bytes() == b"created"


def _lk(fh: int, owner: int, type_: int = F_WRLCK, flock: bool = False) -> bytes:
    return abi.pack("fuse_lk_in", fh=fh, owner=owner,
                    lk=dict(start=0, end=OFFSET_MAX, type=type_, pid=0),
                    lk_flags=abi.FUSE_LK_FLOCK if flock else 0)


def _setlk(server: FuseServer, nodeid: int, fh: int, owner: int, flock: bool = False) -> int:
    return _err(server, Opcode.SETLK, _lk(fh, owner, flock=flock), nodeid)


def _release(server: FuseServer, nodeid: int, fh: int, flush_owner: int | None = None) -> None:
    if flush_owner is not None:
        flush = abi.pack("fuse_flush_in", fh=fh, lock_owner=flush_owner)
        assert _err(server, Opcode.FLUSH, flush, nodeid) == 0
    assert _err(server, Opcode.RELEASE, abi.pack("fuse_release_in", fh=fh), nodeid) == 0


def test_ofd_lock_ends_with_its_open_file(server: FuseServer) -> None:
    """Linux's close of an OFD-locked file sends FLUSH with the process's owner and a
    RELEASE without one: the lock (owner = the open file) must go at RELEASE."""
    f = _lookup(server, b"f")
    fh1, fh2 = _open(server, f, os.O_RDWR), _open(server, f, os.O_RDWR)
    assert _setlk(server, f, fh1, owner=0xF11E) == 0
    assert _setlk(server, f, fh2, owner=0xF22E) == -errno.EAGAIN
    _release(server, f, fh1, flush_owner=0x9009)  # the process's files, not the lock's owner
    assert _setlk(server, f, fh2, owner=0xF22E) == 0


def test_a_process_lock_survives_another_process_closing_the_shared_open_file(
    server: FuseServer,
) -> None:
    """fork: parent P and child C share fh1. P closes fd1 (FLUSH P), locks again via
    fh2; C's last close of fh1 (FLUSH C, RELEASE fh1) must not take P's new lock."""
    p_owner, c_owner = 0x1111, 0x2222
    f = _lookup(server, b"f")
    fh1, fh2, other = (_open(server, f, os.O_RDWR) for _ in range(3))
    assert _setlk(server, f, fh1, p_owner) == 0
    flush = abi.pack("fuse_flush_in", fh=fh1, lock_owner=p_owner)
    assert _err(server, Opcode.FLUSH, flush, f) == 0
    assert _setlk(server, f, fh2, p_owner) == 0
    _release(server, f, fh1, flush_owner=c_owner)
    assert _setlk(server, f, other, 0x3333) == -errno.EAGAIN


def test_flock_ends_with_its_open_file_even_without_the_release_flag(
    server: FuseServer,
) -> None:
    f = _lookup(server, b"f")
    fh1, fh2 = _open(server, f, os.O_RDWR), _open(server, f, os.O_RDWR)
    assert _setlk(server, f, fh1, owner=0xA, flock=True) == 0
    assert _setlk(server, f, fh2, owner=0xB, flock=True) == -errno.EAGAIN
    _release(server, f, fh1)
    assert _setlk(server, f, fh2, owner=0xB, flock=True) == 0


def test_a_new_file_reusing_the_inode_number_has_no_locks(
    server: FuseServer, tmp_path: Path,
) -> None:
    node, fh = _create(server, b"old")
    old_ino = os.stat(tmp_path / "old").st_ino
    assert _setlk(server, node, fh, owner=0x77) == 0
    assert _err(server, Opcode.UNLINK, b"old\0") == 0
    _release(server, node, fh)
    forget = abi.pack("fuse_forget_in", nlookup=1)
    assert server.handle(request(Opcode.FORGET, 20, node, forget), ROOM) is None
    node2, fh2 = _create(server, b"new2")
    reused = os.stat(tmp_path / "new2").st_ino == old_ino
    assert _setlk(server, node2, fh2, owner=0x88) == 0, f"inode number reused: {reused}"


def test_the_last_close_of_a_file_drops_every_lock_left_on_it() -> None:
    """The table's own rule, whatever a driver sent: no open file, no lock (and no
    waiter, which is told EBADF)."""
    table = LockTable()
    key = (1, 2)
    done: list[int] = []
    table.open_file(key)
    table.open_file(key)
    table.set(key, Lock((1, 1), 0, 9, F_WRLCK, 0))
    table.set(key, Lock((1, 2), 0, OFFSET_MAX, F_WRLCK, 0), flock=True)
    want = Lock((2, 1), 0, 0, F_RDLCK, 0)
    assert table.set_wait(key, want, False, 5, done.append) == 1
    table.close_file(key)
    assert table.locks(key) and table.open_files(key) == 1
    table.close_file(key)
    assert table.locks(key) == [] and table.locks(key, flock=True) == []
    assert done == [-errno.EBADF] and table.waiting() == 0
    assert table.open_files(key) == 0
    assert table.test(key, Lock((3, 1), 0, OFFSET_MAX, F_WRLCK, 0)) is None


def test_session_end_closes_its_files_in_the_lock_table(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    table = LockTable()
    server = FuseServer(str(tmp_path), 1, table)
    init(server)
    f = _lookup(server, b"f")
    _open(server, f, os.O_RDONLY)
    key = (os.stat(tmp_path / "f").st_dev, os.stat(tmp_path / "f").st_ino)
    assert table.open_files(key) == 1
    server.close()
    assert table.open_files(key) == 0


def _as(uid: int, gid: int, opcode: int, nodeid: int, body: bytes) -> bytes:
    """A request from uid/gid (the header's requester)."""
    head = abi.pack("fuse_in_header", len=abi.IN_HEADER_SIZE + len(body), opcode=opcode,
                    unique=200, nodeid=nodeid, uid=uid, gid=gid)
    return head + body


def test_create_of_a_name_that_exists_keeps_its_owner_and_mode(server: FuseServer,
                                                              tmp_path: Path) -> None:
    """CREATE without O_EXCL of a file another frontend made since the guest's LOOKUP
    opens it as open(O_CREAT) would: its owner and mode stay (they used to become the
    opener's, and the mode the one asked for)."""
    victim = tmp_path / "f"
    os.chown(victim, 0, 0)
    victim.chmod(0o600)
    body = abi.pack("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100666) + b"f\0"
    got = reply(server.handle(_as(1000, 1000, Opcode.CREATE, 1, body), ROOM))
    assert got[1] == 0, got
    st = victim.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o600)
    assert victim.read_bytes() == b"abcdefgh" * 1024  # opened, not replaced
    excl = abi.pack("fuse_create_in", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL,
                    mode=0o100666) + b"f\0"
    assert reply(server.handle(_as(1000, 1000, Opcode.CREATE, 1, excl), ROOM))[1] == \
        -errno.EEXIST
    new = abi.pack("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100640) + b"g\0"
    assert reply(server.handle(_as(1000, 1001, Opcode.CREATE, 1, new), ROOM))[1] == 0
    st = (tmp_path / "g").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1001, 0o640)


def test_a_set_group_id_directory_gives_its_group_and_keeps_the_bit(server: FuseServer,
                                                                    tmp_path: Path) -> None:
    """In a set-group-ID directory a new entry takes the directory's group and a new
    directory keeps S_ISGID, as on a local file system (virtiofsd does the same)."""
    d = tmp_path / "d"
    os.chown(d, 0, 100)
    d.chmod(0o2777)
    dnode = _lookup(server, b"d")
    mk = abi.pack("fuse_mkdir_in", mode=0o40755) + b"sub\0"
    assert reply(server.handle(_as(1000, 1000, Opcode.MKDIR, dnode, mk), ROOM))[1] == 0
    st = (d / "sub").stat()
    assert (st.st_uid, st.st_gid) == (1000, 100)
    assert st.st_mode & 0o7777 == 0o2755
    cr = abi.pack("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o100644) + b"f\0"
    assert reply(server.handle(_as(1000, 1000, Opcode.CREATE, dnode, cr), ROOM))[1] == 0
    st = (d / "f").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 100, 0o644)


def test_no_set_group_id_file_of_a_group_the_creator_is_not_in(server: FuseServer,
                                                               tmp_path: Path) -> None:
    """In a set-group-ID directory of another group, a new executable asked set-group-ID
    by a non-root creator loses the bit (Linux's mode_strip_sgid; CVE-2022-0358 in
    virtiofsd): the creator must not get a program that runs as the directory's group.
    Root, or the directory's own group, keeps it."""
    d = tmp_path / "d"
    os.chown(d, 0, 1)
    d.chmod(0o2777)
    dnode = _lookup(server, b"d")
    for name, uid, gid, kept in ((b"nobody", 65534, 65534, False), (b"member", 65534, 1, True),
                                 (b"root", 0, 0, True)):
        cr = abi.pack("fuse_create_in", flags=os.O_RDWR | os.O_CREAT, mode=0o102755)
        assert reply(server.handle(_as(uid, gid, Opcode.CREATE, dnode, cr + name + b"\0"),
                                   ROOM))[1] == 0
        st = (d / name.decode()).stat()
        assert st.st_gid == 1 and bool(st.st_mode & 0o2000) == kept, (name, oct(st.st_mode))
