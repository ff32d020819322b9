"""The typed client refuses replies no file system can give, as Linux's fs/fuse does
(issue 10 items 5 and 7): the reference device serves, and one of its replies is
rewritten on the way out, so the driver, rings and client are the real ones."""

from __future__ import annotations

import errno
import fcntl
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient, InvalidReplyError, Lock
from vfsdrv.refdev import fuse_server
from vfsdrv.refdev.fuse_server import FuseServer

Tamper = Callable[[bytes, bytearray], None]
HDR = abi.OUT_HEADER_SIZE
_DIRENT = struct.Struct("<QQII")


@pytest.fixture
def tampered(monkeypatch, device_factory, connect, export_dir: Path):
    """(client, rules): rules[opcode](request, reply) may rewrite a reply in place."""
    rules: dict[int, Tamper] = {}
    real = FuseServer.handle

    def handle(self: FuseServer, request: bytes, reply_room: int):
        out = real(self, request, reply_room)
        opcode = struct.unpack_from("<I", request, 4)[0]
        if out is not None and opcode in rules and struct.unpack_from("<i", out, 4)[0] == 0:
            edited = bytearray(out)
            rules[opcode](request, edited)
            struct.pack_into("<I", edited, 0, len(edited))
            return bytes(edited)
        return out

    monkeypatch.setattr(fuse_server.FuseServer, "handle", handle)
    for i in range(5):
        (export_dir / f"e{i}").write_bytes(b"x")
    client: FuseClient = connect(device_factory())
    return client, rules


def _edit(reply: bytearray, struct_name: str, at: int, /, **fields) -> None:
    obj = abi.unpack(struct_name, reply, at)
    for name, value in fields.items():
        target = obj
        *path, last = name.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    reply[at : at + abi.sizeof(struct_name)] = bytes(abi.ffi.buffer(obj))


def _dirents(reply: bytearray) -> list[int]:
    """Positions of the dirents in a READDIR reply."""
    pos, out = HDR, []
    while pos < len(reply):
        out.append(pos)
        pos += abi.dirent_size(_DIRENT.unpack_from(reply, pos)[2])
    return out


def _request_offset(request: bytes) -> int:
    return abi.unpack("fuse_read_in", request, abi.IN_HEADER_SIZE).offset


def _one_dirent(reply: bytearray, off: int) -> None:
    """The payload becomes a single entry "x" whose next offset is `off`."""
    del reply[HDR:]
    reply += _DIRENT.pack(99, off, 1, stat.S_IFREG >> 12) + b"x".ljust(7, b"\0")


# -- item 5: endless directories -------------------------------------------------------
def test_offsets_that_never_advance_are_an_error(tampered) -> None:
    client, rules = tampered
    calls = [0]

    def stuck(request: bytes, reply: bytearray) -> None:
        calls[0] += 1
        if calls[0] > 200:  # without the check the reader would loop forever
            del reply[HDR:]
            return
        for pos in _dirents(reply):
            struct.pack_into("<Q", reply, pos + 8, 3)

    rules[Opcode.READDIR] = stuck
    with pytest.raises(InvalidReplyError, match="no progress") as info:
        client.readdir_all(ROOT_ID)
    assert info.value.errno == errno.EIO and calls[0] == 2


def test_offsets_that_cycle_are_an_error(tampered) -> None:
    client, rules = tampered
    calls = [0]

    def cycle(request: bytes, reply: bytearray) -> None:
        calls[0] += 1
        if calls[0] > 200:
            del reply[HDR:]
            return
        _one_dirent(reply, {0: 7, 7: 9, 9: 7}.get(_request_offset(request), 7))

    rules[Opcode.READDIR] = cycle
    with pytest.raises(InvalidReplyError, match="offset 7 again"):
        client.readdir_all(ROOT_ID)
    assert calls[0] == 3


def test_a_directory_without_end_is_bounded(tampered) -> None:
    client, rules = tampered
    calls = [0]

    def endless(request: bytes, reply: bytearray) -> None:
        calls[0] += 1
        if calls[0] > 500:
            del reply[HDR:]
            return
        _one_dirent(reply, _request_offset(request) + 1)  # always a new offset

    rules[Opcode.READDIR] = endless
    with pytest.raises(InvalidReplyError, match="more than 100 entries"):
        client.readdir_all(ROOT_ID, max_entries=100)
    assert calls[0] == 101


# -- item 7: impossible data ------------------------------------------------------------
@pytest.mark.parametrize("bad", [b"/", b"\0"])
def test_dirent_names_with_a_slash_or_nul_are_refused(tampered, bad: bytes) -> None:
    client, rules = tampered

    def poison(request: bytes, reply: bytearray) -> None:
        last = _dirents(reply)[-1]
        reply[last + _DIRENT.size] = bad[0]

    rules[Opcode.READDIR] = poison
    with pytest.raises(InvalidReplyError, match="holds '/' or NUL") as info:
        client.readdir_all(ROOT_ID)
    assert info.value.errno == errno.EIO
    rules[Opcode.READDIRPLUS] = poison
    rules.pop(Opcode.READDIR)
    assert len(client.readdir_all(ROOT_ID)) == 7  # the plain listing is fine again


