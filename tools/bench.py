"""`vfsdrv bench`: what the driver costs on top of the device, measured side by side.

Over vhost-user to a local virtiofsd, in one run:
  * GETATTR round trip (median, p99),
  * 1 MiB READ throughput (page-cached file),
  * GETATTR ops/s with 1, 4 and 16 requests in flight,
each through vfsdrv (VirtioFs + FuseClient: slots, validation, in-flight table) and
through a minimal raw client: pre-built descriptor chains written straight into the
ring, one eventfd kick, one eventfd wait — the device's cost with no driver logic,
the floor. Ratios are vfsdrv / floor (time) or floor / vfsdrv (rate): 1.0 is free.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .._native import lib
from ..fs import abi
from ..fs.abi import IN_HEADER_SIZE, OUT_HEADER_SIZE, Opcode
from ..fs.client import ROOT_ID, FuseClient
from ..fs.config import encode_config
from ..fs.device import VirtioFs
from ..virtio import ring_layout as rl
from ..virtio.device import VirtioDevice
from ..virtio.vhost_user import VhostUserTransport
from .backend import Virtiofsd

MiB = 1 << 20
FILE_SIZE = 64 * MiB


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="driver cost vs a raw client, over vhost-user to virtiofsd",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    p.add_argument("--poll", action="store_true", help="vfsdrv completes by polling, not eventfd")
    p.set_defaults(func=run)


# -- the floor: a raw client ---------------------------------------------------------------
class RawClient:
    """Fixed chains, no validation, no bookkeeping: slot k = descriptors 2k (request,
    readable) and 2k+1 (reply, writable), chained once at set-up."""

    def __init__(self, socket_path: Path, slots: int, reply_size: int) -> None:
        self.t = VhostUserTransport(str(socket_path), config=encode_config("bench", 1),
                                    num_queues=2)
        self.dev = VirtioDevice(self.t)
        self.dev.negotiate(ring_features=0)  # no EVENT_IDX: an interrupt per used buffer
        self.dev.setup_queue(0, 2 * slots)
        self.vq = self.dev.setup_queue(1, 2 * slots)
        self.dev.driver_ok()
        pool = self.t.dma_pool()
        self.size = self.vq.size
        self.desc = self.vq.desc.view
        self.avail = self.vq.avail.view
        self.used = self.vq.used.view
        # the index stores and loads must be single 16-bit accesses with barriers: a
        # struct.pack_into may tear them, and the device then sees a garbage index
        self._avail_idx_ptr = self.vq.avail.address_of() + 2
        self._used_idx_ptr = self.vq.used.address_of() + 2
        self.kick_fd = self.t._queues[1][0]
        self.call_fd = self.t._queues[1][1]
        self.bufs = []
        for k in range(slots):
            req = pool.alloc(4096, 4096)
            rep = pool.alloc(reply_size + 4096, 4096)
            rep_addr = rep.addr + 4096 - 16  # payload page-aligned, as vfsdrv does
            rl.DESC.pack_into(self.desc, 32 * k, req.addr, 0, rl.VRING_DESC_F_NEXT, 2 * k + 1)
            rl.DESC.pack_into(self.desc, 32 * k + 16, rep_addr, reply_size + 16,
                              rl.VRING_DESC_F_WRITE, 0)
            self.bufs.append((req, rep))
        self.avail_idx = 0
        self.last_used = 0
        self.unique = 2
        self.stalls = 0  # waits of a second with no completion (a lost kick or call)

    def set_request(self, k: int, opcode: int, nodeid: int, body: bytes, reply: int) -> None:
        req = self.bufs[k][0]
        n = IN_HEADER_SIZE + len(body)
        struct.pack_into("<IIQQIIIHH", req.view, 0, n, opcode, 0, nodeid, 0, 0, 0, 0, 0)
        req.view[IN_HEADER_SIZE:n] = body
        struct.pack_into("<I", self.desc, 32 * k + 8, n)
        struct.pack_into("<I", self.desc, 32 * k + 24, reply + OUT_HEADER_SIZE)

    def post(self, k: int) -> None:
        struct.pack_into("<Q", self.bufs[k][0].view, 8, self.unique)
        self.unique += 2
        struct.pack_into("<H", self.avail, 4 + 2 * (self.avail_idx % self.size), 2 * k)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        lib.vfsdrv_store_release_u16(self._avail_idx_ptr, self.avail_idx)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def reap(self) -> list[int]:
        while lib.vfsdrv_load_acquire_u16(self._used_idx_ptr) == self.last_used:
            if not select.select([self.call_fd], [], [], 1.0)[0]:
                # nothing for a second: count it and kick again rather than hang
                self.stalls += 1
                self.kick()
                continue
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        done = []
        idx = lib.vfsdrv_load_acquire_u16(self._used_idx_ptr)
        while self.last_used != idx:
            head = struct.unpack_from("<I", self.used, 4 + 8 * (self.last_used % self.size))[0]
            done.append(head // 2)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done

    def close(self) -> None:
        self.dev.close()


# -- measurements ------------------------------------------------------------------------
def _latencies(fn: Callable[[], None], seconds: float) -> list[float]:
    for _ in range(200):
        fn()
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _rate(fn: Callable[[], int], seconds: float) -> float:
    fn()
    n = 0
    t0 = time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        n += fn()
    return n / dt


def _p99(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.99)]


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="vfsdrv-bench-"))
    src = work / "export"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(FILE_SIZE))
    secs = args.seconds
    rows: list[tuple[str, float, float, str, bool]] = []  # name, vfsdrv, floor, unit, lower-better

    getattr_body = abi.pack("fuse_getattr_in")
    # vfsdrv
    with Virtiofsd(src, work / "a.sock") as backend:
        t = VhostUserTransport(str(backend.socket_path), config=encode_config("bench", 1),
                               num_queues=2)
        fs = VirtioFs(t, poll=args.poll).start()
        try:
            c = FuseClient(fs)
            c.init()
            lat = _latencies(lambda: c.getattr(ROOT_ID), secs)
            e = c.lookup(ROOT_ID, "big")
            h = c.open(e.nodeid)
            off = [0]

            def read_1m() -> int:
                c.read(e.nodeid, h.fh, off[0], MiB)
                off[0] = (off[0] + MiB) % FILE_SIZE
                return MiB

            read_rate = _rate(read_1m, secs)
            depth_rates = {}
            for depth in (1, 4, 16):
                inflight = deque(c.submit(Opcode.GETATTR, ROOT_ID, getattr_body)
                                 for _ in range(depth))

                def step(q: deque = inflight) -> int:
                    q.popleft().result()
                    q.append(c.submit(Opcode.GETATTR, ROOT_ID, getattr_body))
                    return 1

                depth_rates[depth] = _rate(step, secs)
                for p in inflight:
                    p.result()
            v = (statistics.median(lat), _p99(lat), read_rate, depth_rates)
        finally:
            fs.close()

    # the floor
    with Virtiofsd(src, work / "b.sock") as backend:
        raw = RawClient(backend.socket_path, 16, MiB)
        try:
            raw.set_request(0, Opcode.INIT, 0, abi.pack(
                "fuse_init_in", major=7, minor=36, max_readahead=MiB,
                flags=abi.InitFlag.BIG_WRITES | abi.InitFlag.MAX_PAGES), 64)
            raw.post(0)
            raw.kick()
            raw.reap()
            raw.set_request(0, Opcode.GETATTR, ROOT_ID, getattr_body, 104)

            def one() -> None:
                raw.post(0)
                raw.kick()
                raw.reap()

            flat = _latencies(one, secs)
            lookup = raw.bufs[1][1]
            raw.set_request(1, Opcode.LOOKUP, ROOT_ID, b"big\0", 128)
            raw.post(1)
            raw.kick()
            raw.reap()
            nodeid = struct.unpack_from("<Q", lookup.view, 4096)[0]
            raw.set_request(1, Opcode.OPEN, nodeid, abi.pack("fuse_open_in"), 16)
            raw.post(1)
            raw.kick()
            raw.reap()
            fh = struct.unpack_from("<Q", lookup.view, 4096)[0]
            roff = [0]

            def raw_read() -> int:
                raw.set_request(2, Opcode.READ, nodeid,
                                abi.pack("fuse_read_in", fh=fh, offset=roff[0], size=MiB), MiB)
                roff[0] = (roff[0] + MiB) % FILE_SIZE
                raw.post(2)
                raw.kick()
                raw.reap()
                return MiB

            fread = _rate(raw_read, secs)
            frates = {}
            for depth in (1, 4, 16):
                for k in range(depth):
                    raw.set_request(k, Opcode.GETATTR, ROOT_ID, getattr_body, 104)
                    raw.post(k)
                raw.kick()

                def rstep() -> int:
                    done = raw.reap()
                    for k in done:
                        raw.post(k)
                    raw.kick()
                    return len(done)

                frates[depth] = _rate(rstep, secs)
                pending = depth
                while pending > 0:
                    pending -= len(raw.reap())
        finally:
            stalls = raw.stalls
            raw.close()

    rows.append(("GETATTR latency median", v[0], statistics.median(flat), "us", True))
    rows.append(("GETATTR latency p99", v[1], _p99(flat), "us", True))
    rows.append(("READ 1 MiB throughput", v[2] / MiB, fread / MiB, "MiB/s", False))
    for depth in (1, 4, 16):
        rows.append((f"GETATTR ops/s, {depth:2d} in flight", v[3][depth], frates[depth], "ops/s",
                     False))
    mode = "polling" if args.poll else "eventfd interrupts"
    print(f"vfsdrv bench: vhost-user to virtiofsd, vfsdrv completes by {mode}; "
          f"{secs:g} s per figure")
    print(f"{'measure':32s} {'vfsdrv':>12s} {'raw floor':>12s} {'unit':>6s} {'cost ratio':>11s}")
    for name, mine, floor, unit, lower in rows:
        ratio = mine / floor if lower else floor / mine
        print(f"{name:32s} {mine:12.1f} {floor:12.1f} {unit:>6s} {ratio:10.2f}x")
    print("cost ratio: how many times slower vfsdrv is than the raw floor (1.00x = no cost)")
    if stalls:
        print(f"note: the raw client stalled {stalls} time(s) for a second (kicked again); "
              "its figures include those seconds")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0
