"""A typed FUSE client over a virtio-fs device: one method per FUSE operation.

Errors come back as OSError with the device's errno. Every method is synchronous;
`VirtioFs.call_async` (used by `submit`) keeps many requests in flight.

Batches: `submit(..., publish=False)` (or `submit_many`) stages requests without
showing them to the device; `publish()` adds them all and publishes once, with at
most one kick per queue; `reap()` waits for completions and returns every batched
request done so far. That path runs in the native core (vfsdrv.fs.batch,
driver/native/client.c) and checks every reply with the same rule as the others.

Replies are checked as Linux's fs/fuse checks them before believing them: a file
type that does not exist or a size over LLONG_MAX (fuse_invalid_attr), node id 0
or the root's id for a new entry, a created object of another type than asked,
dirent names that are empty, too long or hold '/' (or NUL), lock ranges that run
backwards. Such a reply raises InvalidReplyError, an OSError with errno EIO, as
the kernel's answer to the program would be. A LOOKUP answered with node id 0 is
a negative entry (ENOENT), as in the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ProtocolError, VfsdrvError
from . import abi
from .abi import IN_HEADER_SIZE, Opcode
from .batch import CREQ, BatchPending, NativeBatch
from .device import Pending, VirtioFs
from .sizing import reply_capacity

ROOT_ID = 1
#: the longest name the kernel accepts in a dirent (FUSE_NAME_MAX)
NAME_MAX = 1024
LLONG_MAX = (1 << 63) - 1
#: READDIR batches readdir_all follows before it calls the directory endless
MAX_DIR_ENTRIES = 1 << 20
_VALID_TYPES = frozenset({
    stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
    stat.S_IFSOCK,
})


#: after a SETLKW's timeout, how long the device has to answer its FUSE_INTERRUPT
SETLKW_WITHDRAW_WAIT = 5.0


class InvalidReplyError(ProtocolError, OSError):
    """The device answered with something no file system can hold (errno EIO)."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)


def check_attr(a, what: str) -> None:
    """fuse_invalid_attr: a file type that exists, a size the kernel can hold."""
    if stat.S_IFMT(a.mode) not in _VALID_TYPES:
        raise InvalidReplyError(f"{what}: mode {a.mode:#o} has no valid file type")
    if a.size > LLONG_MAX:
        raise InvalidReplyError(f"{what}: size {a.size} exceeds LLONG_MAX")


def check_new_entry(e, what: str, fmt: int | None = None) -> None:
    """What a reply creating a name must be (create_new_entry, fuse_create_open): a
    real node (not 0, not the root) of the type asked for."""
    if e.nodeid in (0, ROOT_ID):
        raise InvalidReplyError(f"{what}: new entry with node id {e.nodeid}")
    check_attr(e.attr, what)
    if fmt is not None and stat.S_IFMT(e.attr.mode) != fmt:
        raise InvalidReplyError(
            f"{what}: asked for type {fmt:#o}, the device made {stat.S_IFMT(e.attr.mode):#o}"
        )


def check_dirent_name(name: bytes, pos: int) -> None:
    """parse_dirfile's rules, and no NUL: a name no directory can hold is refused."""
    if not name or len(name) > NAME_MAX:
        raise InvalidReplyError(f"dirent name length {len(name)} at offset {pos} is invalid")
    if b"/" in name or b"\0" in name:
        raise InvalidReplyError(f"dirent name {name!r} at offset {pos} holds '/' or NUL")


class Attr(NamedTuple):  # a tuple: built on every reply, cheaper than a frozen dataclass
    ino: int
    size: int
    blocks: int
    atime: float
    mtime: float
    ctime: float
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int

    @classmethod
    def from_c(cls, a) -> Attr:
        return cls(
            a.ino, a.size, a.blocks, a.atime + a.atimensec / 1e9, a.mtime + a.mtimensec / 1e9,
            a.ctime + a.ctimensec / 1e9, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize,
        )


