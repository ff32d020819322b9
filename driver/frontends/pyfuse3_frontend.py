"""The pyfuse3 frontend (`--frontend pyfuse3`): a libfuse file system whose
handlers forward each operation to the virtio-fs device.

The kernel talks FUSE to libfuse (inside pyfuse3); pyfuse3 calls an `Operations`
method; the method sends the matching FUSE request to the device and turns the
reply back into pyfuse3's types. Unlike the relay (which forwards raw FUSE bytes)
this goes through typed operations, so it only offers what pyfuse3 offers: no
POSIX/flock locks (the kernel then keeps locks local to this machine), no ioctl,
fallocate, lseek(SEEK_DATA/HOLE), copy_file_range, tmpfile; setxattr's
CREATE/REPLACE flags emulated by pyfuse3. See docs/frontends.rst.

Device notifications INVAL_INODE, INVAL_ENTRY, DELETE and STORE are passed to the
kernel with pyfuse3's invalidate/store calls, from a worker thread (the kernel
may wait in them for a request this loop has to answer); the others are dropped.

Concurrency design. pyfuse3 runs on trio and starts several worker tasks, each
awaiting one handler. The typed `FuseClient` is synchronous (`Pending.result()`
blocks in `VirtioFs.wait()`), so calling it from a handler would stall the whole
event loop for every request and allow only one request in flight. Instead each
handler packs its request with the same `abi` structs the client uses, sends it
with `VirtioFs.call_async()` and awaits the returned `Pending`:

* one pump task per device eventfd (`VirtioFs.fds()`) waits with
  `trio.lowlevel.wait_readable(fd)`, then calls `on_fd_ready(fd)` and `process()`
  and wakes the handlers whose `Pending` completed; with a polling device
  (`poll=True`, no eventfds) one pump task spins on `process()` while anything is
  in flight and sleeps otherwise;
* `call_async()` would block in `VirtioFs.wait()` (consuming eventfds behind the
  pumps' backs) when no request buffer is free, so a handler first awaits a free
  buffer (`try_acquire`/`release`, then the synchronous `call_async` takes that
  very buffer with no checkpoint in between: everything runs on trio's thread);
* everything touches the device from trio's thread only, so `VirtioFs` needs no
  locking.

The synchronous `FuseClient` is still used where no loop runs: FUSE_INIT before
mounting and FUSE_DESTROY after unmounting.

Inode numbers. pyfuse3 uses one number both as the kernel's nodeid and as the
`st_ino` users see, while the device has opaque nodeids and reports the host's
inode number in `attr.ino`. `InodeMap` gives each device nodeid a local number:
the host inode number when it is free (so `ls -i`, `find -inum` and the ".."
entries of directory listings match the host), otherwise a fresh number from
2**63 up; the root is 1 on both sides. Every entry handed to the kernel (lookup,
create, mknod, mkdir, symlink, link, readdirplus) adds one to the local lookup
count, exactly as the device added one to its own when it produced that entry,
so the kernel's FORGET(local, n) is forwarded as FORGET(nodeid, n) and the
mapping is dropped when the count reaches zero. Readdirplus entries that the
device returned but that did not fit the kernel's buffer are forgotten on the
device at once.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .._native import lib
from ..errors import DeviceTimeoutError, ProtocolError, VfsdrvError
from ..fs import abi
from ..fs.abi import Opcode
from ..fs.client import (
    ROOT_ID,
    FuseClient,
    InvalidReplyError,
    check_attr,
    check_dirent_name,
    check_new_entry,
)
from ..fs.device import Pending, VirtioFs
from .base import FrontendError
from .fuse_dev import (
    DEFAULT_REQUEST_TIMEOUT,
    DESTROY_TIMEOUT,
    FLUSH_LIMIT,
    INIT_TIMEOUT,
    MS_NODEV,
    MS_NOSUID,
    STOP_GRACE,
    STOP_SIGNALS,
    MountOptions,
    is_our_mount,
    libfuse_refused,
    mount_entry,
    syncfs,
    umount,
)
from .progress import RequestDeadline

log = logging.getLogger(__name__)

#: requests in flight: how often the rings are looked at without an interrupt (a
#: device that broke a ring without signalling is caught), and request_timeout judged
WATCHDOG_EVERY = 1.0

#: FUSE_INIT flags asked of the device: the driver's defaults without the lock
#: capabilities (pyfuse3 never forwards a lock request) and without
#: READDIRPLUS_AUTO (this frontend always reads directories with READDIRPLUS),
#: plus POSIX_ACL and SETXATTR_EXT (virtiofsd -o posix_acl refuses a session
#: without both; the kernel side then gets ACLs too).
DEVICE_INIT_FLAGS = (
    VirtioFs.DEFAULT_INIT_FLAGS | abi.InitFlag.POSIX_ACL | abi.InitFlag.SETXATTR_EXT
) & ~(
    abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS | abi.InitFlag.READDIRPLUS_AUTO
)

#: the largest extended attribute value Linux allows (XATTR_SIZE_MAX)
XATTR_SIZE_MAX = 65536
#: how much of a directory to ask the device for per READDIRPLUS
READDIR_CHUNK = 4096
#: the first local inode number handed out when the host's is taken
FRESH_INO_BASE = 1 << 63

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2

_DIRENT = struct.Struct("<QQII")
_NS = 1_000_000_000


# -- inode numbers ----------------------------------------------------------------------
class InodeMap:
    """Local inode number <-> device nodeid, with the kernel's lookup count."""

    def __init__(self) -> None:
        self._to_dev: dict[int, int] = {pyfuse3.ROOT_INODE: ROOT_ID}
        self._to_local: dict[int, int] = {ROOT_ID: pyfuse3.ROOT_INODE}
        self._count: dict[int, int] = {}
        self._next_fresh = FRESH_INO_BASE

    def __len__(self) -> int:
        return len(self._to_dev)

    def nodeid(self, local: int) -> int:
        try:
            return self._to_dev[local]
        except KeyError:
            log.warning("the kernel used inode %d, which it had forgotten", local)
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def local_of(self, nodeid: int) -> int | None:
        return self._to_local.get(nodeid)

    def count(self, local: int) -> int:
        return self._count.get(local, 0)

    def add(self, nodeid: int, host_ino: int) -> int:
        """One more kernel reference to device `nodeid`; its local number."""
        local = self._to_local.get(nodeid)
        if local is None:
            local = self._choose(host_ino)
            self._to_local[nodeid] = local
            self._to_dev[local] = nodeid
        if nodeid != ROOT_ID:
            self._count[local] = self._count.get(local, 0) + 1
        return local

    def _choose(self, host_ino: int) -> int:
        if 1 < host_ino < FRESH_INO_BASE and host_ino not in self._to_dev:
            return host_ino
        while self._next_fresh in self._to_dev:
            self._next_fresh += 1
        local = self._next_fresh
        self._next_fresh += 1
        return local

    def forget(self, local: int, n: int) -> tuple[int, int] | None:
        """The kernel dropped `n` references: (device nodeid, references to forget
        there), never more than were counted, or None (root, unknown)."""
        nodeid = self._to_dev.get(local)
        if nodeid is None or nodeid == ROOT_ID:
            return None
        have = self._count.get(local, 0)
        if n > have:
            log.warning("kernel forgot inode %d %d times, it had %d lookups", local, n, have)
            n = have
        if have - n <= 0:
            del self._to_dev[local], self._to_local[nodeid]
            self._count.pop(local, None)
        else:
            self._count[local] = have - n
        return (nodeid, n) if n else None


