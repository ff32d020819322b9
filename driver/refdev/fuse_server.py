"""A FUSE file system server over a host directory: one per frontend (FUSE session).

`handle()` takes the device-readable bytes of a request (fuse_in_header + body) and
returns the whole reply (fuse_out_header + payload), or None for the requests
that have none (FORGET, BATCH_FORGET, INTERRUPT). Errors go back as -errno;
unknown opcodes get ENOSYS; anything before FUSE_INIT gets EIO.

Every path is resolved one component at a time from an O_PATH descriptor with
O_NOFOLLOW, so neither ".." nor a symlink can lead out of the shared directory.
Requests are served as the device's own user (no credential switching); new files
are then given the requester's uid/gid and exactly the mode the driver asked for.

Locks live in the device-wide LockTable. A FUSE_SETLKW that must wait is answered
at once with FUSE_LOCK_WAIT when the notification queue is negotiated, and its
result arrives later as a FUSE_NOTIFY_LOCK through `notify_lock(unique, error)`.
Without the notification queue, a SETLKW that would block fails with EOPNOTSUPP,
as the proposal's virtiofsd did.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from ..fs import abi
from ..fs.abi import InitFlag, Opcode, opcode_name, signed64, wire_time
from . import host_calls
from .inode_table import DirEntry, Handle, InodeTable, Node
from .lock_table import F_UNLCK, Lock, LockResult, LockTable

log = logging.getLogger(__name__)

#: the largest WRITE payload / READ reply we accept (rust virtiofsd's MAX_BUFFER_SIZE)
MAX_WRITE = 1 << 20
PAGE_SIZE = 4096
#: seconds the driver may cache entries and attributes: several frontends share the
#: directory, so keep it short (virtiofsd's cache=auto uses 1 s)
CACHE_TIMEOUT = 1
#: INIT flags this server grants when asked
SUPPORTED_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.POSIX_LOCKS
    | InitFlag.FLOCK_LOCKS
    | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.BIG_WRITES
    | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.ASYNC_DIO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.MAX_PAGES
    | InitFlag.INIT_EXT
)
COPY_CHUNK = 1 << 30
#: the longest file name component (Linux NAME_MAX)
NAME_MAX = 255
MAX_EARLY_INTERRUPTS = 64
U32_MAX = 0xFFFFFFFF

Reply = bytes | None
NotifyLock = Callable[[int, int], None]


class _Wait:
    """Marker: answer with FUSE_LOCK_WAIT (the result comes as a notification)."""


class _NoReply:
    """Marker: this request has no reply."""


WAIT = _Wait()
NO_REPLY = _NoReply()


def _name(body: bytes, offset: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name at `offset`; returns it and the offset after the NUL."""
    end = body.find(b"\0", offset)
    if end < 0:
        raise OSError(errno.EINVAL, "name is not NUL-terminated")
    return body[offset:end], end + 1


def _component(name: bytes) -> bytes:
    if not name or b"/" in name:
        raise OSError(errno.EINVAL, f"bad file name {name!r}")
    if len(name) > NAME_MAX:
        # what a local file system answers (pjdfstest checks it on every name operation)
        raise OSError(errno.ENAMETOOLONG, f"{len(name)}-byte file name")
    return name


def _attr(st: os.stat_result) -> dict[str, Any]:
    out: dict[str, Any] = dict(
        ino=st.st_ino,
        size=st.st_size,
        blocks=st.st_blocks,
        mode=st.st_mode,
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev & U32_MAX,
        blksize=st.st_blksize,
    )
    for name in ("atime", "mtime", "ctime"):
        out[name], out[f"{name}nsec"] = wire_time(getattr(st, f"st_{name}_ns"))
    return out


def _entry(node: Node, st: os.stat_result) -> Any:
    return abi.new(
        "fuse_entry_out",
        nodeid=node.nodeid,
        entry_valid=CACHE_TIMEOUT,
        attr_valid=CACHE_TIMEOUT,
        attr=_attr(st),
    )


def _bytes(obj: Any) -> bytes:
    return bytes(abi.ffi.buffer(obj))