class Entry(NamedTuple):
    nodeid: int
    generation: int
    entry_valid: float
    attr_valid: float
    attr: Attr

    @classmethod
    def from_c(cls, e) -> Entry:
        return cls(
            e.nodeid, e.generation, e.entry_valid + e.entry_valid_nsec / 1e9,
            e.attr_valid + e.attr_valid_nsec / 1e9, Attr.from_c(e.attr),
        )


@dataclass(frozen=True)
class Opened:
    fh: int
    open_flags: int


@dataclass(frozen=True)
class DirEntry:
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None = None  # READDIRPLUS only


@dataclass(frozen=True)
class StatFs:
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(frozen=True)
class Lock:
    start: int
    end: int  # inclusive; 2**63-1 = to end of file
    type: int  # fcntl.F_RDLCK / F_WRLCK / F_UNLCK
    pid: int


OFFSET_MAX = (1 << 63) - 1
_GETATTR_IN = abi.pack("fuse_getattr_in")


def _name(name: bytes | str) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    if not raw or b"\0" in raw or b"/" in raw:
        raise ValueError(f"bad file name {name!r}")
    return raw + b"\0"


def _cstring(what: str, text: bytes | str) -> bytes:
    """An xattr name or a symlink target as the request carries it: NUL-terminated, so
    a NUL inside would cut it short (another name, a value in the wrong attribute)."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if not raw or b"\0" in raw:
        raise ValueError(f"bad {what} {text!r}: empty, or holds a NUL byte")
    return raw + b"\0"


class FuseClient:
    """Typed FUSE operations. `uid`/`gid`/`pid` go in every request header (the
    device creates files as that user). Not thread-safe, as its VirtioFs."""

    def __init__(self, fs: VirtioFs, *, uid: int | None = None, gid: int | None = None) -> None:
        self.fs = fs
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.pid = os.getpid()
        self.timeout = 60.0
        # the batched path: requests staged for publish() (parallel lists), the done
        # ones not yet reaped, those sent the one-at-a-time way, and how many of
        # all of them reap() has still to return
        self._reqs: list[bytes] = []
        self._bodies: list[bytes | memoryview] = []
        self._idx: list[int] = []
        self._staged: list[BatchPending] = []
        self._reaped: list[Pending] = []
        self._slow: list[Pending] = []
        self._outstanding = 0
        #: (opcode, body length) -> (large slot, native path): each rule asked once
        self._route: dict[tuple[int, int], tuple[bool, bool]] = {}

    # -- plumbing -------------------------------------------------------------------
    def submit(self, opcode: int, nodeid: int, *parts: bytes | memoryview,
               publish: bool = True) -> Pending:
        """Send a request; its Pending's result() waits for the reply. With
        publish=False it is staged: the device sees it at the next publish() (or
        reap(), or result() of a staged request), and reap() returns it once done.
        While requests are staged, a published one joins their batch (and reap()
        returns it too)."""
        if publish and not self._staged:
            return self.fs.call_async(
                opcode, nodeid, *parts, uid=self.uid, gid=self.gid, pid=self.pid
            )
        p = self._stage(opcode, nodeid, parts)
        if publish:
            self.publish()
        return p

    def submit_many(self, requests) -> list[Pending]:
        """Send (opcode, nodeid, *parts) requests as one batch: one native call adds
        them all, one publish, at most one kick per queue. reap() returns them."""
        out: list[Pending] = []
        fs = self.fs
        if fs.broken is not None:
            raise fs.broken
        if fs.pumped:  # the request queues are the pumps': the one-at-a-time refusal
            return [self.submit(*r) for r in requests]
        route_get = self._route.get
        small, large = fs.slots.small, fs.slots.large  # SlotPool's free lists
        pack, uid, gid, pid = CREQ.pack, self.uid, self.gid, self.pid
        new = BatchPending.__new__
        batch = None
        for r in requests:
            if batch is None:
                # (again) after _stage: it may have set up the batch or added the
                # staged requests (and so replaced these lists)
                batch, inlined = fs.batch, 0
                reqs, bodies, idxs, staged = self._reqs, self._bodies, self._idx, self._staged
                slot_index = batch.slot_index if batch is not None else {}
            # _stage inlined for the usual request (one body, a native route, a free
            # slot already in the table): SlotPool.try_acquire's pop done here
            slot = idx = None
            try:
                opcode, nodeid, body = r
                route = route_get((opcode, len(body)))
            except ValueError:  # the body in several parts
                route = None
            if route is not None and route[1]:
                free = large if route[0] else small
                if free:
                    slot = free.pop()
                    idx = slot_index.get(slot)
            if idx is None:
                if slot is not None:
                    fs.release(slot)
                self._outstanding += inlined
                out.append(self._stage(r[0], r[1], r[2:]))
                batch = None
                continue
            unique = fs.next_unique()
            # BatchPending(fs, unique, opcode, self) without the call frames
            p = new(BatchPending)
            p.fs, p.unique, p.opcode, p.completion, p.data, p._client = (
                fs, unique, opcode, None, b"", self)
            reqs.append(pack(idx, opcode, unique, nodeid, uid, gid, pid, len(body)))
            bodies.append(body)
            idxs.append(idx)
            staged.append(p)
            out.append(p)
            inlined += 1
        if batch is not None:
            self._outstanding += inlined
        self.publish()
        return out

    def _route_of(self, opcode: int, body_len: int) -> tuple[bool, bool]:
        """(large slot, native path) for requests of this opcode and body length:
        the slot size rule and the "no reply" rule (hiprio), asked of the core once.
        SETLKW stays with the in-flight table (its "wait" reply, its early grant)."""
        fs = self.fs
        native = opcode != Opcode.SETLKW and reply_capacity(opcode, b"", fs.max_io) is not None
        route = (fs.needs_large(opcode, IN_HEADER_SIZE + body_len), native)
        self._route[(opcode, body_len)] = route
        return route

    def _stage(self, opcode: int, nodeid: int, parts) -> Pending:
        # the per-request work of the batched path: kept to a few operations
        fs = self.fs
        if fs.broken is not None:
            raise fs.broken
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        n = len(body)
        route = self._route.get((opcode, n)) or self._route_of(opcode, n)
        batch = fs.batch
        if batch is None:
            if not fs.started or fs.pumped:
                return self._stage_slow(opcode, nodeid, parts)
            batch = fs.batch = NativeBatch(fs)
        if not route[1] or fs.pumped:
            return self._stage_slow(opcode, nodeid, parts)
        slot = fs.slots.try_acquire(route[0])
        if slot is None:
            self.publish()  # what is staged must reach the device before we wait on it
            slot = fs.acquire(route[0])
        idx = batch.slot_index.get(slot)
        if idx is None:
            idx = batch.index(slot)
            if idx is None:  # not device-contiguous
                fs.release(slot)
                return self._stage_slow(opcode, nodeid, parts)
        unique = fs.next_unique()
        p = BatchPending(fs, unique, opcode, self)
        self._reqs.append(CREQ.pack(idx, opcode, unique, nodeid, self.uid, self.gid,
                                    self.pid, n))
        self._bodies.append(body)
        self._idx.append(idx)
        self._staged.append(p)
        self._outstanding += 1
        return p

    def _stage_slow(self, opcode: int, nodeid: int, parts) -> Pending:
        self._add_staged(publish=False)  # keep the order of submission
        p = self.fs.call_async(opcode, nodeid, *parts, uid=self.uid, gid=self.gid,
                               pid=self.pid, publish=False)
        self._slow.append(p)
        self._outstanding += 1
        return p

    def _add_staged(self, publish: bool) -> None:
        staged = self._staged
        if not staged:
            return
        reqs, bodies, idx = self._reqs, self._bodies, self._idx
        self._reqs, self._bodies, self._idx, self._staged = [], [], [], []
        fs = self.fs
        if fs.broken is not None:  # they will never be answered: say so, then why
            for p in staged:
                p._finish(-errno.ENOTCONN, b"")
            raise fs.broken
        left = fs.batch.add(fs._pick_request_queue(), b"".join(reqs), b"".join(bodies), idx,
                            staged, publish)
        for k in left:
            # refused by the core's rules (room for the request or its reply):
            # the one-at-a-time path would have refused it too
            fs.release(fs.batch._slots[idx[k]])
            staged[k]._finish(-errno.EINVAL, b"")

    def publish(self) -> None:
        """Add every staged request and publish: one native call, one publish and at
        most one kick per request queue."""
        self._add_staged(publish=True)
        self.fs.publish()

    def reap(self, timeout: float | None = 60.0) -> list[Pending]:
        """Every request sent with publish=False or submit_many that is done and not
        yet reaped (flushing first): all a wake-up harvested, at once. Waits up to
        `timeout` seconds (None: no limit; 0: just look) for one when none is done;
        [] when nothing is in flight or time is up."""
        self.publish()
        fs = self.fs
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = False
        while True:
            out = self._reaped[:]
            if self._slow:
                out += [p for p in self._slow if p.done]
                self._slow = [p for p in self._slow if not p.done]
            if out or not self._outstanding:
                break
            if looked and deadline is not None and time.monotonic() >= deadline:
                break
            try:
                if deadline is not None and timeout <= 0:
                    fs.process()
                else:
                    fs.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except VfsdrvError:
                if not self._reaped:  # the failed requests are in it when the device broke
                    raise
            looked = True
        self._reaped.clear()  # in place: the batched path appends to this very list
        self._outstanding -= len(out)
        return out

    def _call(self, opcode: int, nodeid: int, *parts: bytes | memoryview) -> bytes:
        return self.submit(opcode, nodeid, *parts).result(self.timeout)

    def _entry(self, opcode: int, nodeid: int, *parts: bytes, fmt: int | None = None) -> Entry:
        """A reply making a new name (MKNOD, MKDIR, SYMLINK, LINK): `fmt` the type asked."""
        out = abi.unpack("fuse_entry_out", self._call(opcode, nodeid, *parts))
        check_new_entry(out, Opcode(opcode).name, fmt)
        return Entry.from_c(out)

    def _attr(self, opcode: int, nodeid: int, body: bytes) -> Attr:
        # keep the owning struct alive: a nested cffi struct is a view into it
        out = abi.unpack("fuse_attr_out", self._call(opcode, nodeid, body))
        check_attr(out.attr, Opcode(opcode).name)
        return Attr.from_c(out.attr)

    # -- session --------------------------------------------------------------------
    def init(self, flags: int | None = None):
        return self.fs.init(VirtioFs.DEFAULT_INIT_FLAGS if flags is None else flags)

    def destroy(self) -> None:
        self._call(Opcode.DESTROY, 0)

    # -- names and attributes ------------------------------------------------------------
    def lookup(self, parent: int, name: bytes | str) -> Entry:
        out = abi.unpack("fuse_entry_out", self._call(Opcode.LOOKUP, parent, _name(name)))
        if out.nodeid == 0:  # a negative entry (cacheable for entry_valid)
            raise FileNotFoundError(errno.ENOENT, "no such entry (node id 0)", name)
        check_attr(out.attr, "LOOKUP")
        return Entry.from_c(out)

    def forget(self, nodeid: int, nlookup: int = 1) -> None:
        self.submit(Opcode.FORGET, nodeid, abi.pack("fuse_forget_in", nlookup=nlookup))

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        body = abi.pack("fuse_batch_forget_in", count=len(items)) + b"".join(
            abi.pack("fuse_forget_one", nodeid=n, nlookup=c) for n, c in items
        )
        self.submit(Opcode.BATCH_FORGET, 0, body)

    def getattr(self, nodeid: int, fh: int | None = None) -> Attr:
        body = _GETATTR_IN if fh is None else abi.pack(
            "fuse_getattr_in", getattr_flags=abi.FUSE_GETATTR_FH, fh=fh
        )
        return self._attr(Opcode.GETATTR, nodeid, body)

    def setattr(
        self, nodeid: int, *, mode: int | None = None, uid: int | None = None,
        gid: int | None = None, size: int | None = None, atime: float | None = None,
        mtime: float | None = None, fh: int | None = None,
    ) -> Attr:
        valid = 0
        fields: dict[str, int] = {}
        if mode is not None:
            valid |= abi.FATTR_MODE
            fields["mode"] = mode
        if uid is not None:
            valid |= abi.FATTR_UID
            fields["uid"] = uid
        if gid is not None:
            valid |= abi.FATTR_GID
            fields["gid"] = gid
        if size is not None:
            valid |= abi.FATTR_SIZE
            fields["size"] = size
        if atime is not None:
            valid |= abi.FATTR_ATIME
            fields["atime"], fields["atimensec"] = _split_time(atime)
        if mtime is not None:
            valid |= abi.FATTR_MTIME
            fields["mtime"], fields["mtimensec"] = _split_time(mtime)
        if fh is not None:
            valid |= abi.FATTR_FH
            fields["fh"] = fh
        body = abi.pack("fuse_setattr_in", valid=valid, **fields)
        return self._attr(Opcode.SETATTR, nodeid, body)

    def readlink(self, nodeid: int) -> bytes:
        return self._call(Opcode.READLINK, nodeid)

    def symlink(self, parent: int, name: bytes | str, target: bytes | str) -> Entry:
        return self._entry(Opcode.SYMLINK, parent, _name(name), _cstring("symlink target", target),
                           fmt=stat.S_IFLNK)

    def mknod(self, parent: int, name: bytes | str, mode: int, rdev: int = 0,
              umask: int = 0) -> Entry:
        body = abi.pack("fuse_mknod_in", mode=mode, rdev=rdev, umask=umask)
        fmt = stat.S_IFMT(mode) or stat.S_IFREG  # mknod(2): type 0 is a regular file
        return self._entry(Opcode.MKNOD, parent, body, _name(name), fmt=fmt)

    def mkdir(self, parent: int, name: bytes | str, mode: int = 0o755, umask: int = 0) -> Entry:
        body = abi.pack("fuse_mkdir_in", mode=mode, umask=umask)
        return self._entry(Opcode.MKDIR, parent, body, _name(name), fmt=stat.S_IFDIR)

    def unlink(self, parent: int, name: bytes | str) -> None:
        self._call(Opcode.UNLINK, parent, _name(name))

    def rmdir(self, parent: int, name: bytes | str) -> None:
        self._call(Opcode.RMDIR, parent, _name(name))

    def rename(self, parent: int, name: bytes | str, newparent: int, newname: bytes | str,
               flags: int = 0) -> None:
        if flags:
            body = abi.pack("fuse_rename2_in", newdir=newparent, flags=flags)
            self._call(Opcode.RENAME2, parent, body, _name(name), _name(newname))
        else:
            body = abi.pack("fuse_rename_in", newdir=newparent)
            self._call(Opcode.RENAME, parent, body, _name(name), _name(newname))

    def link(self, nodeid: int, newparent: int, newname: bytes | str) -> Entry:
        body = abi.pack("fuse_link_in", oldnodeid=nodeid)
        return self._entry(Opcode.LINK, newparent, body, _name(newname))

    def access(self, nodeid: int, mask: int) -> None:
        self._call(Opcode.ACCESS, nodeid, abi.pack("fuse_access_in", mask=mask))

    def statfs(self, nodeid: int = ROOT_ID) -> StatFs:
        out = abi.unpack("fuse_statfs_out", self._call(Opcode.STATFS, nodeid))
        st = out.st
        return StatFs(st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize,
                      st.namelen, st.frsize)

    # -- files ------------------------------------------------------------------------
    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Opened:
        reply = self._call(Opcode.OPEN, nodeid, abi.pack("fuse_open_in", flags=flags))
        out = abi.unpack("fuse_open_out", reply)
        return Opened(out.fh, out.open_flags)

    def create(self, parent: int, name: bytes | str, mode: int = 0o644,
               flags: int = os.O_RDWR | os.O_CREAT, umask: int = 0) -> tuple[Entry, Opened]:
        body = abi.pack("fuse_create_in", flags=flags, mode=mode, umask=umask)
        reply = self._call(Opcode.CREATE, parent, body, _name(name))
        raw = abi.unpack("fuse_entry_out", reply)
        check_new_entry(raw, "CREATE", stat.S_IFREG)
        out = abi.unpack("fuse_open_out", reply, abi.sizeof("fuse_entry_out"))
        return Entry.from_c(raw), Opened(out.fh, out.open_flags)

    def read_request(self, nodeid: int, fh: int, offset: int, size: int) -> tuple[int, int, bytes]:
        """Arguments for `submit` of a READ left in flight."""
        return Opcode.READ, nodeid, abi.pack("fuse_read_in", fh=fh, offset=offset, size=size)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        if size > self.fs.max_io:
            raise ValueError(f"read of {size} bytes exceeds the driver's {self.fs.max_io}")
        data = self._call(Opcode.READ, nodeid, abi.pack("fuse_read_in", fh=fh, offset=offset,
                                                       size=size))
        if len(data) > size:
            raise ProtocolError(f"READ of {size} bytes returned {len(data)}")
        return data

    def write(self, nodeid: int, fh: int, offset: int, data: bytes | memoryview) -> int:
        if len(data) > self.fs.max_write:
            raise ValueError(f"write of {len(data)} bytes exceeds max_write {self.fs.max_write}")
        body = abi.pack("fuse_write_in", fh=fh, offset=offset, size=len(data))
        out = abi.unpack("fuse_write_out", self._call(Opcode.WRITE, nodeid, body, data))
        if out.size > len(data):
            raise ProtocolError(f"WRITE of {len(data)} bytes reported {out.size} written")
        return out.size

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        self._call(Opcode.FLUSH, nodeid, abi.pack("fuse_flush_in", fh=fh, lock_owner=lock_owner))

    def release(self, nodeid: int, fh: int, flags: int = 0, release_flags: int = 0,
                lock_owner: int = 0) -> None:
        body = abi.pack("fuse_release_in", fh=fh, flags=flags, release_flags=release_flags,
                        lock_owner=lock_owner)
        self._call(Opcode.RELEASE, nodeid, body)

    def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        body = abi.pack("fuse_fsync_in", fh=fh,
                        fsync_flags=abi.FUSE_FSYNC_FDATASYNC if datasync else 0)
        self._call(Opcode.FSYNC, nodeid, body)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        body = abi.pack("fuse_fallocate_in", fh=fh, offset=offset, length=length, mode=mode)
        self._call(Opcode.FALLOCATE, nodeid, body)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        body = abi.pack("fuse_lseek_in", fh=fh, offset=offset, whence=whence)
        out = abi.unpack("fuse_lseek_out", self._call(Opcode.LSEEK, nodeid, body)).offset
        if out > LLONG_MAX:  # vfs_setpos would refuse it: no file position is negative
            raise InvalidReplyError(f"LSEEK to {out}")
        return out

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int = 0) -> int:
        body = abi.pack("fuse_copy_file_range_in", fh_in=fh_in, off_in=off_in,
                        nodeid_out=nodeid_out, fh_out=fh_out, off_out=off_out, len=length,
                        flags=flags)
        size = abi.unpack("fuse_write_out",
                          self._call(Opcode.COPY_FILE_RANGE, nodeid_in, body)).size
        if size > length:
            raise InvalidReplyError(f"COPY_FILE_RANGE of {length} bytes reported {size}")
        return size

    # -- extended attributes ------------------------------------------------------------------
    def setxattr(self, nodeid: int, name: bytes | str, value: bytes, flags: int = 0) -> None:
        body = abi.pack("fuse_setxattr_in", size=len(value), flags=flags)
        if not self.fs.init_flags & abi.InitFlag.SETXATTR_EXT:
            body = body[: abi.COMPAT_SETXATTR_IN_SIZE]
        self._call(Opcode.SETXATTR, nodeid, body, _cstring("xattr name", name), value)

    def getxattr(self, nodeid: int, name: bytes | str, size: int = 65536) -> bytes:
        return self._call(Opcode.GETXATTR, nodeid, abi.pack("fuse_getxattr_in", size=size),
                          _cstring("xattr name", name))

    def getxattr_size(self, nodeid: int, name: bytes | str) -> int:
        reply = self._call(Opcode.GETXATTR, nodeid, abi.pack("fuse_getxattr_in", size=0),
                           _cstring("xattr name", name))
        return abi.unpack("fuse_getxattr_out", reply).size

    def listxattr(self, nodeid: int, size: int = 65536) -> list[bytes]:
        reply = self._call(Opcode.LISTXATTR, nodeid, abi.pack("fuse_getxattr_in", size=size))
        if size and reply:
            # fuse_verify_xattr_list: every name non-empty and NUL-terminated
            if not reply.endswith(b"\0") or b"\0\0" in reply or reply.startswith(b"\0"):
                raise InvalidReplyError(f"LISTXATTR: malformed name list {reply[:64]!r}")
            return reply[:-1].split(b"\0")
        return [n for n in reply.split(b"\0") if n]

    def removexattr(self, nodeid: int, name: bytes | str) -> None:
        self._call(Opcode.REMOVEXATTR, nodeid, _cstring("xattr name", name))

    # -- directories ------------------------------------------------------------------------
    def opendir(self, nodeid: int, flags: int = os.O_RDONLY) -> Opened:
        out = abi.unpack("fuse_open_out",
                         self._call(Opcode.OPENDIR, nodeid, abi.pack("fuse_open_in", flags=flags)))
        return Opened(out.fh, out.open_flags)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 65536,
                plus: bool = False) -> list[DirEntry]:
        op = Opcode.READDIRPLUS if plus else Opcode.READDIR
        data = self._call(op, nodeid, abi.pack("fuse_read_in", fh=fh, offset=offset, size=size))
        return parse_dirents(data, plus)

    def readdir_all(self, nodeid: int, plus: bool = False,
                    max_entries: int = MAX_DIR_ENTRIES) -> list[DirEntry]:
        """Every entry of a directory, following offsets until the end.

        Offsets are the device's cookies, not counters, so progress is checked the
        only way it can be: a batch that sends the reader back to an offset it has
        already read from (or to 0) would repeat forever, and more than
        `max_entries` entries is a directory without end. Both raise
        InvalidReplyError."""
        d = self.opendir(nodeid)
        out: list[DirEntry] = []
        off = 0
        seen = {0}
        try:
            while True:
                batch = self.readdir(nodeid, d.fh, off, plus=plus)
                if not batch:
                    return out
                out.extend(batch)
                if len(out) > max_entries:
                    raise InvalidReplyError(
                        f"directory {nodeid} has more than {max_entries} entries: no end"
                    )
                off = batch[-1].off
                if off in seen:
                    raise InvalidReplyError(
                        f"directory {nodeid}: READDIR makes no progress (offset {off} again "
                        f"after {len(out)} entries)"
                    )
                seen.add(off)
        finally:
            self.releasedir(nodeid, d.fh)

    def releasedir(self, nodeid: int, fh: int) -> None:
        self._call(Opcode.RELEASEDIR, nodeid, abi.pack("fuse_release_in", fh=fh))

    def fsyncdir(self, nodeid: int, fh: int) -> None:
        self._call(Opcode.FSYNCDIR, nodeid, abi.pack("fuse_fsync_in", fh=fh))

    # -- locks ----------------------------------------------------------------------------
    def _lk(self, fh: int, owner: int, lock: Lock, flock: bool) -> bytes:
        return abi.pack(
            "fuse_lk_in", fh=fh, owner=owner,
            lk={"start": lock.start, "end": lock.end, "type": lock.type, "pid": lock.pid},
            lk_flags=abi.FUSE_LK_FLOCK if flock else 0,
        )

    def getlk(self, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        out = abi.unpack("fuse_lk_out",
                         self._call(Opcode.GETLK, nodeid, self._lk(fh, owner, lock, False)))
        lk = out.lk
        # convert_fuse_file_lock: a range inside OFFSET_MAX that does not run backwards
        if lk.start > OFFSET_MAX or lk.end > OFFSET_MAX or lk.end < lk.start:
            raise InvalidReplyError(f"GETLK: lock range {lk.start}..{lk.end}")
        if lk.type not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK):
            raise InvalidReplyError(f"GETLK: lock type {lk.type}")
        return Lock(lk.start, lk.end, lk.type, lk.pid)

    def setlk(self, nodeid: int, fh: int, owner: int, lock: Lock, *, flock: bool = False) -> None:
        self._call(Opcode.SETLK, nodeid, self._lk(fh, owner, lock, flock))

    def setlkw_async(self, nodeid: int, fh: int, owner: int, lock: Lock, *,
                     flock: bool = False) -> Pending:
        """A blocking lock request left in flight: `.result()` waits for the grant."""
        return self.submit(Opcode.SETLKW, nodeid, self._lk(fh, owner, lock, flock))

    def setlkw(self, nodeid: int, fh: int, owner: int, lock: Lock, *, flock: bool = False,
               timeout: float | None = None) -> None:
        """Wait for the lock. A wait that runs out of `timeout` or is stopped (Ctrl-C)
        is withdrawn with FUSE_INTERRUPT, so the device does not grant it later to
        nobody; TimeoutError then, unless the grant crossed the withdrawal (the lock
        is held and setlkw returns)."""
        pending = self.setlkw_async(nodeid, fh, owner, lock, flock=flock)
        try:
            pending.result(timeout)
        except KeyboardInterrupt:
            self.interrupt(pending.unique)
            raise
        except TimeoutError:
            self.interrupt(pending.unique)
            try:
                pending.result(SETLKW_WITHDRAW_WAIT)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
                raise TimeoutError(f"the lock was not granted within {timeout} s "
                                   "(request withdrawn)") from None

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT of a request in flight (e.g. a waiting SETLKW)."""
        self.fs.call_async(Opcode.INTERRUPT, 0, abi.pack("fuse_interrupt_in", unique=unique),
                           unique=unique | 1)