@dataclass
class _Handle:
    local: int
    nodeid: int
    fh: int


# -- waiting for the device from trio ------------------------------------------------------
class TrioDevice:
    """`VirtioFs.call_async` made awaitable; many requests in flight at once."""

    def __init__(self, fs: VirtioFs, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.fs = fs
        self.request_timeout = request_timeout  # seconds; 0: off
        self._deadline = RequestDeadline(request_timeout)
        self._done_seq = 0  # the highest unique answered
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.pid = os.getpid()
        self._waiting: dict[Pending, trio.Event] = {}
        self._slot_waiters = 0
        self._progress = trio.Event()  # set (and replaced) after every process()
        self._work = trio.Event()  # polling pump: something was submitted
        self.failure: BaseException | None = None
        self.abandoned = False  # the server is stopping: nothing waits for the device

    async def call(self, opcode: int, nodeid: int, *parts: bytes | memoryview,
                   ctx: Any = None) -> bytes:
        """Send one request; its reply payload, or OSError with the device's errno."""
        pending = await self.submit(opcode, nodeid, *parts, ctx=ctx)
        if not pending.done:
            event = trio.Event()
            self._waiting[pending] = event
            self._work.set()
            try:
                await event.wait()
            finally:
                self._waiting.pop(pending, None)
            if self.abandoned and not pending.done:
                raise OSError(errno.ECONNABORTED, "the server stopped waiting for the device")
        return pending.result(0)

    async def submit(self, opcode: int, nodeid: int, *parts: bytes | memoryview,
                     ctx: Any = None) -> Pending:
        in_len = abi.IN_HEADER_SIZE + sum(len(p) for p in parts)
        large = self.fs.needs_large(opcode, in_len)
        await self._free_slot(large)
        uid, gid, pid = (self.uid, self.gid, self.pid) if ctx is None else (
            ctx.uid, ctx.gid, ctx.pid)
        # no checkpoint between the free-slot check and here: call_async cannot block
        return self.fs.call_async(opcode, nodeid, *parts, uid=uid, gid=gid, pid=pid)

    async def _free_slot(self, large: bool) -> None:
        while True:
            if self.fs.broken is not None:
                raise OSError(errno.ENOTCONN, f"device unusable: {self.fs.broken}")
            if self.abandoned:
                raise OSError(errno.ECONNABORTED, "the server is stopping")
            slot = self.fs.try_acquire(large)
            if slot is not None:
                self.fs.release(slot)
                return
            self._slot_waiters += 1
            self._work.set()
            try:
                await self._progress.wait()
            finally:
                self._slot_waiters -= 1

    def _after_process(self) -> None:
        for pending, event in list(self._waiting.items()):
            if pending.done:
                self._done_seq = max(self._done_seq, pending.unique)
                event.set()
        self._progress.set()
        self._progress = trio.Event()

    def abandon(self) -> None:
        """The server ends: every request still waiting for the device (a stalled one)
        fails with ECONNABORTED, so that pyfuse3's workers can finish."""
        self.abandoned = True
        for event in self._waiting.values():
            event.set()
        self._progress.set()
        self._progress = trio.Event()

    def _fail(self, exc: BaseException) -> None:
        """The device broke: every waiter gets its (synthetic ENOTCONN) reply."""
        self.failure = exc
        self._after_process()

    async def pump(self) -> None:
        """Harvest completions until cancelled. Returns if the device breaks."""
        async with trio.open_nursery() as nursery:
            for fd in self.fs.fds():
                nursery.start_soon(self._guard, self._pump_fd, fd, nursery.cancel_scope)
            if self.fs.poll:
                nursery.start_soon(self._guard, self._pump_poll, None, nursery.cancel_scope)
            elif self.fs.max_wait is not None:  # a queue without an interrupt
                nursery.start_soon(self._guard, self._pump_interval, self.fs.max_wait,
                                   nursery.cancel_scope)
            nursery.start_soon(self._guard, self._watchdog, WATCHDOG_EVERY,
                               nursery.cancel_scope)

    async def _guard(self, pump: Callable[[Any], Awaitable[None]], arg: Any,
                     scope: trio.CancelScope) -> None:
        try:
            await pump(arg)
        except VfsdrvError as exc:
            log.error("virtio-fs device failed: %s", exc)
            self._fail(exc)
            scope.cancel()

    async def _pump_fd(self, fd: int) -> None:
        interrupt = fd != self.fs.transport.error_fd()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self.fs.on_fd_ready(fd)
            if interrupt:
                self.fs.process()
                self._after_process()
            else:
                await trio.sleep(0.05)  # readable but alive: do not spin

    async def _pump_interval(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.fs.process()
            self._after_process()

    async def _watchdog(self, every: float) -> None:
        """While requests are in flight: look at the rings every `every` seconds even
        without an interrupt (a ring the device broke without signalling is found, as
        the relay's pumps do), and fail the device when nothing completes for
        request_timeout seconds, or when one request is left that long while later
        ones are answered (the relay's rule, progress.py). SETLKW, FSYNC and FSYNCDIR
        may take long on a sound device: they do not count."""
        while True:
            await trio.sleep(every)
            if self._waiting or self._slot_waiters:
                self.fs.process()
                self._after_process()
            if not self.request_timeout:
                continue
            counted = [p.unique for p in self._waiting
                       if not p.done and not lib.vfsdrv_may_take_long(p.opcode)]
            # requests waiting for a buffer count too: a device that keeps every
            # buffer (hiprio's FORGETs among them) stalls them as surely
            why = self._deadline.judge(
                0, done=self.fs.stats["replies"], in_flight=len(counted),
                queued=self._slot_waiters, oldest=min(counted, default=None),
                holding=any(not p.done and lib.vfsdrv_may_hold_queue(p.opcode)
                            for p in self._waiting),
                done_seq=self._done_seq, now=trio.current_time())
            if why:
                exc = DeviceTimeoutError(f"the device is unresponsive: {why} "
                                         f"(-o request_timeout={self.request_timeout:g})")
                self.fs.give_up(exc)
                raise exc

    async def _pump_poll(self, _arg: None) -> None:
        while True:
            if self._waiting or self._slot_waiters:
                self.fs.process()
                self._after_process()
                await trio.sleep(0)
            else:
                self._work = trio.Event()
                await self._work.wait()


# -- the file system ------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse_errors(fn: F) -> F:
    """pyfuse3 handlers may only raise FUSEError: map everything else to one."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ProtocolError as exc:  # one reply the kernel would refuse: this request
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except VfsdrvError as exc:  # the device broke or went away (some are OSErrors too)
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.ENOTCONN) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _entry_name(name: bytes) -> bytes:
    return name + b"\0"


def _fill_attr(out: pyfuse3.EntryAttributes, a: Any, local: int) -> None:
    out.st_ino = local
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = a.rdev
    out.st_size = a.size
    out.st_blksize = a.blksize or 4096
    out.st_blocks = a.blocks
    out.st_atime_ns = abi.time_ns(a.atime, a.atimensec)
    out.st_mtime_ns = abi.time_ns(a.mtime, a.mtimensec)
    out.st_ctime_ns = abi.time_ns(a.ctime, a.ctimensec)


def _valid(sec: int, nsec: int) -> float:
    return sec + nsec / _NS


class DeviceOperations(pyfuse3.Operations):
    """pyfuse3 handlers that forward to the virtio-fs device."""

    supports_dot_lookup = False  # no EXPORT_SUPPORT: the device is not asked for ".."
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: VirtioFs, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        super().__init__()
        self.fs = fs
        self.dev = TrioDevice(fs, request_timeout)
        self.detached = False  # unmounted (or lazily detached) by the stop sequence
        #: mountinfo's (id, device, type) of the mount, taken right after pyfuse3.init
        self.mount_entry: tuple[str, str, str] | None = None
        self.inodes = InodeMap()
        self._dropped_codes: set[int] = set()  # notification codes not forwarded, logged
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._notify_send: trio.MemorySendChannel | None = None

    def still_mounted(self, mountpoint: str) -> bool:
        """Whether the mount on `mountpoint` is still this server's (as the relay's
        _still_mounted): never unmount somebody else's mount made at the path since."""
        return not self.detached and is_our_mount(mountpoint, self.mount_entry)

    # -- device notifications ------------------------------------------------------------

    def on_notify(self, code: int, message: memoryview) -> None:
        """`VirtioFs.on_notify`: runs inside `process()`, so it only queues the
        kernel call; `notification_worker` makes it from a thread (the kernel may
        wait in it for a request that this event loop has to answer)."""
        try:
            action = self.notification(code, bytes(message[abi.OUT_HEADER_SIZE:]))
        except ValueError as exc:
            log.warning("ignoring device notification %d: %s", code, exc)
            return
        if action is None:
            return
        if self._notify_send is None:
            log.debug("device notification %d before the file system runs: dropped", code)
            return
        self._notify_send.send_nowait(action)

    def notification(self, code: int, payload: bytes) -> Callable[[], None] | None:
        """The pyfuse3 call that carries a device notification to the kernel, or
        None (unknown inode: the kernel caches nothing of it; a code pyfuse3
        cannot carry: logged). ValueError for a payload the kernel would refuse (the
        notification queue has refused those already: abi.notify_problem)."""
        problem = abi.notify_problem(code, payload)
        if problem is not None:
            raise ValueError(problem)

        def need(struct_name: str) -> Any:
            return abi.unpack(struct_name, payload)

        def name_at(offset: int, namelen: int) -> bytes:
            if namelen == 0:
                raise ValueError("an empty name")
            return payload[offset:offset + namelen]

        if code == abi.NotifyCode.INVAL_INODE:
            out = need("fuse_notify_inval_inode_out")
            local = self.inodes.local_of(out.ino)
            if local is None:
                return None
            # pyfuse3 can drop the attributes (off < 0) or all cached data, not a range
            return functools.partial(pyfuse3.invalidate_inode, local, attr_only=out.off < 0)
        if code == abi.NotifyCode.INVAL_ENTRY:
            out = need("fuse_notify_inval_entry_out")
            parent = self.inodes.local_of(out.parent)
            name = name_at(abi.sizeof("fuse_notify_inval_entry_out"), out.namelen)
            if parent is None:
                return None
            # FUSE_EXPIRE_ONLY cannot be asked of pyfuse3: the entry is dropped instead
            return functools.partial(pyfuse3.invalidate_entry, parent, name)
        if code == abi.NotifyCode.DELETE:
            out = need("fuse_notify_delete_out")
            parent = self.inodes.local_of(out.parent)
            child = self.inodes.local_of(out.child)
            name = name_at(abi.sizeof("fuse_notify_delete_out"), out.namelen)
            if parent is None:
                return None
            if child is None:
                return functools.partial(pyfuse3.invalidate_entry, parent, name)
            return functools.partial(pyfuse3.invalidate_entry, parent, name, deleted=child)
        if code == abi.NotifyCode.STORE:
            out = need("fuse_notify_store_out")
            start = abi.sizeof("fuse_notify_store_out")
            local = self.inodes.local_of(out.nodeid)
            if local is None:
                return None
            return functools.partial(pyfuse3.notify_store, local, out.offset,
                                     payload[start:start + out.size])
        if len(self._dropped_codes) < 16 and code not in self._dropped_codes:
            self._dropped_codes.add(code)  # a device's flood of them is logged once a code
            log.info("device notification %d has no pyfuse3 equivalent: not forwarded "
                     "(logged once)", code)
        return None

    async def notification_worker(self) -> None:
        send, receive = trio.open_memory_channel(float("inf"))
        self._notify_send = send
        try:
            async with receive:
                async for action in receive:
                    try:
                        # abandoned at shutdown: the kernel may wait in it forever
                        await trio.to_thread.run_sync(action, abandon_on_cancel=True)
                    except OSError as exc:  # e.g. ENOENT: the kernel dropped it already
                        log.debug("notification not applied: %s", exc)
        finally:
            self._notify_send = None

    # -- helpers ------------------------------------------------------------------------
    def _new_handle(self, local: int, nodeid: int, fh: int) -> int:
        h = self._next_fh
        self._next_fh += 1
        self._handles[h] = _Handle(local, nodeid, fh)
        return h

    def _handle(self, h: int) -> _Handle:
        try:
            return self._handles[h]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _entry(self, e: Any, opcode: int = Opcode.LOOKUP) -> pyfuse3.EntryAttributes:
        """A device fuse_entry_out as pyfuse3 entry; counts one kernel reference. The
        reply is judged first by the typed client's rules (InvalidReplyError: EIO)."""
        out = pyfuse3.EntryAttributes()
        out.entry_timeout = _valid(e.entry_valid, e.entry_valid_nsec)
        out.attr_timeout = _valid(e.attr_valid, e.attr_valid_nsec)
        what = abi.opcode_name(opcode)
        if opcode != Opcode.LOOKUP:
            check_new_entry(e, what)
        elif e.nodeid == 0:  # negative entry: cached by the kernel for entry_timeout
            out.st_ino = 0
            return out
        else:
            check_attr(e.attr, what)
        out.generation = e.generation
        local = self.inodes.add(e.nodeid, e.attr.ino)
        _fill_attr(out, e.attr, local)
        return out

    async def _entry_call(self, opcode: int, nodeid: int, *parts: bytes,
                          ctx: Any = None) -> pyfuse3.EntryAttributes:
        reply = await self.dev.call(opcode, nodeid, *parts, ctx=ctx)
        return self._entry(abi.unpack("fuse_entry_out", reply), opcode)

    def _attr_out(self, reply: bytes, local: int, opcode: int) -> pyfuse3.EntryAttributes:
        out = abi.unpack("fuse_attr_out", reply)
        check_attr(out.attr, abi.opcode_name(opcode))
        attr = pyfuse3.EntryAttributes()
        attr.attr_timeout = _valid(out.attr_valid, out.attr_valid_nsec)
        _fill_attr(attr, out.attr, local)
        return attr

    async def _forget_on_device(self, items: list[tuple[int, int]]) -> None:
        for i in range(0, len(items), 256):
            batch = items[i:i + 256]
            body = abi.pack("fuse_batch_forget_in", count=len(batch)) + b"".join(
                abi.pack("fuse_forget_one", nodeid=n, nlookup=c) for n, c in batch)
            # hiprio: no reply; the submission alone is the whole request
            await self.dev.submit(Opcode.BATCH_FORGET, 0, body)

    # -- names and attributes -------------------------------------------------------------
    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._entry_call(Opcode.LOOKUP, self.inodes.nodeid(parent_inode),
                                      _entry_name(name), ctx=ctx)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        items = []
        for local, n in inode_list:
            item = self.inodes.forget(local, n)
            if item is not None:
                items.append(item)
        if items:
            try:
                await self._forget_on_device(items)
            except Exception as exc:  # forget must not raise
                log.warning("FORGET of %d inode(s) not sent to the device: %s", len(items), exc)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
        reply = await self.dev.call(Opcode.GETATTR, self.inodes.nodeid(inode), body, ctx=ctx)
        return self._attr_out(reply, inode, Opcode.GETATTR)

    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        valid = 0
        f: dict[str, int] = {}
        if fields.update_mode:
            valid |= abi.FATTR_MODE
            f["mode"] = attr.st_mode
        if fields.update_uid:
            valid |= abi.FATTR_UID
            f["uid"] = attr.st_uid
        if fields.update_gid:
            valid |= abi.FATTR_GID
            f["gid"] = attr.st_gid
        if fields.update_size:
            valid |= abi.FATTR_SIZE
            f["size"] = attr.st_size
        if fields.update_atime:
            valid |= abi.FATTR_ATIME
            f["atime"], f["atimensec"] = abi.wire_time(attr.st_atime_ns)
        if fields.update_mtime:
            valid |= abi.FATTR_MTIME
            f["mtime"], f["mtimensec"] = abi.wire_time(attr.st_mtime_ns)
        if getattr(fields, "update_ctime", False):  # not in every pyfuse3 release
            valid |= abi.FATTR_CTIME
            f["ctime"], f["ctimensec"] = abi.wire_time(attr.st_ctime_ns)
        if fh is not None:
            valid |= abi.FATTR_FH
            f["fh"] = self._handle(fh).fh
        body = abi.pack("fuse_setattr_in", valid=valid, **f)
        reply = await self.dev.call(Opcode.SETATTR, self.inodes.nodeid(inode), body, ctx=ctx)
        return self._attr_out(reply, inode, Opcode.SETATTR)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.dev.call(Opcode.READLINK, self.inodes.nodeid(inode), ctx=ctx)

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        body = abi.pack("fuse_mknod_in", mode=mode, rdev=rdev, umask=ctx.umask)
        return await self._entry_call(Opcode.MKNOD, self.inodes.nodeid(parent_inode), body,
                                      _entry_name(name), ctx=ctx)

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        body = abi.pack("fuse_mkdir_in", mode=mode, umask=ctx.umask)
        return await self._entry_call(Opcode.MKDIR, self.inodes.nodeid(parent_inode), body,
                                      _entry_name(name), ctx=ctx)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(Opcode.UNLINK, self.inodes.nodeid(parent_inode), _entry_name(name),
                            ctx=ctx)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(Opcode.RMDIR, self.inodes.nodeid(parent_inode), _entry_name(name),
                            ctx=ctx)

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._entry_call(Opcode.SYMLINK, self.inodes.nodeid(parent_inode),
                                      _entry_name(name), target + b"\0", ctx=ctx)

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        old = self.inodes.nodeid(parent_inode_old)
        new = self.inodes.nodeid(parent_inode_new)
        if flags:
            body = abi.pack("fuse_rename2_in", newdir=new, flags=flags)
            await self.dev.call(Opcode.RENAME2, old, body, _entry_name(name_old),
                                _entry_name(name_new), ctx=ctx)
        else:
            body = abi.pack("fuse_rename_in", newdir=new)
            await self.dev.call(Opcode.RENAME, old, body, _entry_name(name_old),
                                _entry_name(name_new), ctx=ctx)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        body = abi.pack("fuse_link_in", oldnodeid=self.inodes.nodeid(inode))
        return await self._entry_call(Opcode.LINK, self.inodes.nodeid(new_parent_inode), body,
                                      _entry_name(new_name), ctx=ctx)

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        try:
            await self.dev.call(Opcode.ACCESS, self.inodes.nodeid(inode),
                                abi.pack("fuse_access_in", mask=mode), ctx=ctx)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                return False
            if exc.errno == errno.ENOSYS:  # device leaves permissions to us: allow
                return True
            raise
        return True

    @_fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        reply = abi.unpack("fuse_statfs_out", await self.dev.call(Opcode.STATFS, ROOT_ID, ctx=ctx))
        st = reply.st  # a view into `reply`, which must stay alive
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.frsize or st.bsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.ffree
        out.f_namemax = st.namelen
        return out

    # -- files ------------------------------------------------------------------------
    def _file_info(self, local: int, nodeid: int, out: Any) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo()
        info.fh = self._new_handle(local, nodeid, out.fh)
        info.direct_io = bool(out.open_flags & FOPEN_DIRECT_IO)
        info.keep_cache = bool(out.open_flags & FOPEN_KEEP_CACHE)
        info.nonseekable = bool(out.open_flags & FOPEN_NONSEEKABLE)
        return info

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        nodeid = self.inodes.nodeid(inode)
        reply = await self.dev.call(Opcode.OPEN, nodeid, abi.pack("fuse_open_in", flags=flags),
                                    ctx=ctx)
        return self._file_info(inode, nodeid, abi.unpack("fuse_open_out", reply))

    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        body = abi.pack("fuse_create_in", flags=flags, mode=mode, umask=ctx.umask)
        reply = await self.dev.call(Opcode.CREATE, self.inodes.nodeid(parent_inode), body,
                                    _entry_name(name), ctx=ctx)
        e = abi.unpack("fuse_entry_out", reply)
        out = abi.unpack("fuse_open_out", reply, abi.sizeof("fuse_entry_out"))
        entry = self._entry(e, Opcode.CREATE)
        return self._file_info(entry.st_ino, e.nodeid, out), entry

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        chunks: list[bytes] = []
        while size > 0:
            n = min(size, self.fs.max_io)
            body = abi.pack("fuse_read_in", fh=h.fh, offset=off, size=n)
            data = await self.dev.call(Opcode.READ, h.nodeid, body)
            if len(data) > n:
                raise OSError(errno.EIO, f"READ of {n} bytes returned {len(data)}")
            chunks.append(data)
            if len(data) < n:
                break
            off += n
            size -= n
        return b"".join(chunks)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        view = memoryview(buf)
        done = 0
        while done < len(view):
            piece = view[done:done + self.fs.max_write]
            body = abi.pack("fuse_write_in", fh=h.fh, offset=off + done, size=len(piece))
            out = abi.unpack("fuse_write_out",
                             await self.dev.call(Opcode.WRITE, h.nodeid, body, piece))
            if out.size > len(piece):
                raise OSError(errno.EIO, f"WRITE of {len(piece)} bytes reported {out.size}")
            done += out.size
            if out.size < len(piece):
                break
        return done

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        await self.dev.call(Opcode.FLUSH, h.nodeid, abi.pack("fuse_flush_in", fh=h.fh))

    @_fuse_errors
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            await self.dev.call(Opcode.RELEASE, h.nodeid, abi.pack("fuse_release_in", fh=h.fh))

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        body = abi.pack("fuse_fsync_in", fh=h.fh,
                        fsync_flags=abi.FUSE_FSYNC_FDATASYNC if datasync else 0)
        await self.dev.call(Opcode.FSYNC, h.nodeid, body)

    # -- extended attributes ------------------------------------------------------------------
    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        body = abi.pack("fuse_setxattr_in", size=len(value), flags=0)
        if not self.fs.init_flags & abi.InitFlag.SETXATTR_EXT:
            body = body[: abi.COMPAT_SETXATTR_IN_SIZE]
        await self.dev.call(Opcode.SETXATTR, self.inodes.nodeid(inode), body, name + b"\0",
                            value, ctx=ctx)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.dev.call(Opcode.GETXATTR, self.inodes.nodeid(inode),
                                   abi.pack("fuse_getxattr_in", size=XATTR_SIZE_MAX),
                                   name + b"\0", ctx=ctx)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        reply = await self.dev.call(Opcode.LISTXATTR, self.inodes.nodeid(inode),
                                    abi.pack("fuse_getxattr_in", size=XATTR_SIZE_MAX), ctx=ctx)
        return [n for n in reply.split(b"\0") if n]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(Opcode.REMOVEXATTR, self.inodes.nodeid(inode), name + b"\0",
                            ctx=ctx)

    # -- directories ------------------------------------------------------------------------
    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        nodeid = self.inodes.nodeid(inode)
        reply = await self.dev.call(Opcode.OPENDIR, nodeid,
                                    abi.pack("fuse_open_in", flags=os.O_RDONLY), ctx=ctx)
        return self._new_handle(inode, nodeid, abi.unpack("fuse_open_out", reply).fh)

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        h = self._handle(fh)
        off = start_id
        while True:
            body = abi.pack("fuse_read_in", fh=h.fh, offset=off, size=READDIR_CHUNK)
            data = await self.dev.call(Opcode.READDIRPLUS, h.nodeid, body)
            if not data:
                return
            entries = _parse_direntplus(data)
            for i, (name, dirent_ino, next_off, e) in enumerate(entries):
                if name in (b".", b".."):
                    attr = pyfuse3.EntryAttributes()
                    attr.st_mode = stat.S_IFDIR
                    attr.st_ino = h.local if name == b"." else (
                        pyfuse3.ROOT_INODE if h.nodeid == ROOT_ID else dirent_ino)
                    if not pyfuse3.readdir_reply(token, name, attr, next_off):
                        await self._unsent(entries[i + 1:])
                        return
                    continue
                if e.nodeid == 0:  # the device gave a name without an entry
                    try:
                        e = abi.unpack("fuse_entry_out", await self.dev.call(
                            Opcode.LOOKUP, h.nodeid, _entry_name(name)))
                    except OSError:
                        continue  # gone meanwhile
                try:
                    check_attr(e.attr, "READDIRPLUS")
                except InvalidReplyError as exc:
                    # as the kernel's fuse_direntplus_link: this entry is refused (and
                    # forgotten on the device), the listing goes on
                    log.warning("readdir: %r left out: %s", name, exc)
                    await self._unsent([(name, dirent_ino, next_off, e)])
                    continue
                attr = pyfuse3.EntryAttributes()
                attr.entry_timeout = _valid(e.entry_valid, e.entry_valid_nsec)
                attr.attr_timeout = _valid(e.attr_valid, e.attr_valid_nsec)
                attr.generation = e.generation
                local = self.inodes.add(e.nodeid, e.attr.ino)
                _fill_attr(attr, e.attr, local)
                if not pyfuse3.readdir_reply(token, name, attr, next_off):
                    # not given to the kernel: undo our count and the device's
                    self.inodes.forget(local, 1)
                    await self._unsent(entries[i:])
                    return
            off = entries[-1][2]

    async def _unsent(self, entries: list[tuple[bytes, int, int, Any]]) -> None:
        """READDIRPLUS entries the kernel did not take: the device counted them."""
        items = [(e.nodeid, 1) for name, _ino, _off, e in entries
                 if e.nodeid != 0 and name not in (b".", b"..")]
        if items:
            await self._forget_on_device(items)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            await self.dev.call(Opcode.RELEASEDIR, h.nodeid,
                                abi.pack("fuse_release_in", fh=h.fh))

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        body = abi.pack("fuse_fsync_in", fh=h.fh,
                        fsync_flags=abi.FUSE_FSYNC_FDATASYNC if datasync else 0)
        await self.dev.call(Opcode.FSYNCDIR, h.nodeid, body)


def _parse_direntplus(data: bytes) -> list[tuple[bytes, int, int, Any]]:
    """(name, dirent ino, next offset, fuse_entry_out) for each READDIRPLUS entry,
    every length checked against the buffer."""
    out = []
    pos = 0
    esize = abi.sizeof("fuse_entry_out")
    while pos < len(data):
        if pos + esize + _DIRENT.size > len(data):
            raise OSError(errno.EIO, f"truncated READDIRPLUS entry at offset {pos}")
        e = abi.unpack("fuse_entry_out", data, pos)
        ino, off, namelen, _typ = _DIRENT.unpack_from(data, pos + esize)
        start = pos + esize + _DIRENT.size
        if start + namelen > len(data):
            raise OSError(errno.EIO, f"READDIRPLUS name length {namelen} at {pos} is invalid")
        name = bytes(data[start:start + namelen])
        check_dirent_name(name, pos)
        out.append((name, ino, off, e))
        pos += abi.direntplus_size(namelen)
    return out


# -- serve ------------------------------------------------------------------------------
def libfuse_options(options: Sequence[str], fsname: str) -> set[str]:
    """The user's -o options as libfuse mount options, read by the relay's own parser
    (MountOptions) so that both frontends accept the same options and give the same
    mount: allow_other and default_permissions unless turned off, and none of
    libfuse's own defaults (it adds nosuid,nodev unless told suid,dev). Unknown
    options raise MountError before anything is mounted."""
    groups = []
    for group in options:  # fsname= names the source; the relay takes it the same way
        kept = []
        for opt in group.split(","):
            key, _, value = opt.partition("=")
            if key == "fsname" and value:
                fsname = value
            else:
                kept.append(opt)
        groups.append(",".join(kept))
    mo = MountOptions.parse(groups)
    mo.check()
    names = mo.flag_names()
    refused = libfuse_refused(mo)
    if refused:
        raise FrontendError(refused)
    # relatime is the kernel's default: libfuse has no option for it
    opts = {n for n in names if n != "relatime"}
    opts.add("nosuid" if mo.flags & MS_NOSUID else "suid")
    opts.add("nodev" if mo.flags & MS_NODEV else "dev")
    if mo.allow_other:
        opts.add("allow_other")
    if mo.default_permissions:
        opts.add("default_permissions")
    opts.update(mo.fuse)
    opts |= {f"fsname={fsname}", "subtype=vfsdrv"}
    return opts


def serve(fs: VirtioFs, mountpoint: str, *, options: list[str], debug: bool = False,
          ready: Callable[[], None] | None = None, source: str | None = None) -> None:
    """FUSE_INIT the device, mount `mountpoint` with pyfuse3, call `ready()` once the
    file system answers, serve until unmounted or SIGTERM/SIGINT/SIGHUP (main thread
    only), unmount, and send FUSE_DESTROY. `ready` runs on the event loop: it must
    not touch the mount itself. If the device goes away the mount stays, as a dead
    FUSE daemon's, and answers ENOTCONN until unmounted; the device's error
    (DeviceGoneError) is raised. The caller still owns (and closes) `fs`. `source`
    is what the mount table shows (default: the tag); the options are the relay's
    (libfuse_options)."""
    tag = fs.config.tag if fs.config is not None else "virtiofs"
    opts = libfuse_options(options, source or tag)  # refuse bad options before INIT
    chosen = MountOptions.parse(list(options)).request_timeout
    client = FuseClient(fs)
    client.timeout = fs.transport.timeout or INIT_TIMEOUT
    if getattr(fs, "init_out", None) is None:
        try:
            client.init(DEVICE_INIT_FLAGS)
        except (OSError, TimeoutError) as exc:
            raise FrontendError(f"FUSE_INIT with the device failed: {exc}") from exc
    if not fs.init_flags & abi.InitFlag.DO_READDIRPLUS:
        log.warning("the device did not grant READDIRPLUS; directory listings may fail")
    log.info("pyfuse3 frontend: POSIX and flock locks stay with this machine's kernel "
             "(pyfuse3 has no lock handlers): they do not exclude other mounts of the "
             "device; the relay frontend passes them on")
    ops = DeviceOperations(fs, DEFAULT_REQUEST_TIMEOUT if chosen is None else chosen)
    # ACL checks in the kernel exactly when the device stores ACLs
    ops.enable_acl = bool(fs.init_flags & abi.InitFlag.POSIX_ACL)
    if debug:
        opts.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as exc:  # libfuse printed why (mount point, options) on stderr
        raise FrontendError(f"pyfuse3 could not mount {mountpoint}: {exc}") from exc
    ops.mount_entry = mount_entry(mountpoint)
    previous_on_notify, fs.on_notify = fs.on_notify, ops.on_notify
    try:
        trio.run(_main, ops, ready, mountpoint)
    finally:
        fs.on_notify = previous_on_notify
        try:
            # a failed device ends the server as a dead FUSE daemon: the mount stays
            # and answers ENOTCONN until unmounted (nothing lands underneath it)
            pyfuse3.close(unmount=ops.dev.failure is None and ops.still_mounted(mountpoint))
        finally:
            try:
                if fs.broken is None and not ops.dev.abandoned:
                    client.timeout = DESTROY_TIMEOUT
                    client.destroy()
            except (OSError, VfsdrvError, TimeoutError) as exc:
                log.warning("FUSE_DESTROY failed: %s", exc)
    if ops.dev.failure is not None:
        log.error("%s stays mounted and answers ENOTCONN until it is unmounted "
                  "(vfsdrv umount %s)", mountpoint, mountpoint)
        raise ops.dev.failure  # left mounted and disconnected, as a dead daemon's


async def _main(ops: DeviceOperations, ready: Callable[[], None] | None,
                mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.notification_worker)
        nursery.start_soon(_pump_then_stop, ops.dev)
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(_signals, ops, mountpoint)
        await trio.sleep(0)
        main_done = trio.Event()

        async def run_main() -> None:
            try:
                await pyfuse3.main()
            finally:
                main_done.set()

        nursery.start_soon(run_main)
        await trio.sleep(0)
        if ready is not None:
            ready()
        await main_done.wait()
        nursery.cancel_scope.cancel()


async def _pump_then_stop(dev: TrioDevice) -> None:
    await dev.pump()
    # only reached when the device broke: nothing more can be served
    log.error("stopping the pyfuse3 frontend: the device failed")
    pyfuse3.terminate()


async def _signals(ops: DeviceOperations, mountpoint: str) -> None:
    """SIGTERM/SIGINT/SIGHUP, as the relay: write back the mount's dirty pages while the
    device still serves (for at most FLUSH_LIMIT seconds), unmount it, or detach it
    when busy and serve STOP_GRACE seconds more; then requests still waiting for the
    device fail and the session ends. A second signal skips what is left."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %d: writing back and unmounting %s", signum, mountpoint)
            break
        hurry = trio.Event()
        async with trio.open_nursery() as outer:
            async def again() -> None:
                async for _ in signals:
                    log.warning("%s: asked again to stop: unmounting at once", mountpoint)
                    hurry.set()

            outer.start_soon(again)
            with trio.move_on_after(FLUSH_LIMIT) as flushing:
                async with trio.open_nursery() as nursery:
                    async def flush() -> None:
                        try:
                            await trio.to_thread.run_sync(syncfs, mountpoint,
                                                          abandon_on_cancel=True)
                        except OSError as exc:
                            log.warning("writing back %s: %s", mountpoint, exc)
                        nursery.cancel_scope.cancel()

                    async def hurried() -> None:
                        await hurry.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(flush)
                    nursery.start_soon(hurried)
            if flushing.cancelled_caught:
                log.warning("%s: the device did not write back within %.0f s: stopping",
                            mountpoint, FLUSH_LIMIT)
            elif not hurry.is_set():
                busy = await trio.to_thread.run_sync(_detach, ops, mountpoint,
                                                     abandon_on_cancel=True)
                if busy:
                    with trio.move_on_after(STOP_GRACE):
                        await hurry.wait()
            outer.cancel_scope.cancel()
        ops.dev.abandon()
        pyfuse3.terminate()


def _detach(ops: DeviceOperations, mountpoint: str) -> bool:
    """Unmount, or detach lazily when busy (True): programs using it get STOP_GRACE
    seconds more. Either way the server never unmounts that path again (it may hold
    somebody else's mount by then)."""
    if not ops.still_mounted(mountpoint):
        ops.detached = True  # gone already (or covered): nothing of ours to unmount there
        return False
    try:
        umount(mountpoint)
        ops.detached = True
        return False
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            log.warning("unmounting %s: %s", mountpoint, exc)
            return False
    log.warning("%s is busy: detached; %.0f s from now programs using it get errors "
                "(ECONNABORTED, then ENOTCONN; signal again to stop at once)",
                mountpoint, STOP_GRACE)
    umount(mountpoint, lazy=True)
    ops.detached = True
    return True
