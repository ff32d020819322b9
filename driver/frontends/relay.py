"""The relay frontend: the kernel's FUSE protocol on /dev/fuse, forwarded byte for
byte to a virtio-fs device.

Threads (docs/architecture.rst draws them):
  * one native pump per request queue (vfsdrv.frontends.pump, driver/native/pump.c),
    without the GIL: it reads requests from its own /dev/fuse clones straight into
    DMA slots, puts them on its queue, publishes once and kicks once per round,
    harvests and validates used entries and reply headers (the core's rules, the
    same the typed client uses) and writes each reply back through the descriptor
    that read its request. `--threads N` caps the number of pumps.
  * the control thread (this module's loop): FUSE_INIT, INTERRUPT, the
    notification queue and blocking-lock waits, device notifications for the
    kernel, errors, signals, statistics, teardown. The pumps hand it what they
    cannot decide alone as events (an eventfd).
  * the hiprio queue belongs to the device's native hiprio sender (vfsdrv.fs.hiprio)
    while the pumps run: they send FORGET and BATCH_FORGET through it themselves,
    and the control thread sends its own hiprio requests (an INTERRUPT, forgets a
    full sender turned back) through it too.
  * a writer thread for device notifications (a notification write may wait on the
    file system, which the pumps serve).

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
clamped to what a large slot (and thus a descriptor chain) carries;
max_background and congestion_threshold are sized to the pumps' slots.

FORGET and BATCH_FORGET go to the hiprio queue (no reply), from the pumps. A SETLKW the device
answers "wait" is parked and completed later from the notification queue; the
final reply goes to the descriptor that read the SETLKW. FUSE_INTERRUPT goes to
the device (hiprio) only when it names a SETLKW still pending: that is the one
request a device may hold indefinitely, and the only one worth interrupting. The
others the relay ignores, as FUSE allows (the kernel keeps waiting for the
original reply): Linux's own virtio-fs driver never sends INTERRUPT, and
virtiofsd 7.2 answers an INTERRUPT whose request it has already finished with an
EAGAIN reply on a buffer it no longer owns, and dies. FUSE_NOTIFY_REPLY (the
kernel's answer to a device's RETRIEVE) is forwarded and its reply dropped: the
kernel expects none. Other device notifications are forwarded to the kernel.

A device that fails (a broken ring, a reset request, a vanished backend) ends the
server the way a dead FUSE daemon does: the connection is aborted and the mount
stays, answering ENOTCONN until it is unmounted, so nothing a program writes
afterwards lands in the directory underneath.

A device can also stop answering and stay connected (the virtiofsd behind QEMU's
vhost-user-fs-pci dies: the PCI function lives on). With -o request_timeout=N
(120 s unless chosen; 0: off, as the kernel's own virtio-fs) the control thread
reads the pumps' figures once a second: a request queue with requests in flight
(SETLKW, FSYNC and FSYNCDIR aside) whose completions (replies, bad replies, "wait" answers to a
SETLKW) have not moved for N seconds fails the device as above. Parked lock
waits are off the ring and the hiprio and notification queues are not looked at,
so neither a long blocking lock nor a quiet hiprio sender can trip it; the
pumps' hot path is not touched.
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

from .._native import lib
from ..errors import DeviceGoneError, VfsdrvError
from ..fs import abi
from ..fs.abi import IN_HEADER_SIZE, OUT_HEADER_SIZE, InitFlag, Opcode, opcode_name
from ..fs.device import Completion, VirtioFs
from ..fs.notify import LOCK_NOTIFY
from .base import FrontendError
from .fuse_dev import (
    DEFAULT_REQUEST_TIMEOUT,
    DESTROY_TIMEOUT,
    FLUSH_LIMIT,
    INIT_TIMEOUT,
    STOP_GRACE,
    STOP_SIGNALS,
    MountOptions,
    abort_connection,
    check_mountpoint,
    is_our_mount,
    mount_entry,
    mount_fuse,
    mount_present,
    open_fuse_device,
    require_root,
    set_readahead,
    syncfs,
    umount_busy_lazy,
)
from .progress import RequestDeadline
from .pump import Pump

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
#: notifications from the device waiting for the kernel, at most (more are dropped)
NOTIFY_BACKLOG = 4096
#: small slots the control thread keeps for hiprio and its own requests
CONTROL_SLOTS = 8
#: -o request_timeout: how often the control thread looks at the pumps' progress
PROGRESS_EVERY = 1.0
#: how long a device has to answer the INTERRUPT of a parked SETLKW before the relay
#: answers EINTR itself: the kernel waits for that reply uninterruptibly (not even
#: SIGKILL ends the program), so an untrusted device must not be able to withhold it
INTERRUPT_GRACE = 5.0


def serve(
    fs: VirtioFs,
    mountpoint: str,
    *,
    options: list[str],
    debug: bool = False,
    ready: Callable[[], None] | None = None,
    source: str | None = None,
) -> None:
    """Mount `fs` on `mountpoint` through /dev/fuse and relay until unmounted."""
    Relay(fs, mountpoint, options=options, debug=debug, ready=ready, source=source).run()


class Relay:
    def __init__(
        self,
        fs: VirtioFs,
        mountpoint: str,
        *,
        options: list[str],
        debug: bool = False,
        ready: Callable[[], None] | None = None,
        source: str | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise FrontendError(f"--threads must be at least 1, not {threads}")
        self.fs = fs
        self.mountpoint = mountpoint
        self.options = MountOptions.parse(options)
        self.debug = debug
        self.ready = ready
        self.source = source
        self.threads = threads
        self.fuse_fd = -1
        self.mounted = False
        self.initialized = False
        self.conn_gone = False
        #: mountinfo's (id, device, type) of our mount, taken right after mount(2)
        self._mount_entry: tuple[str, str, str] | None = None
        self._detached = False  # our unmount worker detached it: never unmount again
        self._worker_done = False
        self.dead = False  # the device failed: abort, keep the mount (ENOTCONN)
        chosen = self.options.request_timeout  # seconds; 0: off
        self.request_timeout = DEFAULT_REQUEST_TIMEOUT if chosen is None else chosen
        self.unresponsive = False  # dead by request_timeout: nothing more is sent to it
        self._deadline = RequestDeadline(self.request_timeout)
        self._dropped_codes: set[int] = set()  # notification codes warned about
        #: SETLKWs whose INTERRUPT went to the device -> when to answer EINTR instead
        self._interrupted: dict[int, float] = {}
        self._in_init = False  # waiting for the device's FUSE_INIT (a signal ends it)
        #: pump events taken, not yet handled (_take_events)
        self._events: collections.deque[tuple[Pump, tuple]] = collections.deque()
        self._next_progress = 0.0
        self.destroyed = False
        self.stop_at: float | None = None
        self._signals = 0
        self._aborting = False
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.pumps: list[Pump] = []
        self._lent: list = []
        self._event_fd = -1
        self._exits: queue.SimpleQueue[Pump] = queue.SimpleQueue()
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._pending_debug: dict[int, tuple[int, int, float]] = {}
        self._notify_q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._notify_thread: threading.Thread | None = None
        self.stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        require_root()
        if not self.fs.started:
            raise FrontendError("the device must be started before serving it")
        if self.fs.broken is not None:  # closed or failed: say so before mounting
            raise FrontendError(f"the device cannot be served: {self.fs.broken}")
        self.options.check()
        mp = check_mountpoint(self.mountpoint)
        self.mountpoint = mp
        handler = self._debug_handler() if self.debug else None
        old_signals = self._install_signals()
        try:
            self.fuse_fd = open_fuse_device()
            tag = self.fs.config.tag if self.fs.config is not None else "vfsdrv"
            mount_fuse(self.fuse_fd, mp, self.source or tag, self.options)
            self.mounted = True
            self._mount_entry = mount_entry(mp)
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
        """Stop the pumps, abort the connection (if the kernel still has it), unmount
        (if still mounted and the device did not fail), end the device session.
        Aborting first means unmounting can never wait for a request that only the
        (now stopped) pumps would answer."""
        self.fs.on_notify = None
        if self.dead and self._mount_entry is not None and mount_present(self._mount_entry):
            # a dead server's mount answers ENOTCONN from now on, not after the last
            # of its descriptors is closed (and only while the mount is there: its
            # connection number is then surely still ours)
            abort_connection(self._mount_entry)
        self._stop_pumps()
        if self._notify_thread is not None:
            self._notify_q.put(None)
            self._notify_thread.join(2)
        for pump in self.pumps:
            pump.close_fuse()
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)  # the last descriptor: the kernel aborts the connection
            self.fuse_fd = -1
        self.conn_gone = True
        if self.mounted and not self.dead:
            try:
                if self._still_mounted():
                    umount_busy_lazy(self.mountpoint)
                elif (not self._detached and self._mount_entry is not None
                      and mount_present(self._mount_entry)):
                    log.warning("%s: another mount covers this one, which stays (answering "
                                "ENOTCONN) until both are unmounted", self.mountpoint)
            except OSError as exc:
                log.error("could not unmount %s: %s", self.mountpoint, exc)
        elif self.dead:
            log.error("%s stays mounted and answers ENOTCONN until it is unmounted "
                      "(vfsdrv umount %s)", self.mountpoint, self.mountpoint)
        if self._sel is not None:
            self._sel.close()
        self._release_pumps()
        self._end_device_session()
        summary = self._summary()
        log.info("%s", summary)
        if self.debug:
            reqlog.debug("%s", summary)

    def _summary(self) -> str:
        st = self.status()
        stalls = sum(p.stats().get("stalls", 0) for p in self.pumps)
        return (f"{st['served']} requests served by {len(self.pumps)} pump(s), "
                f"{st['errors']} bad replies, stopped reading /dev/fuse {stalls} times for "
                f"want of a slot, {self.stats['interrupts_ignored']} interrupts ignored, "
                f"{self.stats['notifications']} notifications forwarded, "
                f"{st['counters']['relay_forgets']} forgets")

    def _end_device_session(self) -> None:
        fs = self.fs
        if (not self.initialized or self.destroyed or fs.broken is not None
                or self.unresponsive or self.dead):
            return  # a dead FUSE server says nothing more to its device
        try:
            fs.call_async(Opcode.DESTROY, 0, unique=OWN_UNIQUE).result(DESTROY_TIMEOUT)
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
        for sig in STOP_SIGNALS:
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
        self._signals += 1
        log.info("signal %d: unmounting %s", signum, self.mountpoint)
        self.stop()
        if self._in_init:
            # the loop waits in the device's FUSE_INIT, up to --timeout: end that wait
            # now, as before the mount (the teardown unmounts, the caller says why)
            raise KeyboardInterrupt

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
        # stamped as the process's other lines are (vfsdrv mount --log stamps them)
        stamped = any(getattr(h.formatter, "_fmt", "").startswith("%(asctime)s")
                      for h in logging.getLogger().handlers)
        handler.setFormatter(logging.Formatter(
            f"{'%(asctime)s ' if stamped else ''}relay: %(message)s"))
        reqlog.addHandler(handler)
        reqlog.propagate = False
        return handler

    # -- the control loop --------------------------------------------------------------
    def _loop(self) -> None:
        fs = self.fs
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for fd in fs.control_fds():
            sel.register(fd, selectors.EVENT_READ, "device")
        sel.register(self.fuse_fd, selectors.EVENT_READ, "fuse")
        try:
            while not self.conn_gone and not self.dead:
                for key, _ev in sel.select(self._timeout()):
                    if key.data == "device":
                        fs.on_fd_ready(key.fd)
                    elif key.data == "fuse":
                        self._read_init()
                    elif key.data == "events":
                        self._on_events()
                    else:
                        self._on_wake()
                fs.process()  # also retries hiprio requests that found no room
                if self.request_timeout and self.pumps:
                    self._check_progress()
                if self._interrupted:
                    self._expire_interrupts()
                if self.stop_at is not None and time.monotonic() > self.stop_at:
                    if not self._aborting and not self._worker_done:
                        # FLUSH_LIMIT passed with the write-back still waiting on the
                        # device: a FUSE_DESTROY would only wait out its timeout too
                        self.unresponsive = True
                        log.warning("%s: the device has not taken the dirty pages in "
                                    "%.0f s: aborting the connection (what was not "
                                    "written back is lost)", self.mountpoint, FLUSH_LIMIT)
                    else:
                        log.warning("%s still busy: aborting the connection",
                                    self.mountpoint)
                    break
        except FrontendError as exc:
            self.error = exc  # raised by run(): its caller reports it (once)
        except DeviceGoneError as exc:
            self._device_failed(f"the device went away: {exc}")
        except VfsdrvError as exc:
            self._device_failed(f"the device failed: {exc}")

    def _timeout(self) -> float | None:
        timeout = self._io_timeout()
        deadlines = [min(self._interrupted.values())] if self._interrupted else []
        if self.request_timeout and self.pumps:
            deadlines.append(self._next_progress)
        if deadlines:
            left = max(0.0, min(deadlines) - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _expire_interrupts(self) -> None:
        """Parked SETLKWs whose INTERRUPT the device left unanswered for
        INTERRUPT_GRACE seconds get EINTR from the relay."""
        now = time.monotonic()
        for unique, deadline in list(self._interrupted.items()):
            if now < deadline:
                continue
            del self._interrupted[unique]
            if self.fs.abandon_lock(unique, -errno.EINTR):
                log.warning("the device did not answer the INTERRUPT of SETLKW %d within "
                            "%.0f s: answered EINTR", unique, INTERRUPT_GRACE)
            elif self._pending_setlkw(unique):
                self._interrupted[unique] = now + INTERRUPT_GRACE  # not parked yet

    def _io_timeout(self) -> float | None:
        if self.stop_at is not None:
            return 0.1
        if self.fs.poll:
            if self.fs.lock_waiters:
                return 0.0
            return min(0.005, self.fs.hiprio_retry) if self.fs.hiprio_backlog else 0.005
        if self.fs.hiprio_backlog:
            return self.fs.hiprio_retry
        return self.fs.max_wait  # a queue without an interrupt is looked at this often

    def _check_progress(self) -> None:
        """-o request_timeout: fail the device when a request queue has had requests
        in flight and nothing completed for request_timeout seconds, or when one
        request has been left behind that long while later ones were answered. Completions
        are replies, bad replies and SETLKW "wait" answers; in flight drops too
        when the device answers a request whose reply nobody takes (NOTIFY_REPLY)."""
        now = time.monotonic()
        if now < self._next_progress:
            return
        self._next_progress = now + PROGRESS_EVERY
        for pump in self.pumps:
            if not pump.alive:
                continue
            st = pump.stats()
            done, in_flight = st["replies"] + st["bad_replies"] + st["lock_waits"], st["in_flight"]
            oldest = pump.oldest()
            if oldest is None:
                # only requests a sound device may hold long on the ring (a SETLKW
                # until the lock is free, an FSYNC the disk is slow to write back)
                in_flight = 0
            why = self._deadline.judge(pump.vq.index, done=done, in_flight=in_flight,
                                       holding=pump.holding() > 0, oldest=oldest,
                                       done_seq=st["done_seq"], now=now,
                                       where=f"request queue {pump.vq.index}")
            if why:
                self.stats["unresponsive"] += 1
                self.unresponsive = True
                self._device_failed(f"the device is unresponsive: {why} "
                                    f"(-o request_timeout={self.request_timeout:g})")
                return

    def _device_failed(self, why: str) -> None:
        """Behave as a dead FUSE server: abort the connection, keep the mount."""
        log.error("%s", why)
        self.error = FrontendError(why)
        self.dead = True

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass
        if self.stop_at is None:
            # the unmount worker brings this forward once the mount is detached
            self.stop_at = time.monotonic() + FLUSH_LIMIT + STOP_GRACE
            threading.Thread(target=self._unmount_worker, name="vfsdrv-umount",
                             daemon=True).start()
        elif self._signals > 1 and not self._aborting:
            log.warning("%s: asked again to stop: aborting the connection", self.mountpoint)
            self._aborting = True
            self.stop_at = time.monotonic()

    def _still_mounted(self) -> bool:
        """Whether the mount on our mount point is still ours: the same entry as at
        mount time (id, device, type), and not detached by us since. Once ours is gone
        (unmounted, lazily detached) the path may hold somebody else's mount, which a
        server ending must never take away."""
        return not self._detached and is_our_mount(self.mountpoint, self._mount_entry)

    def _unmount_worker(self) -> None:
        # not in the loop's thread: the kernel may need the loop while unmounting
        try:
            if self._still_mounted():
                umount_busy_lazy(self.mountpoint, before_detach=self._flush_before_detach)
            self._detached = True
        except OSError as exc:
            if self._still_mounted():
                log.error("unmounting %s: %s", self.mountpoint, exc)
            else:  # the abort (a second signal, the flush's limit) took it away first
                log.info("%s is already unmounted", self.mountpoint)
        finally:
            self._worker_done = True
            deadline = time.monotonic() + STOP_GRACE
            if self.stop_at is not None and deadline < self.stop_at:
                self.stop_at = deadline

    def _flush_before_detach(self) -> None:
        """The mount is busy: write back what programs wrote into its page cache
        (writeback caching) while the device still serves, or the abort after
        STOP_GRACE would drop it. Bounded by FLUSH_LIMIT (the loop aborts then)."""
        if self.dead:
            return
        log.warning("%s is busy: writing back its dirty pages, then detaching it; "
                    "%.0f s after that programs using it get errors (ECONNABORTED for "
                    "requests in flight, then ENOTCONN; signal again to abort at once); "
                    "paths opened after the detach name the directory underneath",
                    self.mountpoint, STOP_GRACE)
        try:
            syncfs(self.mountpoint)
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.ENOTCONN):  # the abort came first
                log.info("writing back %s ended with the connection: %s", self.mountpoint,
                         exc)
            else:
                log.warning("writing back %s: %s", self.mountpoint, exc)

    # -- before the pumps: FUSE_INIT on the session descriptor ------------------------
    def _read_init(self) -> None:
        buf = bytearray(self.fs.max_io + 2 * PAGE)
        try:
            n = os.readv(self.fuse_fd, [buf])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                log.info("%s: the kernel ended the connection (unmounted)", self.mountpoint)
                self.conn_gone = True
                return
            raise FrontendError(f"reading /dev/fuse: {exc.strerror}") from exc
        view = memoryview(buf)
        if n < IN_HEADER_SIZE:
            log.warning("short read of %d bytes from /dev/fuse", n)
            return
        length, opcode, unique, _nodeid = IN_HEADER.unpack_from(view, 0)
        self.stats["requests"] += 1
        if opcode != Opcode.INIT or length != n:
            self._reply_error(self.fuse_fd, unique, -errno.EIO)
            return
        self._handle_init(view, n, unique)
        if self.initialized:
            assert self._sel is not None
            self._sel.unregister(self.fuse_fd)  # from now on the pumps read requests
            self._start_pumps()
            if self.ready is not None:
                self.ready()

    # -- the pumps -------------------------------------------------------------------------
    def _pump_capacity(self) -> int:
        """Slots the pumps will have: requests that can be on the rings at once."""
        small, large = self.fs.free_slots
        return max(0, small - CONTROL_SLOTS) + large

    def _start_pumps(self) -> None:
        fs = self.fs
        queues = fs.hand_over_request_queues()
        small, large = fs.free_slots
        wanted = min(len(queues), self.threads or len(queues))
        count = min(wanted, large)
        if count == 0:
            raise FrontendError("no request queue or no large slot for the pumps")
        if wanted < len(queues):
            log.info("--threads %d: %d of the device's %d request queue(s) in use, one pump "
                     "each", self.threads, wanted, len(queues))
        if count < wanted:
            # the user's choice of slots idles queues the device offers: say so
            log.warning("%d large slot(s) for %d request queue(s): %d pump(s) run, one "
                        "large slot each at least (--large-slots)", large, wanted, count)
        self._event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        assert self._sel is not None
        self._sel.register(self._event_fd, selectors.EVENT_READ, "events")
        per_small = max(0, small - CONTROL_SLOTS) // count
        per_large = large // count
        fs.pending_setlkw = self._pending_setlkw
        # the pumps send FORGETs themselves; the control thread's hiprio traffic goes
        # through the same sender (None: hiprio stays with the control plane)
        hiprio = fs.hand_over_hiprio()
        settings = self.options.pump_settings()
        for vq in queues[:count]:
            slots = fs.lend_slots(per_small, per_large)
            self._lent.append(slots)
            pump = Pump(fs, vq, self.fuse_fd, slots, event_fd=self._event_fd,
                        on_exit=self._on_pump_exit, poll=fs.poll, trace=self.debug,
                        hiprio=hiprio, poll_us=settings["poll_us"],
                        io_uring=bool(settings["io_uring"]))
            self.pumps.append(pump)
        for pump in self.pumps:
            pump.start()
        log.info("%d pump(s) on request queue(s) %s, %d small and %d large slots each, "
                 "poll window %d us, replies batched through io_uring: %s", count,
                 ", ".join(str(p.vq.index) for p in self.pumps), per_small, per_large,
                 settings["poll_us"], "yes" if all(p.io_uring for p in self.pumps) else
                 "no" if not settings["io_uring"] else "no (the kernel refused io_uring)")

    def _take_events(self) -> None:
        """Handle what the pumps queued, in order. The events wait in one deque that
        a nested call (an INTERRUPT's _pending_setlkw) goes on emptying: the SETLKW's
        "wait" reply may be queued right behind its INTERRUPT, and must be parked
        before the INTERRUPT is judged (a list taken by the outer call would hide it,
        and the kernel sends its one INTERRUPT only once)."""
        events = self._events
        for pump in self.pumps:
            events.extend((pump, event) for event in pump.events())
        while events:
            pump, event = events.popleft()
            self._on_pump_event(pump, *event)

    def _on_pump_exit(self, pump: Pump) -> None:
        # in the pump's thread: hand over to the control loop
        self._exits.put(pump)
        try:
            os.eventfd_write(self._event_fd, 1)
        except OSError:
            pass

    def _stop_pumps(self) -> None:
        for pump in self.pumps:
            pump.stop()

    def _release_pumps(self) -> None:
        for pump in self.pumps:
            pump.close()
        if any(p.alive for p in self.pumps):
            log.error("a request pump did not stop: the device's memory stays mapped "
                      "until this process ends")
            self.fs.transport.keep_memory_mapped = True
        elif self.pumps:
            self.fs.take_back_request_queues()
            # a slot the device still holds is not reused (by DESTROY, say) until
            # the device is reset: a late reply would write into it
            held = {id(slot) for p in self.pumps for slot in p.device_held}
            if held:
                log.info("%d request(s) the device had not answered: their buffers are "
                         "not reused", len(held))
            for slots in self._lent:
                self.fs.return_slots([slot for slot in slots if id(slot) not in held])
            self._lent.clear()
        if self._event_fd >= 0:
            os.close(self._event_fd)
            self._event_fd = -1

    def _pending_setlkw(self, unique: int) -> bool:
        """Whether a SETLKW's "wait" reply is still to come, for a FUSE_NOTIFY_LOCK
        that found no waiter. Either its slot is still the pump's (on a ring, or read
        and waiting for room there), or the pump has already queued the LOCK_WAIT
        event (it queues it before freeing the slot): so look at the slots first,
        then take in the events (which may park it)."""
        if any(p.has_setlkw(unique) for p in self.pumps):
            return True
        self._take_events()
        return self.fs.is_lock_waiter(unique)

    def _on_events(self) -> None:
        try:
            os.eventfd_read(self._event_fd)
        except BlockingIOError:
            pass
        self._take_events()
        while not self._exits.empty():
            pump = self._exits.get()
            ex = pump.exit
            assert ex is not None
            if ex.reason == lib.VFSDRV_PUMP_CONN_GONE:
                log.info("%s: the kernel ended the connection (unmounted)", self.mountpoint)
                self.conn_gone = True
            elif ex.reason != lib.VFSDRV_PUMP_STOPPED:
                self.fs.stats["pump_failures"] += 1
                self._device_failed(f"request queue {ex.index}: {ex}")

    def _on_pump_event(self, pump: Pump, kind: int, slot: int, unique: int, opcode: int,
                       fd: int, length: int, why: str, arg: int) -> None:
        if kind == lib.VFSDRV_EV_REQUEST:
            self._control_request(pump, slot, unique, opcode, fd)
        elif kind == lib.VFSDRV_EV_LOCK_WAIT:
            self.fs.park_lock(unique, opcode, lambda comp, fd=fd: self._lock_done(fd, comp))
        elif kind == lib.VFSDRV_EV_BAD_REPLY:
            self.fs.stats["bad_reply"] += 1
            log.warning("device sent a bad reply to %s (unique %d): %s; answered EIO",
                        opcode_name(opcode), unique, why)
            if opcode == Opcode.SETLKW and self.fs.notification:
                # the kernel was told it failed; a device that parked the lock must
                # not grant it later to nobody (the lock would stay held)
                self._to_hiprio(interrupt_request(unique))
        elif kind == lib.VFSDRV_EV_BAD_REQUEST:
            log.warning("request %d (%s) not forwarded: %s", unique, opcode_name(opcode), why)
        elif kind == lib.VFSDRV_EV_TRACE_REQUEST:
            if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
                # no reply will come (the pump may have sent it to hiprio already)
                reqlog.debug("unique %d %s nodeid %d (hiprio, no reply)", unique,
                             opcode_name(opcode), arg)
            else:
                self._pending_debug[unique] = (opcode, arg, time.monotonic())
        elif kind == lib.VFSDRV_EV_TRACE_REPLY:
            self._log_reply(unique, opcode, -int(arg), length)
        elif kind == lib.VFSDRV_EV_NO_IO_URING:
            log.warning("request queue %d: %s", pump.vq.index, why)

    def _control_request(self, pump: Pump, slot: int, unique: int, opcode: int,
                         fd: int) -> None:
        """A request the pump lent to the control plane (with its slot)."""
        data = pump.request_bytes(slot)
        if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
            self.stats["forgets"] += 1
            self._to_hiprio(data)
        elif opcode == Opcode.INTERRUPT:
            target = INTERRUPT_IN.unpack_from(data, IN_HEADER_SIZE)[0] if len(data) >= 48 else 0
            if self.fs.is_lock_waiter(target) or self._pending_setlkw(target):
                self._to_hiprio(data)
                self._interrupted.setdefault(target, time.monotonic() + INTERRUPT_GRACE)
            else:
                self.stats["interrupts_ignored"] += 1
                if self.debug:
                    reqlog.debug("unique %d INTERRUPT of %d ignored by the relay (not a "
                                 "pending SETLKW)", unique, target)
        elif opcode == Opcode.NOTIFY_REPLY:
            pump.give(slot, forward=True)  # to the device; the kernel expects no reply
            if self.debug:
                self._pending_debug.pop(unique, None)
                reqlog.debug("unique %d NOTIFY_REPLY nodeid %d (forwarded; no reply)", unique,
                             IN_HEADER.unpack_from(data, 0)[3])
            return
        elif opcode == Opcode.DESTROY:
            self.destroyed = True
            pump.give(slot, forward=True)
            self._write(fd, OUT_HEADER.pack(OUT_HEADER_SIZE, 0, unique), unique)
            return
        else:  # a second INIT, or anything else the pump does not forward
            self._reply_error(fd, unique, -errno.EPROTO if opcode == Opcode.INIT else -errno.EIO)
        pump.give(slot)
        if self.debug and opcode != Opcode.INTERRUPT:
            reqlog.debug("unique %d %s (control plane)", unique, opcode_name(opcode))

    def _to_hiprio(self, data: bytes) -> None:
        _len, opcode, unique, nodeid = IN_HEADER.unpack_from(data, 0)
        if self.debug and opcode not in (Opcode.FORGET, Opcode.BATCH_FORGET):
            self._pending_debug.pop(unique, None)  # forgets were logged when traced
            reqlog.debug("unique %d %s nodeid %d (no reply)", unique, opcode_name(opcode), nodeid)
        self.fs.send_hiprio(data)  # a full ring keeps it in the device's backlog

    # -- replies and notifications to the kernel -----------------------------------------
    def _lock_done(self, fd: int, comp: Completion) -> None:
        """The final reply to a parked SETLKW, through the descriptor that read it."""
        if self.debug:
            self._log_reply(comp.unique, comp.opcode, comp.error, 0)
        self._write(fd, comp.reply, comp.unique)

    def _log_reply(self, unique: int, opcode: int, err: int, length: int) -> None:
        info = self._pending_debug.pop(unique, None)
        _op, nodeid, t0 = info if info else (opcode, 0, time.monotonic())
        result = "ok" if err == 0 else f"{err} ({errno.errorcode.get(-err, '?')})"
        reqlog.debug("unique %d %s nodeid %d -> %s, %d bytes, %.2f ms", unique,
                     opcode_name(opcode), nodeid, result, length, (time.monotonic() - t0) * 1e3)

    def _write(self, fd: int, data: bytes | memoryview, unique: int) -> None:
        if self.conn_gone:
            return
        try:
            os.write(fd, data)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # request aborted or interrupted in the kernel
                log.debug("reply to %d: the kernel no longer waits for it", unique)
            elif exc.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
                self.conn_gone = True
            else:
                log.warning("writing reply to %d to /dev/fuse: %s", unique, exc.strerror)

    def _reply_error(self, fd: int, unique: int, error: int) -> None:
        if self.debug:
            reqlog.debug("unique %d answered by the relay: %d", unique, error)
        self._write(fd, OUT_HEADER.pack(OUT_HEADER_SIZE, error, unique), unique)

    def _on_notify(self, code: int, message: memoryview) -> None:
        if code not in KERNEL_NOTIFY_CODES:
            self.stats["notify_dropped"] += 1
            if len(self._dropped_codes) < 16 and code not in self._dropped_codes:
                self._dropped_codes.add(code)
                hint = ""
                if (code == abi.NotifyCode.RESEND_OR_LOCK
                        and len(message) == OUT_HEADER_SIZE + LOCK_NOTIFY.size):
                    hint = (f"; it has the shape of FUSE_NOTIFY_LOCK, which this mount "
                            f"expects as code {self.fs.notify_lock_code} (--notify-lock-code):"
                            " blocked lock waiters are not woken")
                log.warning("device notification code %d (%d bytes) not forwarded: the "
                            "kernel has no such notification%s (logged once)", code,
                            len(message), hint)
            return
        data = bytearray(message)
        OUT_HEADER.pack_into(data, 0, len(data), code, 0)
        if self.debug:
            reqlog.debug("notification code %d (%d bytes) forwarded", code, len(data))
        if self._notify_thread is None:
            self._notify_thread = threading.Thread(target=self._notify_writer,
                                                   name="vfsdrv-notify", daemon=True)
            self._notify_thread.start()
        if self._notify_q.qsize() >= NOTIFY_BACKLOG:
            # a device faster than the kernel takes them (a flood), or a write the
            # kernel holds (an invalidation waiting for a page a held READ locks):
            # memory stays bounded; what is dropped is counted and said
            self.stats["notify_backlog_dropped"] += 1
            dropped = self.stats["notify_backlog_dropped"]
            if dropped == 1 or dropped % 10_000 == 0:
                log.warning("%d device notification(s) dropped: %d wait for the kernel "
                            "already (a flood, or the kernel is holding one back; "
                            "-o request_timeout=N ends a device that holds requests)",
                            dropped, NOTIFY_BACKLOG)
            return
        self.stats["notifications"] += 1
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

    # -- figures ---------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """Live figures for `vfsdrv status` and the exit log (JSON-able)."""
        from ..virtio.constants import feature_names

        fs = self.fs
        queues: list[dict[str, object]] = []
        if fs.hiprio_sender is not None:
            hs = fs.hiprio_sender.stats()  # reclaims first: in_flight is what the device holds
            queues.append({"name": "hiprio", "index": fs.hiprio_sender.vq.index,
                           "size": fs.hiprio_sender.vq.size, "in_flight": hs["in_flight"],
                           "sent": hs["sent"], "flushes": hs["flushes"], "kicks": hs["kicks"],
                           "full": hs["full"], "backlog": fs.hiprio_backlog})
        elif fs.hiprio is not None:
            queues.append({"name": "hiprio", "index": fs.hiprio.vq.index,
                           "size": fs.hiprio.vq.size, "in_flight": fs.hiprio.vq.in_flight})
        if fs.notify_vq is not None:
            queues.append({"name": "notification", "index": fs.notify_vq.index,
                           "size": fs.notify_vq.size,
                           "buffers_posted": fs.notify_vq.in_flight})
        served = in_flight = bad = native_forgets = 0
        for pump in self.pumps:
            st = pump.stats()
            native_forgets += st["hiprio"]
            served += st["replies"]
            in_flight += st["in_flight"]
            bad += st["bad_replies"]
            queues.append({"name": f"request{pump.vq.index}", "index": pump.vq.index,
                           "size": pump.vq.size, "served": st["replies"],
                           "in_flight": st["in_flight"], "requests": st["requests"],
                           "bad_replies": st["bad_replies"], "kicks": st["kicks"],
                           "syscalls": st["syscalls"], "lock_waits": st["lock_waits"],
                           "to_control": st["to_control"], "queue_full": st["queue_full"],
                           "polls": st["polls"], "idle_polls": st["idle_polls"],
                           "poll_misses": st["poll_misses"], "io_uring": bool(st["io_uring"]),
                           "reply_batches": st["reply_batches"],
                           "batched_replies": st["batched_replies"]})
        features = feature_names(fs.dev.features, {0: "VIRTIO_FS_F_NOTIFICATION"})
        dev_stats = dict(fs.stats)
        return {
            "device": fs.config.tag if fs.config is not None else None,
            "transport": getattr(fs.transport, "name", type(fs.transport).__name__),
            "features": [f for f in features.split(", ") if f != "none"],
            "pumps": len(self.pumps),
            "queues": queues,
            "served": served,
            "in_flight": in_flight,
            "errors": bad + sum(v for k, v in dev_stats.items()
                                if k.startswith("bad_") and k != "bad_reply"),
            "notifications": self.stats["notifications"],
            "lock_waiters": fs.lock_waiters,
            "uptime": round(time.monotonic() - self.started_at, 3),
            **({"request_timeout": self.request_timeout} if self.request_timeout else {}),
            # asked to stop (a signal): serving on for at most this many seconds
            **({"stopping_in": round(max(0.0, self.stop_at - time.monotonic()), 1)}
               if self.stop_at is not None else {}),
            "counters": {**dev_stats, **{f"relay_{k}": v for k, v in self.stats.items()},
                         # forgets: those the pumps sent and those that came through here
                         "relay_forgets": self.stats["forgets"] + native_forgets},
        }

    # -- FUSE_INIT -----------------------------------------------------------------------
    def _size_readahead(self, device, fields: dict[str, int]) -> None:
        """Raise (or lower) the mount's readahead once the kernel has taken the INIT
        reply, which can only lower its own offer (see readahead_size)."""
        want = readahead_size(device_max_readahead=device.max_readahead,
                              max_pages=fields["max_pages"], max_io=self.fs.max_io,
                              chosen=self.options.session)
        try:
            before = set_readahead(self.mountpoint, want)
        except OSError as exc:  # the mount works as the kernel set it up
            log.warning("readahead left at the kernel's %d bytes: %s",
                        fields["max_readahead"], exc)
            return
        if before != want // 1024 * 1024:
            log.info("readahead %d KiB (was %d KiB)", want // 1024, before // 1024)

    def _handle_init(self, view: memoryview, n: int, unique: int) -> None:
        if self.initialized:
            self._reply_error(self.fuse_fd, unique, -errno.EPROTO)
            return
        body = bytes(view[IN_HEADER_SIZE:n])
        body += bytes(max(0, abi.sizeof("fuse_init_in") - len(body)))
        kin = abi.unpack("fuse_init_in", body)
        if kin.major != abi.KERNEL_VERSION:
            self._reply_error(self.fuse_fd, unique, -errno.EPROTO)
            raise FrontendError(f"the kernel speaks FUSE {kin.major}.{kin.minor}, not 7.x")
        kflags = kin.flags
        if kflags & InitFlag.INIT_EXT:
            kflags |= kin.flags2 << 32
        offer = kflags & RELAY_FLAGS
        minor = min(kin.minor, abi.KERNEL_MINOR_VERSION)
        try:
            # the device has as long as any setup message (vfsdrv mount --timeout)
            # the device is offered the readahead the relay means to set (see
            # _size_readahead), not only the kernel's default: its reply is its limit
            ra_offer = max(kin.max_readahead,
                           self.options.session.get("max_readahead", self.fs.max_io))
            self._in_init = True
            if self._signals:  # one came between mount(2) and here: the same ending
                raise KeyboardInterrupt
            try:
                out = self.fs.init(offer, minor=minor, max_readahead=ra_offer,
                                   timeout=self.fs.transport.timeout or INIT_TIMEOUT)
            finally:
                self._in_init = False
        except (VfsdrvError, OSError, TimeoutError) as exc:
            self._reply_error(self.fuse_fd, unique, -errno.EIO)
            raise FrontendError(f"FUSE_INIT with the device failed: {exc}") from exc
        granted = self.fs.init_flags & offer
        reply_flags = granted | (kflags & InitFlag.INIT_EXT)
        fields = init_reply_fields(
            minor=self.fs.minor, device=out, kernel_max_readahead=kin.max_readahead,
            granted=granted, max_io=self.fs.max_io, device_max_write=self.fs.max_write,
            slots=self._pump_capacity(), chosen=self.options.session,
        )
        fields["flags"] = reply_flags & 0xFFFFFFFF
        fields["flags2"] = reply_flags >> 32
        payload = abi.pack("fuse_init_out", **fields)
        reply = OUT_HEADER.pack(OUT_HEADER_SIZE + len(payload), 0, unique) + payload
        self._write(self.fuse_fd, reply, unique)
        if self.conn_gone:
            raise FrontendError("the kernel closed the connection during FUSE_INIT")
        self.initialized = True
        self._size_readahead(out, fields)
        log.info(
            "FUSE_INIT: kernel 7.%d offered %#x; device 7.%d granted %#x; session 7.%d, "
            "flags %#x, max_write %d, max_pages %d", kin.minor, kflags, out.minor,
            self.fs.init_flags, fields["minor"], reply_flags, fields["max_write"],
            fields["max_pages"],
        )
        local = [name for flag, name in ((InitFlag.POSIX_LOCKS, "fcntl"),
                                         (InitFlag.FLOCK_LOCKS, "flock"))
                 if kflags & flag and not granted & flag]
        if local:
            log.info("the device does not take %s locks: the kernel keeps them, local to "
                     "this mount (other mounts of the device do not see them)",
                     " and ".join(local))
        taken = (InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS) & kflags & granted
        if taken and not self.fs.notification:
            # nothing can tell a waiter its lock is free later: the device must hold
            # the request (virtiofsd answers a lock that must wait EOPNOTSUPP)
            log.info("the device takes locks but has no notification queue: a lock "
                     "that must wait works only if the device holds its request until "
                     "then")
        if self.debug:
            reqlog.debug("unique %d INIT -> 7.%d flags %#x (kernel offered %#x, device %#x)",
                         unique, fields["minor"], reply_flags, kflags, self.fs.init_flags)


def readahead_size(*, device_max_readahead: int, max_pages: int, max_io: int,
                   chosen: dict[str, int] | None = None) -> int:
    """The mount's readahead in bytes: -o max_readahead when given, else the largest
    READ the session allows (max_pages, or max_io without MAX_PAGES), so that a
    sequential read goes to the device as whole requests instead of the kernel's
    default 128 KiB ones; never more than the device's own max_readahead."""
    chosen = chosen or {}
    want = chosen.get("max_readahead", (max_pages * PAGE) if max_pages else max_io)
    return min(want, device_max_readahead or want)


