"""`vfsdrv bench`: what the driver costs on top of the device, measured side by side.

One run, interleaved (each figure of the driver right next to its floor, so a load
change on a shared machine hits both), over vhost-user to a local backend:

  * vfsdrv (VirtioFs + FuseClient: slots, validation, in-flight table) next to a
    minimal raw client -- pre-built descriptor chains written straight into the ring,
    one eventfd kick, one eventfd wait: the device's cost with no driver logic, the
    floor -- on one request queue: GETATTR round trip (median, p99), 1 MiB READ
    throughput, GETATTR ops/s with 1, 4 and 16 requests in flight. Cost ratio:
    vfsdrv / floor (time) or floor / vfsdrv (rate); 1.00x is free. At each depth
    both sides work the same way: every completion of a wake taken at once and
    resubmitted as one batch, one kick (vfsdrv: FuseClient.reap and submit_many,
    the native batched path; each reply checked by the core's rule and copied out).
  * the driver's CPU per request at each depth and request-queue count: CPU time of
    this process (all its threads: the typed client and the driver) per GETATTR from
    /proc/self/task/*/schedstat (exact run time, not tick-sampled), of it user space
    from utime; the device's CPU per request the same way; with the null device the
    driver's kicks and interrupts per request (its counters); the raw floor's alongside.

Backends (--backend): ``null`` (default), the null device of benchmarks/nulldev.c,
which answers at C speed with canned replies on every queue, one thread per queue,
so what remains is the driver; ``virtiofsd`` (Debian 12's C one), ``virtiofsd-rs``
(Debian 13's Rust one) and ``refdev`` (the reference device) serve a temporary
directory. With 2 request queues on a 2-core machine expect no scaling: the figure
says what a second queue costs.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._native import lib
from ..cliargs import seconds
from ..errors import VfsdrvError
from ..fs import abi
from ..fs.abi import IN_HEADER_SIZE, OUT_HEADER_SIZE, Opcode
from ..fs.client import ROOT_ID, FuseClient
from ..fs.config import encode_config
from ..fs.device import VirtioFs
from ..virtio import ring_layout as rl
from ..virtio.constants import Feature
from ..virtio.device import VirtioDevice
from ..virtio.vhost_user import VhostUserTransport
from .backends import BACKENDS, Backend, check_available
from .nulldev import Counters, NullDevice

MiB = 1 << 20
FILE_SIZE = 64 * MiB
DEPTHS = (1, 4, 16)
QUEUES = (1, 2)
TAG = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ATTR_OUT = abi.sizeof("fuse_attr_out")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="driver cost per request vs a raw client and a null device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("null", *BACKENDS), default="null",
                   help="the device to measure against (default: null, the C null device)")
    p.add_argument("--seconds", type=seconds, default=2.0, help="time per measurement (default 2)")
    p.add_argument("--quick", action="store_true", help="0.5 s per measurement")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                   help="requests in flight, comma-separated (default 1,4,16; at most 16)")
    p.add_argument("--queues", default=",".join(map(str, QUEUES)),
                   help="request queue counts for the CPU table (default 1,2)")
    p.add_argument("--poll", action="store_true", help="vfsdrv completes by polling, not eventfd")
    p.add_argument("--ring", choices=("split", "packed"), default=None,
                   help="vfsdrv's virtqueue layout (default: packed when the backend offers "
                   "it; the raw floor is always split)")
    p.set_defaults(func=run)


# -- the floor: a raw client ---------------------------------------------------------------
class RawClient:
    """Fixed chains, no validation, no bookkeeping: slot k = descriptors 2k (request,
    readable) and 2k+1 (reply, writable), chained once at set-up."""

    def __init__(self, socket_path: Path, slots: int, reply_size: int, *,
                 event_idx: bool = False) -> None:
        self.t = VhostUserTransport(str(socket_path), config=encode_config("bench", 1),
                                    num_queues=2)
        self.dev = VirtioDevice(self.t)
        # no EVENT_IDX unless asked (a test of the device's): an interrupt per used buffer
        self.dev.negotiate(ring_features=Feature.EVENT_IDX if event_idx else 0)
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

    #: seconds without any completion after which the device is given up on
    GIVE_UP = 10

    def reap(self) -> list[int]:
        quiet = 0
        while lib.vfsdrv_load_acquire_u16(self._used_idx_ptr) == self.last_used:
            if not select.select([self.call_fd], [], [], 1.0)[0]:
                # nothing for a second: count it and kick again rather than hang; a
                # device that closed its socket or stays silent ends the run
                self.stalls += 1
                quiet += 1
                self.t.check_alive()
                if quiet >= self.GIVE_UP:
                    raise VfsdrvError(f"{self.t.name}: no completion for {quiet} s")
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


# -- CPU accounting ---------------------------------------------------------------------
def task_times(pid: int) -> tuple[int, int]:
    """(run time ns from schedstat, user ticks from stat) summed over the live threads
    of process `pid`. A thread that ends takes its time with it: the processes
    measured here keep theirs for the whole run."""
    run = user = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        user += int(stat[stat.rindex(")") + 2 :].split()[11])  # field 14, utime
    return run, user


def _group_pids(pgid: int) -> list[int]:
    """Processes of a process group: a backend that forks (virtiofsd) is all of them."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
            pids.append(int(name))
    return pids