class FuseServer:
    def __init__(
        self,
        source: str,
        session: int,
        locks: LockTable,
        notify_lock: NotifyLock | None = None,
    ) -> None:
        """`notify_lock` is set when the notification queue is negotiated."""
        self.source = source
        self.session = session
        self.locks = locks
        self.notify_lock = notify_lock
        self.inodes: InodeTable | None = None
        self.minor = 0
        self.flags = 0
        # INTERRUPTs that found nothing to cancel: hiprio may be read before the
        # request queue holding the SETLKW they are about (bounded, oldest dropped)
        self._early_interrupts: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ops: dict[int, Callable[[Any, bytes], Any]] = {
            Opcode.LOOKUP: self.lookup,
            Opcode.FORGET: self.forget,
            Opcode.BATCH_FORGET: self.batch_forget,
            Opcode.GETATTR: self.getattr,
            Opcode.SETATTR: self.setattr,
            Opcode.READLINK: self.readlink,
            Opcode.SYMLINK: self.symlink,
            Opcode.MKNOD: self.mknod,
            Opcode.MKDIR: self.mkdir,
            Opcode.UNLINK: self.unlink,
            Opcode.RMDIR: self.rmdir,
            Opcode.RENAME: self.rename,
            Opcode.RENAME2: self.rename2,
            Opcode.LINK: self.link,
            Opcode.OPEN: self.open,
            Opcode.READ: self.read,
            Opcode.WRITE: self.write,
            Opcode.STATFS: self.statfs,
            Opcode.RELEASE: self.release,
            Opcode.FSYNC: self.fsync,
            Opcode.FLUSH: self.flush,
            Opcode.SETXATTR: self.setxattr,
            Opcode.GETXATTR: self.getxattr,
            Opcode.LISTXATTR: self.listxattr,
            Opcode.REMOVEXATTR: self.removexattr,
            Opcode.OPENDIR: self.opendir,
            Opcode.READDIR: self.readdir,
            Opcode.READDIRPLUS: self.readdirplus,
            Opcode.RELEASEDIR: self.releasedir,
            Opcode.FSYNCDIR: self.fsyncdir,
            Opcode.ACCESS: self.access,
            Opcode.CREATE: self.create,
            Opcode.GETLK: self.getlk,
            Opcode.SETLK: self.setlk,
            Opcode.SETLKW: self.setlkw,
            Opcode.INTERRUPT: self.interrupt,
            Opcode.FALLOCATE: self.fallocate,
            Opcode.LSEEK: self.lseek,
            Opcode.COPY_FILE_RANGE: self.copy_file_range,
            Opcode.DESTROY: self.destroy,
        }

    # -- framing ------------------------------------------------------------------------
    def handle(self, request: bytes, reply_room: int) -> Reply:
        """The reply to one request; `reply_room` is the device-writable space."""
        if len(request) < abi.IN_HEADER_SIZE:
            raise ProtocolError(f"{len(request)}-byte request is shorter than fuse_in_header")
        hdr = abi.unpack("fuse_in_header", request)
        if hdr.len < abi.IN_HEADER_SIZE or hdr.len > len(request):
            return self._error(hdr.unique, errno.EINVAL)
        body = request[abi.IN_HEADER_SIZE : hdr.len]
        try:
            result = self._dispatch(hdr, body, reply_room)
        except OSError as exc:
            return self._error(hdr.unique, exc.errno or errno.EIO)
        except (ProtocolError, ValueError, OverflowError) as exc:
            # OverflowError: a u32 field (flags, mode) too large for the host call
            log.warning("session %d: malformed opcode %d: %s", self.session, hdr.opcode, exc)
            return self._error(hdr.unique, errno.EINVAL)
        except Exception:
            # a bug here must cost one request, not the frontend's connection
            log.exception("session %d: opcode %d failed", self.session, hdr.opcode)
            return self._error(hdr.unique, errno.EIO)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "session %d: %s unique %d node %d",
                self.session,
                opcode_name(hdr.opcode),
                hdr.unique,
                hdr.nodeid,
            )
        if result is NO_REPLY:
            return None
        if result is WAIT:
            return abi.pack(
                "fuse_out_header",
                len=abi.OUT_HEADER_SIZE,
                error=abi.FUSE_LOCK_WAIT,
                unique=hdr.unique,
            )
        payload = result if isinstance(result, bytes | bytearray) else _bytes(result)
        total = abi.OUT_HEADER_SIZE + len(payload)
        if total > reply_room:
            log.warning(
                "session %d: %d-byte reply to opcode %d does not fit %d writable bytes",
                self.session,
                total,
                hdr.opcode,
                reply_room,
            )
            return self._error(hdr.unique, errno.EOVERFLOW)
        return abi.pack("fuse_out_header", len=total, error=0, unique=hdr.unique) + payload

    @staticmethod
    def _error(unique: int, err: int) -> bytes:
        log.debug("  -> unique %d: %s", unique, errno.errorcode.get(err, err))
        return abi.pack("fuse_out_header", len=abi.OUT_HEADER_SIZE, error=-err, unique=unique)

    def _dispatch(self, hdr: Any, body: bytes, reply_room: int) -> Any:
        if hdr.opcode == Opcode.INIT:
            return self.init(hdr, body)
        if self.inodes is None:
            if hdr.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
                return NO_REPLY
            raise OSError(errno.EIO, "request before FUSE_INIT")
        op = self._ops.get(hdr.opcode)
        if op is None:
            raise OSError(errno.ENOSYS, f"opcode {hdr.opcode}")
        if hdr.opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
            return op(hdr, body, reply_room - abi.OUT_HEADER_SIZE)  # type: ignore[call-arg]
        return op(hdr, body)

    @property
    def _inodes(self) -> InodeTable:
        assert self.inodes is not None
        return self.inodes

    def _node(self, nodeid: int) -> Node:
        return self._inodes.get(nodeid)

    def _lookup_reply(self, parent: Node, name: bytes) -> Any:
        node, st = self._inodes.lookup(parent, name)
        return _entry(node, st)

    # -- session ------------------------------------------------------------------------
    def init(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_init_in", body.ljust(abi.sizeof("fuse_init_in"), b"\0"))
        if arg.major != abi.KERNEL_VERSION or arg.minor < abi.MIN_MINOR:
            log.warning("session %d: FUSE %d.%d not supported", self.session, arg.major, arg.minor)
            raise OSError(errno.EPROTO, "unsupported FUSE version")
        # The next FUSE_INIT ends the current session and starts a new one.
        self._end_session()
        self.inodes = InodeTable(self.source, self.locks.open_file, self.locks.close_file)
        self.minor = min(arg.minor, abi.KERNEL_MINOR_VERSION)
        wanted = arg.flags | (arg.flags2 << 32 if arg.flags & InitFlag.INIT_EXT else 0)
        self.flags = wanted & SUPPORTED_FLAGS
        return abi.new(
            "fuse_init_out",
            major=abi.KERNEL_VERSION,
            minor=self.minor,
            max_readahead=min(arg.max_readahead, MAX_WRITE),
            flags=self.flags & U32_MAX,
            flags2=self.flags >> 32,
            max_background=64,
            congestion_threshold=48,
            max_write=MAX_WRITE,
            time_gran=1,
            max_pages=MAX_WRITE // PAGE_SIZE,
        )

    def destroy(self, hdr: Any, body: bytes) -> bytes:
        self._end_session()
        return b""

    def _end_session(self) -> None:
        self.locks.release_session(self.session)
        if self.inodes is not None:
            self.inodes.close()
            self.inodes = None

    def close(self) -> None:
        self._end_session()

    # -- names --------------------------------------------------------------------------
    def lookup(self, hdr: Any, body: bytes) -> Any:
        name, _ = _name(body)
        parent = self._node(hdr.nodeid)
        if name == b".." and parent is self._inodes.root:
            name = b"."  # the root's parent is the root: nothing above it is shared
        if name not in (b".", b".."):
            _component(name)
        return self._lookup_reply(parent, name)

    def forget(self, hdr: Any, body: bytes) -> _NoReply:
        arg = abi.unpack("fuse_forget_in", body)
        self._inodes.forget(hdr.nodeid, arg.nlookup)
        return NO_REPLY

    def batch_forget(self, hdr: Any, body: bytes) -> _NoReply:
        arg = abi.unpack("fuse_batch_forget_in", body)
        one = abi.sizeof("fuse_forget_one")
        count = min(arg.count, (len(body) - abi.sizeof("fuse_batch_forget_in")) // one)
        for i in range(count):
            item = abi.unpack("fuse_forget_one", body, abi.sizeof("fuse_batch_forget_in") + i * one)
            self._inodes.forget(item.nodeid, item.nlookup)
        return NO_REPLY

    def mknod(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_mknod_in", body)
        name = _component(_name(body, abi.sizeof("fuse_mknod_in"))[0])
        parent = self._node(hdr.nodeid)
        os.mknod(name, arg.mode, arg.rdev, dir_fd=parent.fd)
        return self._created(hdr, parent, name, arg.mode)

    def mkdir(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_mkdir_in", body)
        name = _component(_name(body, abi.sizeof("fuse_mkdir_in"))[0])
        parent = self._node(hdr.nodeid)
        os.mkdir(name, arg.mode & 0o7777, dir_fd=parent.fd)
        return self._created(hdr, parent, name, arg.mode)

    def symlink(self, hdr: Any, body: bytes) -> Any:
        name, offset = _name(body)
        target, _ = _name(body, offset)
        parent = self._node(hdr.nodeid)
        os.symlink(target, _component(name), dir_fd=parent.fd)
        return self._created(hdr, parent, name, None)

    def _created(self, hdr: Any, parent: Node, name: bytes, mode: int | None) -> Any:
        """Give a new file the requester's ids and the exact mode (our umask is not
        the guest's), then answer as LOOKUP does. In a set-group-ID directory the new
        entry keeps the directory's group, and a new directory keeps S_ISGID (POSIX;
        Linux's inode_init_owner): the host kernel set both, the guest's mode has
        no S_ISGID to give."""
        node, st = self._inodes.lookup(parent, name)
        pst = os.stat(parent.fd)
        setgid_dir = bool(pst.st_mode & stat.S_ISGID)
        try:
            host_calls.fchown_empty(node.fd, hdr.uid, U32_MAX if setgid_dir else hdr.gid)
        except OSError as exc:
            log.debug("session %d: cannot chown new %r: %s", self.session, name, exc)
        if mode is not None:
            want = mode & 0o7777
            if setgid_dir and stat.S_ISDIR(st.st_mode):
                want |= stat.S_ISGID
            elif (setgid_dir and want & stat.S_ISGID and want & stat.S_IXGRP
                  and hdr.uid != 0 and hdr.gid != pst.st_gid):
                # Linux's mode_strip_sgid: no set-group-ID file of a group the creator
                # is not in (its supplementary groups are not known here: only its gid)
                want &= ~stat.S_ISGID
            if stat.S_IMODE(os.stat(node.fd).st_mode) != want:
                os.chmod(node.proc_path, want)
        return _entry(node, os.stat(node.fd))

    def unlink(self, hdr: Any, body: bytes) -> bytes:
        os.unlink(_component(_name(body)[0]), dir_fd=self._node(hdr.nodeid).fd)
        return b""

    def rmdir(self, hdr: Any, body: bytes) -> bytes:
        os.rmdir(_component(_name(body)[0]), dir_fd=self._node(hdr.nodeid).fd)
        return b""

    def rename(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_rename_in", body)
        return self._rename(hdr.nodeid, arg.newdir, body[abi.sizeof("fuse_rename_in") :], 0)

    def rename2(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_rename2_in", body)
        names = body[abi.sizeof("fuse_rename2_in") :]
        return self._rename(hdr.nodeid, arg.newdir, names, arg.flags)

    def _rename(self, olddir: int, newdir: int, names: bytes, flags: int) -> bytes:
        old, offset = _name(names)
        new, _ = _name(names, offset)
        src, dst = self._node(olddir), self._node(newdir)
        _component(old)
        _component(new)
        if flags:
            host_calls.renameat2(src.fd, old, dst.fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def link(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_link_in", body)
        name = _component(_name(body, abi.sizeof("fuse_link_in"))[0])
        target, parent = self._node(arg.oldnodeid), self._node(hdr.nodeid)
        # the magic link names the node itself, symlink or not
        os.link(target.proc_path, name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._lookup_reply(parent, name)

    def readlink(self, hdr: Any, body: bytes) -> bytes:
        return os.fsencode(os.readlink("", dir_fd=self._node(hdr.nodeid).fd))

    # -- attributes ---------------------------------------------------------------------
    def getattr(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_getattr_in", body) if body else None
        if arg is not None and arg.getattr_flags & abi.FUSE_GETATTR_FH:
            st = os.fstat(self._inodes.handle(arg.fh).fd)
        else:
            st = os.stat(self._node(hdr.nodeid).fd)
        return self._attr_out(st)

    @staticmethod
    def _attr_out(st: os.stat_result) -> Any:
        return abi.new("fuse_attr_out", attr_valid=CACHE_TIMEOUT, attr=_attr(st))

    def setattr(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_setattr_in", body)
        node = self._node(hdr.nodeid)
        is_link = stat.S_ISLNK(os.stat(node.fd).st_mode)
        valid = arg.valid
        if valid & abi.FATTR_MODE:
            if is_link:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(node.proc_path, arg.mode & 0o7777)
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            uid = arg.uid if valid & abi.FATTR_UID else U32_MAX
            gid = arg.gid if valid & abi.FATTR_GID else U32_MAX
            host_calls.fchown_empty(node.fd, uid, gid)
        if valid & abi.FATTR_SIZE:
            if valid & abi.FATTR_FH:
                os.ftruncate(self._inodes.handle(arg.fh).fd, arg.size)
            elif is_link:
                raise OSError(errno.EINVAL, "truncate of a symlink")
            else:
                os.truncate(node.proc_path, arg.size)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
            host_calls.utimens_empty(
                node.fd,
                _time(valid, abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, arg.atime, arg.atimensec),
                _time(valid, abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, arg.mtime, arg.mtimensec),
            )
        return self._attr_out(os.stat(node.fd))

    def statfs(self, hdr: Any, body: bytes) -> Any:
        sv = os.statvfs(self._node(hdr.nodeid).proc_path)
        out = abi.new("fuse_statfs_out")
        st = out.st
        st.blocks, st.bfree, st.bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
        st.files, st.ffree = sv.f_files, sv.f_ffree
        st.bsize, st.namelen, st.frsize = sv.f_bsize, sv.f_namemax, sv.f_frsize
        return out

    def access(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_access_in", body)
        if not os.access(self._node(hdr.nodeid).proc_path, arg.mask):
            raise OSError(errno.EACCES, "access denied")
        return b""

    # -- extended attributes ------------------------------------------------------------
    def _xattr_path(self, nodeid: int) -> str:
        node = self._node(nodeid)
        if stat.S_ISLNK(os.stat(node.fd).st_mode):
            # the /proc path would follow the link out of its node
            raise OSError(errno.EPERM, "xattrs of a symlink")
        return node.proc_path

    def setxattr(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_setxattr_in", body.ljust(abi.sizeof("fuse_setxattr_in"), b"\0"))
        head = abi.COMPAT_SETXATTR_IN_SIZE  # SETXATTR_EXT is not granted
        name, offset = _name(body, head)
        value = body[offset : offset + arg.size]
        if len(value) != arg.size:
            raise OSError(errno.EINVAL, "xattr value shorter than its size")
        os.setxattr(self._xattr_path(hdr.nodeid), name, value, arg.flags)
        return b""

    def getxattr(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_getxattr_in", body)
        name, _ = _name(body, abi.sizeof("fuse_getxattr_in"))
        try:
            value = os.getxattr(self._xattr_path(hdr.nodeid), name)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise OSError(errno.ENODATA, "no xattrs on a symlink") from None
            raise
        return self._sized(value, arg.size)

    def listxattr(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_getxattr_in", body)
        try:
            names = os.listxattr(self._xattr_path(hdr.nodeid))
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
            names = []
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), arg.size)

    @staticmethod
    def _sized(value: bytes, size: int) -> Any:
        """size 0 asks how big the value is; a smaller buffer is ERANGE."""
        if size == 0:
            return abi.new("fuse_getxattr_out", size=len(value))
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return value

    def removexattr(self, hdr: Any, body: bytes) -> bytes:
        os.removexattr(self._xattr_path(hdr.nodeid), _name(body)[0])
        return b""

    # -- files --------------------------------------------------------------------------
    # O_DIRECT is dropped on the host file, as virtiofsd does without --allow-direct-io:
    # the guest kernel already bypasses its own page cache for it, and a FUSE request's
    # offset, size and our buffers need not meet the host file system's alignment (every
    # such read and write would fail with EINVAL). Host-side caching keeps the data
    # coherent for every other opener; durability is what fsync (or O_SYNC) asks for.
    # O_APPEND is dropped too: fcntl(F_SETFL) can clear or set it on the guest's file
    # without telling the device, and the kernel writes a mapping's dirty pages back
    # through any writable file of the inode. Each WRITE lands at the offset the
    # kernel gives (an append's too): see write().
    def _open_node(self, node: Node, flags: int) -> int:
        if stat.S_ISLNK(os.stat(node.fd).st_mode):
            raise OSError(errno.ELOOP, "open of a symlink node")
        # O_NOFOLLOW would refuse the /proc magic link; the node is known not to be a link
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT
                   | os.O_APPEND)
        return os.open(node.proc_path, flags | os.O_CLOEXEC)

    def open(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_open_in", body)
        node = self._node(hdr.nodeid)
        fh = self._inodes.add_handle(node, self._open_node(node, arg.flags))
        return abi.new("fuse_open_out", fh=fh)

    def create(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_create_in", body)
        name = _component(_name(body, abi.sizeof("fuse_create_in"))[0])
        parent = self._node(hdr.nodeid)
        flags = (arg.flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC) & ~(
            os.O_NOCTTY | os.O_DIRECT | os.O_APPEND
        )
        # O_EXCL first: a file that exists (another mount made it since the guest's
        # LOOKUP) is opened as it is, keeping its owner and mode, as open(O_CREAT) does
        for _ in range(8):
            try:
                fd = os.open(name, flags | os.O_EXCL, arg.mode & 0o7777, dir_fd=parent.fd)
                made = True
                break
            except FileExistsError:
                if arg.flags & os.O_EXCL:
                    raise
            try:
                fd = os.open(name, flags & ~os.O_CREAT, dir_fd=parent.fd)
                made = False
                break
            except FileNotFoundError:
                continue  # removed again in between: create it after all
        else:
            raise OSError(errno.EAGAIN, f"{name!r} keeps appearing and disappearing")
        try:
            entry = (self._created(hdr, parent, name, arg.mode) if made
                     else _entry(*self._inodes.lookup(parent, name)))
        except OSError:
            os.close(fd)
            raise
        fh = self._inodes.add_handle(self._node(entry.nodeid), fd)
        return _bytes(entry) + abi.pack("fuse_open_out", fh=fh)

    def read(self, hdr: Any, body: bytes, room: int) -> bytes:
        arg = abi.unpack("fuse_read_in", body)
        size = min(arg.size, MAX_WRITE, max(room, 0))
        return os.pread(self._inodes.handle(arg.fh).fd, size, arg.offset)

    def write(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_write_in", body)
        data = body[abi.sizeof("fuse_write_in") :]
        if arg.size > len(data) or arg.size > MAX_WRITE:
            raise OSError(errno.EINVAL, f"WRITE of {arg.size} bytes carries {len(data)}")
        fd = self._inodes.handle(arg.fh).fd
        # where the kernel says, O_APPEND or not: it works an append's offset out from
        # the file's size, a direct write's chunks come with consecutive offsets that
        # several request queues serve in any order, and F_SETFL may have cleared the
        # guest file's O_APPEND (the host file is opened without it). Appends from two
        # mounts at once are not atomic, as for two guests.
        written = os.pwrite(fd, data[: arg.size], arg.offset)
        return abi.new("fuse_write_out", size=written)

    def flush(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_flush_in", body)
        handle = self._inodes.handle(arg.fh)
        # close() drops the closing process's POSIX locks on the file
        self.locks.release_posix(handle.node.key, (self.session, arg.lock_owner))
        handle.node.posix_owners.pop(arg.lock_owner, None)
        return b""

    def release(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_release_in", body)
        handle = self._inodes.handle(arg.fh)
        key = handle.node.key
        # Linux sends nothing for OFD locks (F_OFD_SETLK) at close: their owner is the
        # open file, never a FLUSH's lock_owner (the closing process's files), and
        # RELEASE carries an owner only after flock(). So the POSIX owners that locked
        # through this fh and were not flushed since are open files: their locks end
        # here. (A process's own lock owner was flushed when it closed its descriptor
        # to this fh, which it did before the fh could be released.)
        owners = handle.node.posix_owners
        for owner in [o for o, fhs in owners.items() if arg.fh in fhs]:
            del owners[owner]
            self.locks.release_posix(key, (self.session, owner))
        for owner in handle.flock_owners:
            self.locks.release_flock(key, (self.session, owner))
        if arg.release_flags & abi.FUSE_RELEASE_FLOCK_UNLOCK:
            self.locks.release_flock(key, (self.session, arg.lock_owner))
        self._inodes.close_handle(arg.fh)
        return b""

    def fsync(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_fsync_in", body)
        fd = self._inodes.handle(arg.fh).fd
        if arg.fsync_flags & abi.FUSE_FSYNC_FDATASYNC:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return b""

    def fallocate(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_fallocate_in", body)
        host_calls.fallocate(self._inodes.handle(arg.fh).fd, arg.mode, arg.offset, arg.length)
        return b""

    def lseek(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_lseek_in", body)
        # the kernel's loff_t as it came: the host answers a negative SEEK_DATA/HOLE
        offset = os.lseek(self._inodes.handle(arg.fh).fd, signed64(arg.offset), arg.whence)
        return abi.new("fuse_lseek_out", offset=offset)

    def copy_file_range(self, hdr: Any, body: bytes) -> Any:
        arg = abi.unpack("fuse_copy_file_range_in", body)
        if arg.flags:
            raise OSError(errno.EINVAL, "copy_file_range flags")
        src, dst = self._inodes.handle(arg.fh_in).fd, self._inodes.handle(arg.fh_out).fd
        count = min(arg.len, COPY_CHUNK)
        copied = os.copy_file_range(src, dst, count, arg.off_in, arg.off_out)
        return abi.new("fuse_write_out", size=copied)

    # -- directories --------------------------------------------------------------------
    def opendir(self, hdr: Any, body: bytes) -> Any:
        node = self._node(hdr.nodeid)
        fd = os.open(node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return abi.new("fuse_open_out", fh=self._inodes.add_handle(node, fd))

    def releasedir(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_release_in", body)
        self._inodes.close_handle(arg.fh)
        return b""

    def fsyncdir(self, hdr: Any, body: bytes) -> bytes:
        arg = abi.unpack("fuse_fsync_in", body)
        os.fsync(self._inodes.handle(arg.fh).fd)
        return b""

    def _entries(self, handle: Handle, offset: int) -> list[DirEntry]:
        """The directory as of its last rewind: offset 0 takes a fresh snapshot, so
        every offset handed out stays valid while the handle is open."""
        if offset == 0 or handle.entries is None:
            node = handle.node
            # the root's ".." is the root itself: nothing above it is shared
            up = node.key[1] if node is self._inodes.root else os.stat("..", dir_fd=node.fd).st_ino
            entries = [
                DirEntry(b".", node.key[1], stat.S_IFDIR >> 12),
                DirEntry(b"..", up, stat.S_IFDIR >> 12),
            ]
            os.lseek(handle.fd, 0, os.SEEK_SET)
            with os.scandir(handle.fd) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    entries.append(DirEntry(os.fsencode(e.name), e.inode(), st.st_mode >> 12))
            handle.entries = entries
        return handle.entries

    def readdir(self, hdr: Any, body: bytes, room: int) -> bytes:
        return self._read_dir(body, room, plus=False)

    def readdirplus(self, hdr: Any, body: bytes, room: int) -> bytes:
        return self._read_dir(body, room, plus=True)

    def _read_dir(self, body: bytes, room: int, plus: bool) -> bytes:
        """READDIR's fuse_dirents, or READDIRPLUS's fuse_direntplus (each with its
        entry, as LOOKUP answers it), from the handle's snapshot at arg.offset."""
        arg = abi.unpack("fuse_read_in", body)
        handle = self._inodes.handle(arg.fh)
        limit = min(arg.size, room)
        record_size = abi.direntplus_size if plus else abi.dirent_size
        header = abi.sizeof("fuse_direntplus" if plus else "fuse_dirent")
        out = bytearray()
        entries = self._entries(handle, arg.offset)
        for i in range(arg.offset, len(entries)):
            e = entries[i]
            size = record_size(len(e.name))
            if len(out) + size > limit:
                break  # before the lookup: an entry not sent must not be counted
            ino = e.ino
            if plus:
                if e.name in (b".", b".."):
                    # nodeid 0: the driver does not instantiate "." and ".."
                    entry = abi.new("fuse_entry_out")
                    entry.attr.ino, entry.attr.mode = e.ino, e.type << 12
                else:
                    try:
                        entry = self._lookup_reply(handle.node, e.name)
                    except FileNotFoundError:
                        continue  # removed since the snapshot
                out += _bytes(entry)
                ino = entry.attr.ino or e.ino
            out += abi.pack("fuse_dirent", ino=ino, off=i + 1, namelen=len(e.name), type=e.type)
            out += e.name.ljust(size - header, b"\0")
        return bytes(out)

    # -- locks --------------------------------------------------------------------------
    def _lock_request(self, body: bytes, setting: bool = False) -> tuple[Handle, Lock, bool]:
        arg = abi.unpack("fuse_lk_in", body)
        handle = self._inodes.handle(arg.fh)
        lk = arg.lk
        lock = Lock((self.session, arg.owner), lk.start, lk.end, lk.type, lk.pid)
        flock = bool(arg.lk_flags & abi.FUSE_LK_FLOCK)
        if setting and lk.type != F_UNLCK:
            # remember which open file the lock came through (see release())
            if flock:
                handle.flock_owners.add(arg.owner)
            else:
                _record_posix_owner(handle, arg.owner)
        return handle, lock, flock

    def getlk(self, hdr: Any, body: bytes) -> Any:
        handle, want, flock = self._lock_request(body)
        held = self.locks.test(handle.node.key, want, flock)
        if held is None:
            return abi.new(
                "fuse_lk_out", lk=dict(start=want.start, end=want.end, type=F_UNLCK, pid=0)
            )
        # a pid means something only inside the frontend that sent it
        pid = held.pid if held.owner[0] == self.session else 0
        return abi.new(
            "fuse_lk_out", lk=dict(start=held.start, end=held.end, type=held.type, pid=pid)
        )

    def setlk(self, hdr: Any, body: bytes) -> bytes:
        handle, want, flock = self._lock_request(body, setting=True)
        err = self.locks.set(handle.node.key, want, flock)
        if err:
            raise OSError(-err, "lock conflict")
        return b""

    def setlkw(self, hdr: Any, body: bytes) -> bytes | _Wait:
        handle, want, flock = self._lock_request(body, setting=True)
        if hdr.unique in self._early_interrupts:
            del self._early_interrupts[hdr.unique]
            raise OSError(errno.EINTR, "interrupted before it was read")
        if self.notify_lock is None:
            err = self.locks.set(handle.node.key, want, flock)
            if err == -errno.EAGAIN:
                raise OSError(errno.EOPNOTSUPP, "blocking lock without a notification queue")
            if err:
                raise OSError(-err, "lock failed")
            return b""
        notify, unique = self.notify_lock, hdr.unique

        def done(error: int) -> None:
            if error == 0 and not flock:
                # granted: a FLUSH while it waited (another thread closed the fd) may
                # have dropped the record of the open file it came through; RELEASE
                # of that file must still end this lock
                _record_posix_owner(handle, want.owner[1])
            notify(unique, error)

        result = self.locks.set_wait(handle.node.key, want, flock, unique, done)
        if result == LockResult.WAITING:
            return WAIT
        if result < 0:
            raise OSError(-result, "lock failed")
        return b""

    def interrupt(self, hdr: Any, body: bytes) -> _NoReply:
        arg = abi.unpack("fuse_interrupt_in", body)
        # Only a waiting SETLKW can be interrupted: everything else is served inline.
        if not self.locks.cancel(self.session, arg.unique):
            self._early_interrupts[arg.unique] = None
            if len(self._early_interrupts) > MAX_EARLY_INTERRUPTS:
                self._early_interrupts.popitem(last=False)
        return NO_REPLY


def _time(valid: int, set_bit: int, now_bit: int, sec: int, nsec: int) -> tuple[int, int]:
    if not valid & set_bit:
        return (0, host_calls.UTIME_OMIT)
    if valid & now_bit:
        return (0, host_calls.UTIME_NOW)
    return (signed64(sec), nsec)


def _record_posix_owner(handle: Handle, owner: int) -> None:
    """`owner` locked through this open file: its POSIX locks end with the file's
    RELEASE unless a FLUSH by that owner ends them first (see FuseServer.release)."""
    handle.node.posix_owners.setdefault(owner, set()).add(handle.fh)