def init_reply_fields(
    *, minor: int, device, kernel_max_readahead: int, granted: int, max_io: int,
    device_max_write: int, slots: int = 0, chosen: dict[str, int] | None = None,
) -> dict[str, int]:
    """fuse_init_out for the kernel (flags aside) from the device's reply.

    max_background (asynchronous requests: readahead, async direct I/O, writeback)
    is the pumps' slot count: more cannot be on the rings at once, fewer leaves
    slots idle. congestion_threshold is three quarters of it (the kernel's own
    ratio for its defaults). max_readahead is the kernel's offer when the device
    allows it. Each can be chosen with -o (`chosen`), within the FUSE limits."""
    io_pages = max(1, max_io // PAGE)
    if granted & InitFlag.MAX_PAGES:
        max_pages = min(max(device.max_pages, 1), io_pages)
    else:
        max_pages = 0
    max_write = min(device_max_write, max_io)
    if max_pages:
        max_write = min(max_write, max_pages * PAGE)
    chosen = chosen or {}
    background = min(chosen.get("max_background", slots or device.max_background), 0xFFFF)
    congestion = min(chosen.get("congestion_threshold", background * 3 // 4), 0xFFFF)
    return {
        "major": abi.KERNEL_VERSION,
        "minor": minor,
        "max_readahead": min(chosen.get("max_readahead", kernel_max_readahead),
                             device.max_readahead or kernel_max_readahead,
                             kernel_max_readahead),
        "max_background": background,
        "congestion_threshold": congestion,
        "max_write": max(4096, max_write),
        "time_gran": device.time_gran,
        "max_pages": max_pages,
    }


#: FUSE_INT_REQ_BIT: an INTERRUPT's own unique is its target's with bit 0 set
INT_REQ_BIT = 1


def interrupt_request(target: int) -> bytes:
    """A FUSE_INTERRUPT of request `target`, as the kernel would send it."""
    body = INTERRUPT_IN.pack(target)
    head = IN_HEADER.pack(IN_HEADER_SIZE + len(body), Opcode.INTERRUPT, target | INT_REQ_BIT, 0)
    return head + bytes(IN_HEADER_SIZE - IN_HEADER.size) + body