def _split_time(t: float) -> tuple[int, int]:
    sec = int(t // 1)
    return sec, int(round((t - sec) * 1e9)) % 1_000_000_000


_DIRENT = struct.Struct("<QQII")


def parse_dirents(data: bytes, plus: bool) -> list[DirEntry]:
    """Decode a READDIR(PLUS) reply, validating every length against the buffer."""
    out: list[DirEntry] = []
    pos = 0
    entry_size = abi.sizeof("fuse_entry_out") if plus else 0
    while pos < len(data):
        entry = None
        if plus:
            entry = Entry.from_c(abi.unpack("fuse_entry_out", data, pos))
        base = pos + entry_size
        if base + _DIRENT.size > len(data):
            raise ProtocolError(f"truncated dirent at offset {pos}")
        ino, off, namelen, typ = _DIRENT.unpack_from(data, base)
        if namelen == 0 or namelen > NAME_MAX or base + _DIRENT.size + namelen > len(data):
            raise InvalidReplyError(f"dirent name length {namelen} at offset {pos} is invalid")
        name = bytes(data[base + _DIRENT.size : base + _DIRENT.size + namelen])
        check_dirent_name(name, pos)
        if entry is not None and entry.nodeid and name not in (b".", b".."):
            # fuse_direntplus_link: node id 0 means "no entry"; "." and ".." are skipped
            if entry.nodeid == ROOT_ID:
                raise InvalidReplyError(f"READDIRPLUS entry {name!r} claims the root's node id")
            check_attr(entry.attr, f"READDIRPLUS entry {name!r}")
        out.append(DirEntry(ino, off, typ, name, entry))
        pos += (abi.direntplus_size(namelen) if plus else abi.dirent_size(namelen))
    return out
