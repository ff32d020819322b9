"""The Python face of the native request pump (driver/native/pump.c).

One `Pump` per request queue: a thread that runs `vfsdrv_pump_run` without the
GIL, moving requests between its own /dev/fuse clones and its queue's ring. It
borrows slots (DMA buffers) from the VirtioFs device for its lifetime and gives
them back at `close()`. What the pump cannot decide alone reaches the control
plane (the relay's loop) as events; see `Relay._on_pump_event`.

Each pump reads through two clones of the connection (FUSE_DEV_IOC_CLONE): a
blocking one it sleeps in when nothing is in flight, and an O_NONBLOCK one it
reads in batches when busy. A reply must go back through the descriptor that
read its request (the kernel keeps a processing list per descriptor), so every
event names the descriptor. Given the device's hiprio sender (vfsdrv.fs.hiprio),
the pump sends FORGET and BATCH_FORGET itself.

`poll_us` (vfsdrv mount -o poll_us=N) opens a busy-poll window: with requests in
flight the pump spins on the used ring up to that long before it sleeps, and with
none it reads /dev/fuse without blocking that long before it sleeps in read(),
which saves a fast device's completions, and a program's next request, a sleep and
wake-up each but burns CPU while it spins (the stats' polls, idle_polls and
poll_misses count what the windows found).

`io_uring` (on unless vfsdrv mount -o io_uring=0) lets the pump write the replies
a round harvested in one io_uring_enter instead of a writev each (driver/native/
uring.c); where the kernel refuses io_uring (io_uring_disabled, a seccomp filter)
it writes them one by one, as with io_uring=0.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass

from .._native import ffi, lib
from ..fs.device import Slot, VirtioFs
from ..fs.hiprio import HiprioSender
from ..virtio.kick import NativeKick
from ..virtio.virtqueue import Virtqueue
from .fuse_dev import DEV_FUSE

log = logging.getLogger(__name__)

#: _IOR(229, 0, uint32_t) from <linux/fuse.h>
FUSE_DEV_IOC_CLONE = 0x8004E500
#: how long close() waits for the pump thread after asking it to stop
STOP_TIMEOUT = 5.0

EXIT_REASONS = {
    lib.VFSDRV_PUMP_STOPPED: "stopped",
    lib.VFSDRV_PUMP_CONN_GONE: "the kernel ended the connection",
    lib.VFSDRV_PUMP_BROKEN: "the device broke its ring",
    lib.VFSDRV_PUMP_FUSE_ERROR: "/dev/fuse failed",
    lib.VFSDRV_PUMP_KICK_FAILED: "the device could not be notified",
}


def clone_fuse_fd(session_fd: int, *, blocking: bool) -> int:
    """A new /dev/fuse descriptor attached to the connection of `session_fd`."""
    fd = os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC | (0 if blocking else os.O_NONBLOCK))
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, session_fd.to_bytes(4, "little"))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class PumpExit:
    index: int
    reason: int
    error: str

    @property
    def device_failed(self) -> bool:
        return self.reason in (lib.VFSDRV_PUMP_BROKEN, lib.VFSDRV_PUMP_KICK_FAILED)

    def __str__(self) -> str:
        text = EXIT_REASONS.get(self.reason, f"reason {self.reason}")
        return f"{text}: {self.error}" if self.error else text


class Pump:
    """One worker: a request queue, its slots, two /dev/fuse clones, one thread."""

    def __init__(
        self, fs: VirtioFs, vq: Virtqueue, session_fd: int, slots: list[Slot], *,
        event_fd: int, on_exit, poll: bool, trace: bool = False,
        hiprio: HiprioSender | None = None, poll_us: int = 0, io_uring: bool = True,
    ) -> None:
        self.fs = fs
        self.vq = vq
        self.slots = slots
        self.on_exit = on_exit
        self.exit: PumpExit | None = None
        self._final_stats: dict[str, int] | None = None  # kept when the native state goes
        #: after close(): the slots whose requests the device had not answered
        self.device_held: list[Slot] = []
        self._fds: list[int] = []
        self._kick: NativeKick | None = None
        self._hiprio = hiprio  # keeps the sender alive while the pump may use it
        self._cslots = ffi.new("struct vfsdrv_slot[]", len(slots))
        self._keep = []  # page tables must outlive the pump
        for i, slot in enumerate(slots):
            c = self._cslots[i]
            buf = slot.buf
            c.host = ffi.cast("uint8_t *", buf.address_of())
            c.addr = buf.addr
            c.size = len(slot.view)
            c.large = int(slot.large)
            if not buf.contiguous:  # the device address of each 4 KiB page
                pages = ffi.new("uint64_t[]", [buf.device_addr(k * 4096)
                                               for k in range((c.size + 4095) // 4096)])
                c.pages = pages
                self._keep.append(pages)
        try:
            self.fuse_fd = clone_fuse_fd(session_fd, blocking=True)
            self._fds.append(self.fuse_fd)
            self.fuse_nb_fd = clone_fuse_fd(session_fd, blocking=False)
            self._fds.append(self.fuse_nb_fd)
            cfg = ffi.new("struct vfsdrv_pump_config *")
            cfg.fuse_fd = self.fuse_fd
            cfg.fuse_nb_fd = self.fuse_nb_fd
            irq = None if poll else fs.transport.interrupt_fd(vq.index)
            cfg.irq_fd = -1 if irq is None else irq
            cfg.poll_ms = 0 if poll else 1
            cfg.event_fd = event_fd
            cfg.max_io = fs.max_io
            cfg.lock_wait = int(fs.notification)
            cfg.small_size = VirtioFs.SLOT_SIZE_SMALL
            cfg.trace = int(trace)
            cfg.poll_ns = poll_us * 1000  # bounded by the option's parser (PUMP_OPTIONS)
            cfg.io_uring = int(io_uring)
            self._kick = NativeKick(fs.transport, vq.index)
            self._kick.fill(cfg)
            err = ffi.new("char[]", 200)
            self._p = lib.vfsdrv_pump_new(cfg, vq.native, self._cslots, len(slots), err, 200)
            if self._p == ffi.NULL:
                raise OSError(f"native pump: {ffi.string(err).decode()}")
            if hiprio is not None:
                lib.vfsdrv_pump_set_hiprio(self._p, hiprio.native)
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._run, name=f"vfsdrv-pump-{vq.index}",
                                        daemon=True)

    # -- running ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        rc = lib.vfsdrv_pump_run(self._p)  # releases the GIL until the pump stops
        self.exit = PumpExit(self.vq.index, rc, ffi.string(lib.vfsdrv_pump_error(self._p))
                             .decode(errors="replace"))
        self.on_exit(self)

    def stop(self) -> None:
        """Ask the pump to stop and wait for it (a wake-up sent just before it
        enters read() can be lost, so the request is repeated)."""
        if not self._thread.is_alive():
            return
        deadline = STOP_TIMEOUT
        while self._thread.is_alive() and deadline > 0:
            lib.vfsdrv_pump_stop(self._p)
            self._thread.join(0.02)
            deadline -= 0.02
        if self._thread.is_alive():
            log.error("pump of queue %d did not stop", self.vq.index)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the control plane's side ------------------------------------------------------
    def events(self) -> list:
        if self._p == ffi.NULL:
            return []
        out = []
        buf = ffi.new("struct vfsdrv_event[]", 64)
        while True:
            n = lib.vfsdrv_pump_events(self._p, buf, 64)
            for k in range(n):
                e = buf[k]
                out.append((int(e.kind), int(e.slot), int(e.unique), int(e.opcode), int(e.fd),
                            int(e.len), ffi.string(e.why).decode(errors="replace"),
                            int(e.arg)))
            if n < 64:
                return out

    def request_bytes(self, slot: int) -> bytes:
        """The request a lent slot holds."""
        c = self._cslots[slot]
        return bytes(ffi.buffer(c.host + c.req_off, c.in_len))

    def give(self, slot: int, *, forward: bool = False) -> None:
        """Return a lent slot; `forward`: the pump sends its request to the device
        and throws the reply away (FUSE_NOTIFY_REPLY expects none)."""
        if self._p != ffi.NULL:
            lib.vfsdrv_pump_give(self._p, slot, int(forward))

    def has_setlkw(self, unique: int) -> bool:
        return self._p != ffi.NULL and bool(lib.vfsdrv_pump_has_setlkw(self._p, unique))

    def oldest(self) -> int | None:
        """The seq (the pump's request count when it was read) of the oldest request
        on the ring, SETLKW, FSYNC and FSYNCDIR aside; None when there is none. Compare with
        stats()["done_seq"], the highest seq answered."""
        if self._p == ffi.NULL:
            return None
        seq = int(lib.vfsdrv_pump_oldest(self._p))
        return None if seq == 2**64 - 1 else seq

    def holding(self) -> int:
        """Requests on the ring during which a device serving in order may answer
        nothing else (an FSYNC, an FSYNCDIR: vfsdrv_may_hold_queue)."""
        return 0 if self._p == ffi.NULL else int(lib.vfsdrv_pump_holding(self._p))

    def stats(self) -> dict[str, int]:
        if self._p == ffi.NULL:
            return dict(self._final_stats or {})
        s = ffi.new("struct vfsdrv_pump_stats *")
        lib.vfsdrv_pump_get_stats(self._p, s)
        out = {name: int(getattr(s, name)) for name, _ in ffi.typeof(s[0]).fields}
        out["io_uring"] = int(lib.vfsdrv_pump_io_uring(self._p))
        return out

    @property
    def io_uring(self) -> bool:
        """Whether this pump writes a round's replies in one io_uring_enter now (asked
        for, and the kernel has not refused it)."""
        if self._p == ffi.NULL:
            return bool((self._final_stats or {}).get("io_uring", 0))
        return bool(lib.vfsdrv_pump_io_uring(self._p))

    # -- teardown -----------------------------------------------------------------------
    def close_fuse(self) -> None:
        """Close this pump's /dev/fuse clones (after stop())."""
        for fd in (self.fuse_fd, self.fuse_nb_fd):
            if fd in self._fds:
                os.close(fd)
                self._fds.remove(fd)

    def _close_fds(self) -> None:
        if self._kick is not None:
            self._kick.close()
            self._kick = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def close(self) -> None:
        """Stop, release the native state, close the descriptors. The slots go back
        to the device by the caller (VirtioFs.return_slots), but for device_held."""
        self.stop()
        if self._thread.is_alive() or self._p == ffi.NULL:
            return  # never free what a running thread uses
        self._final_stats = self.stats()
        # the device still holds these (their chains are on the ring): its late
        # replies would land in whatever used the memory next
        self.device_held = [slot for i, slot in enumerate(self.slots)
                            if self._cslots[i].state == lib.VFSDRV_SLOT_RING]
        lib.vfsdrv_pump_free(self._p)
        self._p = ffi.NULL
        self._close_fds()