def test_readdirplus_entry_with_an_impossible_attr_or_the_root_id(tampered) -> None:
    client, rules = tampered

    def last_entry(**fields):
        def rule(request: bytes, reply: bytearray) -> None:
            if len(reply) == HDR:
                return  # the end of the listing
            pos, last = HDR, HDR
            while pos < len(reply):
                last = pos
                namelen = _DIRENT.unpack_from(reply, pos + abi.sizeof("fuse_entry_out"))[2]
                pos += abi.direntplus_size(namelen)
            _edit(reply, "fuse_entry_out", last, **fields)
        return rule

    rules[Opcode.READDIRPLUS] = last_entry(**{"attr.mode": 0o644})  # no file type
    with pytest.raises(InvalidReplyError, match="no valid file type"):
        client.readdir_all(ROOT_ID, plus=True)
    rules[Opcode.READDIRPLUS] = last_entry(nodeid=ROOT_ID)
    with pytest.raises(InvalidReplyError, match="root"):
        client.readdir_all(ROOT_ID, plus=True)
    rules[Opcode.READDIRPLUS] = last_entry(nodeid=0, **{"attr.mode": 0})  # "no entry": fine
    assert len(client.readdir_all(ROOT_ID, plus=True)) == 7


def test_lookup_with_node_id_0_is_a_negative_entry(tampered) -> None:
    client, rules = tampered
    rules[Opcode.LOOKUP] = lambda rq, rp: _edit(rp, "fuse_entry_out", HDR, nodeid=0)
    with pytest.raises(FileNotFoundError):
        client.lookup(ROOT_ID, "e0")


@pytest.mark.parametrize("fields, match", [
    ({"attr.mode": 0o170644}, "no valid file type"),
    ({"attr.size": 1 << 63}, "LLONG_MAX"),
])
def test_lookup_and_getattr_with_impossible_attributes(tampered, fields, match) -> None:
    client, rules = tampered
    rules[Opcode.LOOKUP] = lambda rq, rp: _edit(rp, "fuse_entry_out", HDR, **fields)
    with pytest.raises(InvalidReplyError, match=match):
        client.lookup(ROOT_ID, "e1")
    del rules[Opcode.LOOKUP]
    node = client.lookup(ROOT_ID, "e1").nodeid
    rules[Opcode.GETATTR] = lambda rq, rp: _edit(rp, "fuse_attr_out", HDR, **fields)
    with pytest.raises(InvalidReplyError, match=match) as info:
        client.getattr(node)
    assert info.value.errno == errno.EIO
    rules[Opcode.SETATTR] = rules[Opcode.GETATTR]
    with pytest.raises(InvalidReplyError, match=match):
        client.setattr(node, mode=0o600)


@pytest.mark.parametrize("nodeid", [0, ROOT_ID])
def test_create_and_mkdir_need_a_new_node(tampered, nodeid: int) -> None:
    client, rules = tampered
    rules[Opcode.CREATE] = lambda rq, rp: _edit(rp, "fuse_entry_out", HDR, nodeid=nodeid)
    with pytest.raises(InvalidReplyError, match=f"node id {nodeid}"):
        client.create(ROOT_ID, f"c{nodeid}")
    rules[Opcode.MKDIR] = rules[Opcode.CREATE]
    with pytest.raises(InvalidReplyError, match=f"node id {nodeid}"):
        client.mkdir(ROOT_ID, f"d{nodeid}")


def test_a_created_object_of_another_type_is_refused(tampered) -> None:
    client, rules = tampered
    rules[Opcode.MKDIR] = lambda rq, rp: _edit(
        rp, "fuse_entry_out", HDR, **{"attr.mode": stat.S_IFREG | 0o644})
    with pytest.raises(InvalidReplyError, match="asked for type"):
        client.mkdir(ROOT_ID, "dd")
    rules[Opcode.CREATE] = lambda rq, rp: _edit(
        rp, "fuse_entry_out", HDR, **{"attr.mode": stat.S_IFDIR | 0o755})
    with pytest.raises(InvalidReplyError, match="asked for type"):
        client.create(ROOT_ID, "cc")


def test_getlk_with_a_backwards_range_and_listxattr_without_nul(tampered) -> None:
    client, rules = tampered
    e, h = client.create(ROOT_ID, "lk")
    rules[Opcode.GETLK] = lambda rq, rp: _edit(
        rp, "fuse_lk_out", HDR, **{"lk.start": 10, "lk.end": 5, "lk.type": fcntl.F_WRLCK})
    with pytest.raises(InvalidReplyError, match="range"):
        client.getlk(e.nodeid, h.fh, 1, Lock(0, 9, fcntl.F_WRLCK, 0))
    client.setxattr(e.nodeid, "user.a", b"1")

    def unterminated(rq: bytes, rp: bytearray) -> None:
        del rp[-1]

    rules[Opcode.LISTXATTR] = unterminated
    with pytest.raises(InvalidReplyError, match="LISTXATTR"):
        client.listxattr(e.nodeid)


def test_lseek_past_llong_max_and_copying_more_than_asked(tampered) -> None:
    client, rules = tampered
    e, h = client.create(ROOT_ID, "seek")
    client.write(e.nodeid, h.fh, 0, b"0123456789")
    rules[Opcode.LSEEK] = lambda rq, rp: _edit(rp, "fuse_lseek_out", HDR, offset=1 << 63)
    with pytest.raises(InvalidReplyError, match="LSEEK"):
        client.lseek(e.nodeid, h.fh, 0, 3)  # SEEK_DATA
    rules[Opcode.COPY_FILE_RANGE] = lambda rq, rp: _edit(rp, "fuse_write_out", HDR, size=9)
    with pytest.raises(InvalidReplyError, match="COPY_FILE_RANGE"):
        client.copy_file_range(e.nodeid, h.fh, 0, e.nodeid, h.fh, 20, 4)