def _times(pids: list[int]) -> tuple[int, int]:
    run = user = 0
    for pid in pids:
        r, u = task_times(pid)
        run += r
        user += u
    return run, user


@dataclass
class Sample:
    rate: float  # requests (or bytes) per second
    count: int  # requests done
    cpu_us: float  # this process, run time per request
    user_us: float  # this process, user time per request
    dev_us: float  # the device, run time per request
    kicks: float | None = None  # per request, as the null device counts them
    irqs: float | None = None  # interrupts per request, likewise


def _measure(step: Callable[[], int], seconds: float, dev: _Device) -> Sample:
    step()
    me = [os.getpid()]
    dev_pids = dev.pids()
    m0, d0, c0 = _times(me), _times(dev_pids), dev.counters()
    n = 0
    t0 = time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        n += step()
    m1, d1, c1 = _times(me), _times(dev_pids), dev.counters()
    per = max(n, 1)
    sample = Sample(n / dt, n, (m1[0] - m0[0]) / 1000 / per,
                    (m1[1] - m0[1]) * 1e6 / CLK_TCK / per, (d1[0] - d0[0]) / 1000 / per)
    if c0 is not None and c1 is not None:
        c = c1 - c0
        sample.kicks, sample.irqs = c.kicks / per, c.interrupts / per
    return sample


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


def _p99(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.99)]


# -- devices -------------------------------------------------------------------------------
class _Device:
    """One backend process for one connection (both virtiofsds serve just one)."""

    def __init__(self, name: str, work: Path, label: str, queues: int) -> None:
        sock = work / f"{label}.sock"
        self.sock = sock
        if name == "null":
            self.proc: NullDevice | Backend = NullDevice(sock, queues=queues, tag=TAG)
        else:
            extra = ("--request-queues", str(queues)) if name == "refdev" else ()
            self.proc = Backend(name, work / "export", sock, tag=TAG, extra=extra)
        self.pgid = self.proc.proc.pid

    def pids(self) -> list[int]:
        return _group_pids(self.pgid)

    def counters(self) -> Counters | None:
        """The null device's running counts of requests, kicks and interrupts."""
        return self.proc.counters() if isinstance(self.proc, NullDevice) else None

    def transport(self) -> VhostUserTransport:
        # the fallback config is for a device with no config space (Debian 12's virtiofsd)
        return VhostUserTransport(str(self.sock), config=encode_config(TAG, 1), num_queues=2)

    def stop(self) -> None:
        self.proc.stop()


