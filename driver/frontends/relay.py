"""The relay frontend: the kernel's FUSE protocol on /dev/fuse, forwarded byte for
byte to a virtio-fs device.

One event loop (selectors/epoll) waits on /dev/fuse, the device's interrupt fds
(and its error fd), and a wake-up pipe for signals. A request is read from
/dev/fuse straight into a DMA slot (`os.readv` into `slot.view`), submitted as it
is (its fuse_in_header, unique included, is the device's), and the device's reply
(out header + payload, in DMA memory) is written back to /dev/fuse as it is: no
per-request decoding or re-encoding. Only FUSE_INIT is answered here (see below).

Back-pressure. The size of a request is not known before it is read, and a read
from /dev/fuse must offer room for the largest one (fuse_in_header + fuse_write_in
+ max_write, or the kernel fails the read with EINVAL). So the relay keeps one free
*large* slot as its landing buffer and reads /dev/fuse only while it has one; when
no large slot is free it stops polling /dev/fuse and the kernel holds the requests
(its own max_background/congestion limits then apply). A request that turns out
small (request and reply room fit a small slot: everything except big READs,
WRITEs, READDIRs, xattrs) is copied into a free small slot (a few hundred bytes,
the landing slot stays reserved); a big one is submitted from the landing slot
itself and the next free large slot becomes the landing slot. So small requests
can be in flight by the dozens while large ones are bounded by the large slots,
and the kernel never sees a short read buffer.

FUSE_INIT. The kernel's INIT is not forwarded: the relay starts the device's
session itself with what the kernel offered, filtered to what a relay can carry,
then answers the kernel with what the device granted. Both sides thus see the same
flag set, so every format that depends on a flag (SETXATTR_EXT's larger
setxattr_in, SECURITY_CTX and CREATE_SUPP_GROUP extensions, INIT_EXT's flags2,
DONT_MASK's umask handling, POSIX/flock locks) agrees between kernel and device.
Never offered: splice (no pipe on a virtqueue), DAX (MAP_ALIGNMENT,
HAS_INODE_DAX: no DAX window here), PASSTHROUGH (fd based), OVER_IO_URING,
HAS_RESEND (the relay keeps no copy to resend), REQUEST_TIMEOUT (a blocking lock
may wait forever), ALLOW_IDMAP, FILE_OPS and any bit this code does not know. The
minor is the smallest of kernel's, device's and ours; max_write and max_pages are
clamped to what a large slot (and thus a descriptor chain) carries.

FORGET and BATCH_FORGET are forwarded like any request (the device routes them to
the hiprio queue and expects no reply); so are GETLK, SETLK, SETLKW and flock
requests (a SETLKW answered "wait" is completed later by the device from its
notification queue; the relay just gets the final reply). FUSE_INTERRUPT goes to
the device (hiprio) only when it names a SETLKW still pending: that is the one
request a device may hold indefinitely, and the only one worth interrupting. The
others the relay ignores, as FUSE allows (the kernel keeps waiting for the
original reply): Linux's own virtio-fs driver never sends INTERRUPT, and
virtiofsd 7.2 answers an INTERRUPT whose request it has already finished with an
EAGAIN reply on a buffer it no longer owns, and dies. Other device
notifications are forwarded to the kernel with unique 0 and error = code, from a
writer thread (a notification write may wait on the file system, which only this
loop serves).
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import queue
import selectors
import signal
import struct
import threading
import time
from collections.abc import Callable

from ..errors import DeviceGoneError, VfsdrvError
from ..fs import abi
from ..fs.abi import IN_HEADER_SIZE, OUT_HEADER_SIZE, InitFlag, Opcode
from ..fs.device import Completion, Slot, VirtioFs
from ..fs.sizing import reply_capacity
from .base import FrontendError
from .fuse_dev import (
    MountOptions,
    check_mountpoint,
    is_mount_point,
    mount_fuse,
    open_fuse_device,
    require_root,
    umount_busy_lazy,
)

log = logging.getLogger(__name__)
reqlog = logging.getLogger("vfsdrv.relay.requests")

IN_HEADER = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid
OUT_HEADER = struct.Struct("<IiQ")
INTERRUPT_IN = struct.Struct("<Q")
PAGE = mmap.PAGESIZE

#: INIT flags the relay can carry when both kernel and device agree on them
RELAY_FLAGS = (
    InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.EXPORT_SUPPORT | InitFlag.BIG_WRITES | InitFlag.DONT_MASK
    | InitFlag.FLOCK_LOCKS | InitFlag.HAS_IOCTL_DIR | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO | InitFlag.ASYNC_DIO
    | InitFlag.WRITEBACK_CACHE | InitFlag.NO_OPEN_SUPPORT | InitFlag.PARALLEL_DIROPS
    | InitFlag.HANDLE_KILLPRIV | InitFlag.POSIX_ACL | InitFlag.ABORT_ERROR
    | InitFlag.MAX_PAGES | InitFlag.CACHE_SYMLINKS | InitFlag.NO_OPENDIR_SUPPORT
    | InitFlag.EXPLICIT_INVAL_DATA | InitFlag.SUBMOUNTS | InitFlag.HANDLE_KILLPRIV_V2
    | InitFlag.SETXATTR_EXT | InitFlag.SECURITY_CTX | InitFlag.CREATE_SUPP_GROUP
    | InitFlag.HAS_EXPIRE_ONLY | InitFlag.DIRECT_IO_ALLOW_MMAP | InitFlag.NO_EXPORT_SUPPORT
)
#: offered by the kernel, never by the relay (see the module docstring)
NEVER_OFFERED = (
    InitFlag.SPLICE_WRITE | InitFlag.SPLICE_MOVE | InitFlag.SPLICE_READ
    | InitFlag.MAP_ALIGNMENT | InitFlag.HAS_INODE_DAX | InitFlag.PASSTHROUGH
    | InitFlag.OVER_IO_URING | InitFlag.HAS_RESEND | InitFlag.REQUEST_TIMEOUT
    | InitFlag.ALLOW_IDMAP | InitFlag.FILE_OPS
)
#: notification codes the kernel accepts on /dev/fuse (7 is RESEND/LOCK: the device's)
KERNEL_NOTIFY_CODES = frozenset({1, 2, 3, 4, 5, 6, 8, 9})
#: unique of the relay's own FUSE_DESTROY: far from the kernel's counter (even, no
#: interrupt bit, no FUSE_UNIQUE_RESEND bit)
OWN_UNIQUE = 1 << 62
#: reads from /dev/fuse per loop round before completions get a turn
READ_BATCH = 64
#: after SIGTERM/SIGINT, how long a lazily detached (busy) mount is served before
#: the connection is aborted
STOP_GRACE = 3.0
MAX_ERRNO = 4095


def serve(
    fs: VirtioFs,
    mountpoint: str,
    *,
    options: list[str],
    debug: bool = False,
    ready: Callable[[], None] | None = None,
) -> None:
    """Mount `fs` on `mountpoint` through /dev/fuse and relay until unmounted."""
    Relay(fs, mountpoint, options=options, debug=debug, ready=ready).run()


class Relay:
    def __init__(
        self,
        fs: VirtioFs,
        mountpoint: str,
        *,
        options: list[str],
        debug: bool = False,
        ready: Callable[[], None] | None = None,
    ) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.options = MountOptions.parse(options)
        self.debug = debug
        self.ready = ready
        self.fuse_fd = -1
        self.mounted = False
        self.initialized = False
        self.conn_gone = False
        self.destroyed = False
        self.landing: Slot | None = None
        self.inflight = 0
        self.stop_at: float | None = None
        self.error: BaseException | None = None
        self._fuse_registered = False
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._pending_debug: dict[int, tuple[int, int, float]] = {}
        self._setlkw: set[int] = set()  # SETLKW uniques the device has not answered
        self._notify_q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._notify_thread: threading.Thread | None = None
        self.stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        require_root()
        if not self.fs.started:
            raise FrontendError("the device must be started before serving it")
        self.options.check()
        mp = check_mountpoint(self.mountpoint)
        self.mountpoint = mp
        handler = self._debug_handler() if self.debug else None
        old_signals = self._install_signals()
        try:
            self.fuse_fd = open_fuse_device()
            tag = self.fs.config.tag if self.fs.config is not None else "vfsdrv"
            mount_fuse(self.fuse_fd, mp, tag, self.options)
            self.mounted = True
            log.info("mounted %r on %s", tag, mp)
            self.fs.on_notify = self._on_notify
            self._loop()
        finally:
            self._shutdown()
            self._restore_signals(old_signals)
            if handler is not None:
                reqlog.removeHandler(handler)
                reqlog.propagate = True
        if self.error is not None:
            raise self.error

    def _shutdown(self) -> None:
        """Abort the connection (if the kernel still has it), unmount (if still
        mounted), end the device session. Aborting first means unmounting can never
        wait for a request that only this (now stopped) loop would answer."""
        self.fs.on_notify = None
        if self._notify_thread is not None:
            self._notify_q.put(None)
            self._notify_thread.join(2)
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)
            self.fuse_fd = -1
        self.conn_gone = True
        if self.mounted:
            try:
                if is_mount_point(self.mountpoint, resolved=True):
                    umount_busy_lazy(self.mountpoint)
            except OSError as exc:
                log.error("could not unmount %s: %s", self.mountpoint, exc)
        if self._sel is not None:
            self._sel.close()
        if self.landing is not None:
            self.fs.release(self.landing)
            self.landing = None
        self._end_device_session()
        st = self.stats
        summary = (f"{st['requests']} requests ({st['small']} in small slots, {st['large']} in "
                   f"large ones), stopped reading /dev/fuse {st['stalls']} times for want of a "
                   f"slot, {st['interrupts_ignored']} interrupts ignored, "
                   f"{st['notifications']} notifications forwarded")
        log.info("%s", summary)
        if self.debug:
            reqlog.debug("%s", summary)

    def _end_device_session(self) -> None:
        fs = self.fs
        if not self.initialized or self.destroyed or fs.broken is not None:
            return
        try:
            deadline = time.monotonic() + 2.0
            while self.inflight and time.monotonic() < deadline:
                fs.wait(0.1)
            fs.call_async(Opcode.DESTROY, 0, unique=OWN_UNIQUE).result(5.0)
            self.destroyed = True
            log.info("FUSE_DESTROY sent to the device")
            if self.debug:
                reqlog.debug("unique %d DESTROY (the relay's own) -> ok", OWN_UNIQUE)
        except (VfsdrvError, OSError, TimeoutError, ValueError) as exc:
            log.warning("FUSE_DESTROY to the device failed: %s", exc)

    def _install_signals(self) -> dict[int, object] | None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _restore_signals(self, old: dict[int, object] | None) -> None:
        if old:
            for sig, handler in old.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: unmounting %s", signum, self.mountpoint)
        self.stop()

    def stop(self) -> None:
        """Unmount and end serving (safe from signal handlers and other threads)."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"s")
            except BlockingIOError:
                pass

    def _debug_handler(self) -> logging.Handler | None:
        reqlog.setLevel(logging.DEBUG)
        if reqlog.hasHandlers() and logging.getLogger().level <= logging.DEBUG:
            return None
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("relay: %(message)s"))
        reqlog.addHandler(handler)
        reqlog.propagate = False
        return handler

    # -- the event loop --------------------------------------------------------------------
    def _loop(self) -> None:
        fs = self.fs
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for fd in fs.fds():
            sel.register(fd, selectors.EVENT_READ, "device")
        self._set_fuse_polling(True)
        try:
            while not self.conn_gone:
                fuse_ready = False
                for key, _ev in sel.select(self._timeout()):
                    if key.data == "device":
                        fs.on_fd_ready(key.fd)
                    elif key.data == "fuse":
                        fuse_ready = True
                    else:
                        self._on_wake()
                fs.process()
                if fuse_ready or (self.landing is None and not self._fuse_registered):
                    self._read_requests()
                self._set_fuse_polling(self._have_landing())
                if self.stop_at is not None and time.monotonic() > self.stop_at:
                    log.warning("%s still busy after %.0f s: aborting the connection",
                                self.mountpoint, STOP_GRACE)
                    break
        except FrontendError as exc:
            log.error("%s", exc)
            self.error = exc
        except DeviceGoneError as exc:
            log.error("device gone: %s", exc)
            self.error = FrontendError(f"the device went away: {exc}")
        except VfsdrvError as exc:
            log.error("device failed: %s", exc)
            self.error = FrontendError(f"the device failed: {exc}")

    def _timeout(self) -> float | None:
        if self.stop_at is not None:
            return 0.1
        if self.fs.poll:
            return 0.0 if self.inflight or self.fs.lock_waiters else 0.005
        return self.fs.max_wait  # a queue without an interrupt is looked at this often

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass
        if self.stop_at is None:
            self.stop_at = time.monotonic() + STOP_GRACE
            threading.Thread(target=self._unmount_worker, name="vfsdrv-umount",
                             daemon=True).start()

    def _unmount_worker(self) -> None:
        # not in the loop's thread: the kernel may need the loop while unmounting
        try:
            umount_busy_lazy(self.mountpoint)
        except OSError as exc:
            log.error("unmounting %s: %s", self.mountpoint, exc)

    def _set_fuse_polling(self, on: bool) -> None:
        if on == self._fuse_registered or self.conn_gone or self._sel is None:
            return
        if on:
            self._sel.register(self.fuse_fd, selectors.EVENT_READ, "fuse")
        else:
            self._sel.unregister(self.fuse_fd)
            self.stats["stalls"] += 1
        self._fuse_registered = on

    def _have_landing(self) -> bool:
        if self.landing is None:
            self.landing = self.fs.try_acquire(True)
        return self.landing is not None

    # -- requests from the kernel ------------------------------------------------------------
    def _read_requests(self) -> None:
        for _ in range(READ_BATCH):
            if self.conn_gone or not self._have_landing():
                return
            slot = self.landing
            assert slot is not None
            try:
                n = os.readv(self.fuse_fd, [slot.view])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    log.info("%s: the kernel ended the connection (unmounted)", self.mountpoint)
                    self.conn_gone = True
                    return
                raise FrontendError(f"reading /dev/fuse: {exc.strerror}") from exc
            self._dispatch(slot, n)

    def _dispatch(self, landing: Slot, n: int) -> None:
        view = landing.view
        if n < IN_HEADER_SIZE:
            log.warning("short read of %d bytes from /dev/fuse", n)
            return
        length, opcode, unique, nodeid = IN_HEADER.unpack_from(view, 0)
        self.stats["requests"] += 1
        if length != n:
            log.warning("request %d: header length %d, read %d", unique, length, n)
            self._reply_error(unique, -errno.EIO)
            return
        if opcode == Opcode.INIT:
            self._handle_init(view, n, unique)
            return
        if not self.initialized:
            self._reply_error(unique, -errno.EIO)
            return
        if opcode == Opcode.DESTROY:
            self.destroyed = True
        elif opcode == Opcode.SETLKW:
            self._setlkw.add(unique)
        elif opcode == Opcode.INTERRUPT and not self._interrupt_wanted(view, n, unique):
            return
        slot = landing
        if self._fits_small(opcode, view, n):
            s = self.fs.try_acquire(False)
            if s is not None:
                s.view[:n] = view[:n]
                slot = s
        if self.debug:
            self._pending_debug[unique] = (opcode, nodeid, time.monotonic())
        used = self._submit(slot, n, opcode, unique)
        if used is landing:
            self.landing = None  # in flight; the next free large slot lands requests
        if used is not None:
            self.stats["large" if used is landing else "small"] += 1

    def _interrupt_wanted(self, view: memoryview, n: int, unique: int) -> bool:
        target = INTERRUPT_IN.unpack_from(view, IN_HEADER_SIZE)[0] if n >= 48 else 0
        if target in self._setlkw:
            return True
        self.stats["interrupts_ignored"] += 1
        if self.debug:
            reqlog.debug("unique %d INTERRUPT of %d ignored by the relay (not a pending SETLKW)",
                         unique, target)
        return False

    def _fits_small(self, opcode: int, view: memoryview, n: int) -> bool:
        size = VirtioFs.SLOT_SIZE_SMALL
        if n > size:
            return False
        cap = reply_capacity(opcode, view[IN_HEADER_SIZE:n], self.fs.max_io)
        if cap is None:
            return True
        reply_off = ((n + OUT_HEADER_SIZE + PAGE - 1) & ~(PAGE - 1)) - OUT_HEADER_SIZE
        return reply_off + OUT_HEADER_SIZE + cap <= size

    def _submit(self, slot: Slot, n: int, opcode: int, unique: int) -> Slot | None:
        """Forward one request; the slot it went in, or None if it could not be
        forwarded (the kernel then got an error reply)."""
        hiprio = opcode in abi.HIPRIO_OPCODES
        try:
            self.fs.submit(slot, n, None if hiprio else self._on_reply)
        except ValueError as exc:
            if slot is not self.landing:
                # a small slot that did not fit after all: the landing slot has the request
                self.fs.release(slot)
                if self.landing is not None:
                    return self._submit(self.landing, n, opcode, unique)
            log.warning("request %d (opcode %d) not forwarded: %s", unique, opcode, exc)
            if not hiprio:
                self._reply_error(unique, -errno.EIO)
            return None
        if hiprio:
            if self.debug:
                self._pending_debug.pop(unique, None)
                reqlog.debug("unique %d %s nodeid %d (no reply)", unique, _opname(opcode),
                             IN_HEADER.unpack_from(slot.view, 0)[3])
        else:
            self.inflight += 1
        return slot

    # -- replies and notifications to the kernel -----------------------------------------
    def _on_reply(self, comp: Completion) -> None:
        self.inflight -= 1
        if comp.opcode == Opcode.SETLKW:
            self._setlkw.discard(comp.unique)
        if self.debug:
            self._log_reply(comp)
        self._write(comp.reply, comp.unique)

    def _log_reply(self, comp: Completion) -> None:
        info = self._pending_debug.pop(comp.unique, None)
        opcode, nodeid, t0 = info if info else (comp.opcode, 0, time.monotonic())
        err = comp.error
        result = "ok" if err == 0 else f"{err} ({errno.errorcode.get(-err, '?')})"
        reqlog.debug("unique %d %s nodeid %d -> %s, %d bytes, %.2f ms", comp.unique,
                     _opname(opcode), nodeid, result, len(comp.reply) - OUT_HEADER_SIZE,
                     (time.monotonic() - t0) * 1e3)

    def _write(self, data: bytes | memoryview, unique: int) -> None:
        if self.conn_gone:
            return
        try:
            os.write(self.fuse_fd, data)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # request aborted or interrupted in the kernel
                log.debug("reply to %d: the kernel no longer waits for it", unique)
            elif exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                self.conn_gone = True
            else:
                log.warning("writing reply to %d to /dev/fuse: %s", unique, exc.strerror)

    def _reply_error(self, unique: int, error: int) -> None:
        if self.debug:
            reqlog.debug("unique %d answered by the relay: %d", unique, error)
        self._write(OUT_HEADER.pack(OUT_HEADER_SIZE, error, unique), unique)

    def _on_notify(self, code: int, message: memoryview) -> None:
        if code not in KERNEL_NOTIFY_CODES:
            log.debug("device notification code %d not forwarded", code)
            return
        data = bytearray(message)
        OUT_HEADER.pack_into(data, 0, len(data), code, 0)
        self.stats["notifications"] += 1
        if self.debug:
            reqlog.debug("notification code %d (%d bytes) forwarded", code, len(data))
        if self._notify_thread is None:
            self._notify_thread = threading.Thread(target=self._notify_writer,
                                                   name="vfsdrv-notify", daemon=True)
            self._notify_thread.start()
        self._notify_q.put(bytes(data))

    def _notify_writer(self) -> None:
        while True:
            data = self._notify_q.get()
            if data is None or self.fuse_fd < 0:
                return
            try:
                os.write(self.fuse_fd, data)
            except OSError as exc:
                log.info("the kernel refused notification code %d: %s",
                         OUT_HEADER.unpack_from(data)[1], exc.strerror)

    # -- FUSE_INIT -----------------------------------------------------------------------
    def _handle_init(self, view: memoryview, n: int, unique: int) -> None:
        if self.initialized:
            self._reply_error(unique, -errno.EPROTO)
            return
        body = bytes(view[IN_HEADER_SIZE:n])
        body += bytes(max(0, abi.sizeof("fuse_init_in") - len(body)))
        kin = abi.unpack("fuse_init_in", body)
        if kin.major != abi.KERNEL_VERSION:
            self._reply_error(unique, -errno.EPROTO)
            raise FrontendError(f"the kernel speaks FUSE {kin.major}.{kin.minor}, not 7.x")
        kflags = kin.flags
        if kflags & InitFlag.INIT_EXT:
            kflags |= kin.flags2 << 32
        offer = kflags & RELAY_FLAGS
        minor = min(kin.minor, abi.KERNEL_MINOR_VERSION)
        try:
            out = self.fs.init(offer, minor=minor, max_readahead=kin.max_readahead)
        except (VfsdrvError, OSError, TimeoutError) as exc:
            self._reply_error(unique, -errno.EIO)
            raise FrontendError(f"FUSE_INIT with the device failed: {exc}") from exc
        granted = self.fs.init_flags & offer
        reply_flags = granted | (kflags & InitFlag.INIT_EXT)
        fields = init_reply_fields(
            minor=self.fs.minor, device=out, kernel_max_readahead=kin.max_readahead,
            granted=granted, max_io=self.fs.max_io, device_max_write=self.fs.max_write,
        )
        fields["flags"] = reply_flags & 0xFFFFFFFF
        fields["flags2"] = reply_flags >> 32
        payload = abi.pack("fuse_init_out", **fields)
        reply = OUT_HEADER.pack(OUT_HEADER_SIZE + len(payload), 0, unique) + payload
        self._write(reply, unique)
        if self.conn_gone:
            raise FrontendError("the kernel closed the connection during FUSE_INIT")
        self.initialized = True
        log.info(
            "FUSE_INIT: kernel 7.%d offered %#x; device 7.%d granted %#x; session 7.%d, "
            "flags %#x, max_write %d, max_pages %d", kin.minor, kflags, out.minor,
            self.fs.init_flags, fields["minor"], reply_flags, fields["max_write"],
            fields["max_pages"],
        )
        if self.debug:
            reqlog.debug("unique %d INIT -> 7.%d flags %#x (kernel offered %#x, device %#x)",
                         unique, fields["minor"], reply_flags, kflags, self.fs.init_flags)
        if self.ready is not None:
            self.ready()


def init_reply_fields(
    *, minor: int, device, kernel_max_readahead: int, granted: int, max_io: int,
    device_max_write: int,
) -> dict[str, int]:
    """fuse_init_out for the kernel (flags aside) from the device's reply."""
    io_pages = max(1, max_io // PAGE)
    if granted & InitFlag.MAX_PAGES:
        max_pages = min(max(device.max_pages, 1), io_pages)
    else:
        max_pages = 0
    max_write = min(device_max_write, max_io)
    if max_pages:
        max_write = min(max_write, max_pages * PAGE)
    return {
        "major": abi.KERNEL_VERSION,
        "minor": minor,
        "max_readahead": min(device.max_readahead, kernel_max_readahead),
        "max_background": device.max_background,
        "congestion_threshold": device.congestion_threshold,
        "max_write": max(4096, max_write),
        "time_gran": device.time_gran,
        "max_pages": max_pages,
    }


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