def _csv(text: str, limit: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise VfsdrvError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > limit:
        raise VfsdrvError(f"values of {text!r} must be 1..{limit}")
    return values


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise VfsdrvError("bench needs root: the backends write pid files under /run and "
                          "take memory locks (run it with sudo)")
    # SIGTERM (a timeout, a test harness) unwinds like ^C: the devices are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    secs = 0.5 if args.quick else args.seconds
    depths = _csv(args.depths, 16)
    queue_counts = _csv(args.queues, 64)
    if args.backend != "null":
        check_available(args.backend)
    work = Path(tempfile.mkdtemp(prefix="vfsdrv-bench-", dir="/tmp"))
    devices: list[_Device] = []
    closers: list[Callable[[], None]] = []
    try:
        return _run(args, secs, depths, queue_counts, work, devices, closers)
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - tear everything down regardless
                pass
        for d in devices:
            d.stop()
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, secs: float, depths: list[int], queue_counts: list[int],
         work: Path, devices: list[_Device], closers: list[Callable[[], None]]) -> int:
    null = args.backend == "null"
    if not null:
        (work / "export").mkdir()
        (work / "export" / "big").write_bytes(os.urandom(FILE_SIZE))
    big = "null" if null else "big"  # the null device's 1 GiB file is never filled: no copy
    getattr_body = abi.pack("fuse_getattr_in")

    # the floor: a raw client on its own device
    fdev = _Device(args.backend, work, "floor", 1)
    devices.append(fdev)
    raw = RawClient(fdev.sock, max(depths + [3]), MiB)
    closers.append(raw.close)
    raw.set_request(0, Opcode.INIT, 0, abi.pack(
        "fuse_init_in", major=7, minor=36, max_readahead=MiB,
        flags=abi.InitFlag.BIG_WRITES | abi.InitFlag.MAX_PAGES), 64)
    raw.post(0)
    raw.kick()
    raw.reap()
    reply1 = raw.bufs[1][1]
    raw.set_request(1, Opcode.LOOKUP, ROOT_ID, big.encode() + b"\0", 128)
    raw.post(1)
    raw.kick()
    raw.reap()
    nodeid = struct.unpack_from("<Q", reply1.view, 4096)[0]
    raw.set_request(1, Opcode.OPEN, nodeid, abi.pack("fuse_open_in"), 16)
    raw.post(1)
    raw.kick()
    raw.reap()
    fh = struct.unpack_from("<Q", reply1.view, 4096)[0]

    # vfsdrv: one device and one driver per request-queue count
    clients: dict[int, tuple[FuseClient, _Device]] = {}
    skipped: list[int] = []
    for q in queue_counts:
        dev = _Device(args.backend, work, f"vfsdrv{q}", q)
        devices.append(dev)
        fs = VirtioFs(dev.transport(), request_queues=q, poll=args.poll)
        fs.dev.ring = args.ring
        fs.start()
        closers.append(fs.close)
        if len(fs.request_queues) < q:
            skipped.append(q)  # the device has fewer request queues
            continue
        c = FuseClient(fs)
        c.init()
        clients[q] = (c, dev)
    if 1 not in clients:
        raise VfsdrvError("the table against the floor needs --queues to include 1")
    c1, vdev1 = clients[1]

    # 1. latency, interleaved
    raw.set_request(0, Opcode.GETATTR, ROOT_ID, getattr_body, 104)

    def raw_one() -> None:
        raw.post(0)
        raw.kick()
        raw.reap()

    lat = _latencies(lambda: c1.getattr(ROOT_ID), secs)
    flat = _latencies(raw_one, secs)

    # 2. 1 MiB READ, interleaved
    e = c1.lookup(ROOT_ID, big)
    h = c1.open(e.nodeid)
    off = [0, 0]

    def read_1m() -> int:
        c1.read(e.nodeid, h.fh, off[0], MiB)
        off[0] = (off[0] + MiB) % FILE_SIZE
        return 1

    def raw_read() -> int:
        raw.set_request(2, Opcode.READ, nodeid,
                        abi.pack("fuse_read_in", fh=fh, offset=off[1], size=MiB), MiB)
        off[1] = (off[1] + MiB) % FILE_SIZE
        raw.post(2)
        raw.kick()
        raw.reap()
        return 1

    vread = _measure(read_1m, secs, vdev1)
    fread = _measure(raw_read, secs, fdev)

    # 3. GETATTR at each depth: the floor, then vfsdrv with each queue count
    floor: dict[int, Sample] = {}
    mine: dict[tuple[int, int], Sample] = {}
    for depth in depths:
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

        floor[depth] = _measure(rstep, secs, fdev)
        pending = depth
        while pending > 0:
            pending -= len(raw.reap())
        for q, (c, dev) in clients.items():
            # as the floor does: every completion of a wake at once, resubmitted as
            # one batch (one publish, one kick); each reply checked by the core's
            # rule (vfsdrv_check_reply), copied out and its error raised by result()
            req = (Opcode.GETATTR, ROOT_ID, getattr_body)
            c.submit_many([req] * depth)

            def step(c_: FuseClient = c, req_: tuple = req) -> int:
                done = c_.reap()
                for p in done:
                    if len(p.result()) != ATTR_OUT:
                        raise VfsdrvError(f"GETATTR reply of {len(p.data)} bytes")
                c_.submit_many([req_] * len(done))
                return len(done)

            mine[(q, depth)] = _measure(step, secs, dev)
            left = depth
            while left:
                left -= len(c.reap())

    # -- report --------------------------------------------------------------------------
    mode = "polling" if args.poll else "eventfd interrupts"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    layout = "packed" if c1.fs.dev.has(Feature.RING_PACKED) else "split"
    print(f"vfsdrv bench: vhost-user to {args.backend}, vfsdrv on {layout} rings completes by "
          f"{mode}; {secs:g} s per figure, interleaved; load average {load}; "
          f"{os.cpu_count()} CPUs")
    rows: list[tuple[str, float, float, str, bool]] = [
        ("GETATTR latency median", statistics.median(lat), statistics.median(flat), "us", True),
        ("GETATTR latency p99", _p99(lat), _p99(flat), "us", True),
        ("READ 1 MiB throughput", vread.rate, fread.rate, "MiB/s", False),
    ]
    for depth in (d for d in DEPTHS if d in depths):
        rows.append((f"GETATTR ops/s, {depth:2d} in flight", mine[(1, depth)].rate,
                     floor[depth].rate, "ops/s", False))
    print(f"{'measure (1 request queue)':32s} {'vfsdrv':>12s} {'raw floor':>12s} {'unit':>6s} "
          f"{'cost ratio':>11s}")
    for name, m, f, unit, lower in rows:
        ratio = m / f if lower else f / m
        print(f"{name:32s} {m:12.1f} {f:12.1f} {unit:>6s} {ratio:10.2f}x")
    print("cost ratio: how many times slower vfsdrv is than the raw floor (1.00x = no cost)")
    print()
    print("CPU per request (schedstat run time; user = utime), GETATTR, by request queues "
          "and depth:")
    print(f"{'queues':>6s} {'depth':>5s} {'vfsdrv ops/s':>12s} {'cpu us':>7s} {'user us':>7s} "
          f"{'dev us':>7s} {'kick/rq':>7s} {'irq/rq':>6s} {'floor ops/s':>11s} {'cpu us':>7s} "
          f"{'dev us':>7s} {'of floor':>8s}")

    def per(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for q in clients:
        for depth in depths:
            m, f = mine[(q, depth)], floor[depth]
            print(f"{q:6d} {depth:5d} {m.rate:12.0f} {m.cpu_us:7.2f} {m.user_us:7.2f} "
                  f"{m.dev_us:7.2f} {per(m.kicks):>7s} {per(m.irqs):>6s} {f.rate:11.0f} "
                  f"{f.cpu_us:7.2f} {f.dev_us:7.2f} {m.rate / f.rate:8.2f}")
    top = max(depths)
    for q in clients:
        if q > 1:
            print(f"scaling, {q} request queues vs 1 at {top} in flight: "
                  f"{mine[(q, top)].rate / mine[(1, top)].rate:.2f} times the ops/s "
                  f"({os.cpu_count()} CPUs)")
    m, f = mine[(1, top)], floor[top]
    print(f"typed client vs raw floor, GETATTR at {top} in flight, 1 request queue: "
          f"{m.rate / f.rate:.2f}x the floor's ops/s (the target: >= 0.50x at 16)")
    print(f"READ 1 MiB: vfsdrv cpu {vread.cpu_us:.1f} us (user {vread.user_us:.1f}) per request, "
          f"floor cpu {fread.cpu_us:.1f} us; device {vread.dev_us:.1f} / {fread.dev_us:.1f} us")
    print("cpu us: this process (the client and the driver, every thread) per request; "
          "dev us: the device's threads; kick/rq, irq/rq: the driver's kicks (eventfd "
          "writes) and the interrupts it got per request, as the null device counts them; "
          "floor: the raw client (one request queue); of floor: vfsdrv ops/s / floor ops/s")
    for q in skipped:
        print(f"note: {args.backend} has fewer than {q} request queues: that row is left out")
    if raw.stalls:
        print(f"note: the raw client stalled {raw.stalls} time(s) for a second (kicked again); "
              "its figures include those seconds")
    return 0
