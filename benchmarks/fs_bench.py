"""A vfsdrv mount next to libfuse's C passthrough server and the plain directory, in one
interleaved run.

Three ways to the same host directory:

  * vfsdrv:  `vfsdrv mount -f --vhost-user` (the relay) over vhost-user to Debian's
             virtiofsd (-o cache=auto), which does the file work; --device
             virtiofsd-rs puts Debian 13's Rust virtiofsd there instead (--cache=auto);
  * passthrough_ll: libfuse's C example server (built from Debian's libfuse3-dev by
             benchmarks/build-passthrough-ll.sh), -o cache=auto, its default threads;
  * plain:   the directory itself (no FUSE): the host's floor.

Workloads (fio, ioengine psync): 1 MiB sequential write (then fsync) and read, 4 KiB
random read with one job (queue depth 1) and with 4 jobs; then create, stat and
unlink of 10,000 files (Python, one call per file; the stat runs after the entry
timeout has passed, so each is a LOOKUP on the FUSE mounts). Each workload runs on
the three targets in turn before the next one starts (the order rotates per round),
so a load change on a shared machine hits all three.

On the FUSE mounts every read drops the file's page cache first (fio invalidate=1)
and the random reads are buffered with readahead off (fio's POSIX_FADV_RANDOM) and
touch each 4 KiB block at most once (fio's random map; with 4 jobs each job has its
own quarter of the file), so each is one FUSE READ. Not O_DIRECT: passthrough_ll
passes O_DIRECT on to its backing file, which then reads the disk, while virtiofsd
drops it and reads the page cache; the two would not do the same work. The plain
directory reads the host's page cache (where both FUSE servers read from, too).

Printed: ops/s or MiB/s, ratios vs passthrough_ll, and for each FUSE server its
CPU per operation from /proc/PID/task/*/schedstat (exact run time) and utime (user
space): for vfsdrv the mount process and, separately, the virtiofsd behind it. With
--syscalls, one more random-read run per server under `strace -c -f` counts the
server's syscalls per read (strace slows it; the count is what matters).

--vfsdrv-opt KEY=VALUE (repeatable) mounts vfsdrv with -o KEY=VALUE, e.g.
--vfsdrv-opt poll_us=20 for the pumps' busy-poll window; run once with and once
without to compare (the header line names the options).

--cpus LIST (e.g. 0) pins the whole run -- both servers, the devices and fio -- to those
CPUs. In a VM whose idle vCPUs halt, a wake-up that crosses vCPUs costs the hypervisor's
halt exit and interrupt, several microseconds; on one CPU every hand-off is a plain
context switch. Both FUSE servers get the same treatment, so the pinned ratios show what
the hand-offs cost the relay (twice as many per request as passthrough_ll at queue
depth 1) apart from what they cost the hypervisor.

    .venv/bin/python benchmarks/fs_bench.py [--quick] [--rounds N] [--syscalls]
                                            [--vfsdrv-opt KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vfsdrv.tools.backends import Backend
from vfsdrv.tools.bench import task_times

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ("passthrough_ll", "vfsdrv", "plain")


# -- CPU accounting (as vfsdrv bench) ---------------------------------------------------------
def group_pids(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                out.append(int(name))
    return out


def group_times(pgid: int | None) -> tuple[int, int]:
    run = user = 0
    if pgid is not None:
        for pid in group_pids(pgid):
            r, u = task_times(pid)
            run += r
            user += u
    return run, user


# -- targets ---------------------------------------------------------------------------------
def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def wait_mounted(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not mounted:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)


@dataclass
class Target:
    name: str
    dir: Path  # where the workloads run
    server: int | None = None  # process group of the FUSE server
    device: int | None = None  # process group of the device behind it (vfsdrv: virtiofsd)
    stop: list[Callable[[], None]] = field(default_factory=list)


def mount_opts(opts: list[str]) -> list[str]:
    """--vfsdrv-opt KEY=VALUE ... as vfsdrv mount arguments."""
    return ["-o", ",".join(opts)] if opts else []


def cpu_list(text: str) -> set[int]:
    """'0', '0-1', '0,2': the CPUs this machine has, or an argparse error."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (e.g. 0 or 0-1)") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPUs {text!r} are not all available here (available: "
            f"{','.join(map(str, sorted(allowed)))})")
    return cpus


def key_value(text: str) -> str:
    key, eq, _value = text.partition("=")
    if not key or not eq or "," in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give one KEY=VALUE")
    return text


def start_targets(work: Path, out: dict[str, Target], opts: list[str],
                  device: str = "virtiofsd", device_args: tuple[str, ...] = ()) -> None:
    """Fill `out` target by target, so that a failure half-way still stops what runs."""
    pt_bin = subprocess.run(["sh", str(HERE / "build-passthrough-ll.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    export = work / "export"
    for name in TARGETS:
        (export / name).mkdir(parents=True)
    out["plain"] = Target("plain", export / "plain")

    mv, mp = work / "mnt-vfsdrv", work / "mnt-pt"
    mv.mkdir()
    mp.mkdir()
    vfsd = Backend(device, export, work / "vfsd.sock", extra=device_args)
    t = Target("vfsdrv", mv / "vfsdrv", device=vfsd.proc.pid)
    t.stop.append(vfsd.stop)
    out["vfsdrv"] = t
    log = work / "vfsdrv-mount.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([*VFSDRV, "mount", "-f", "--vhost-user", str(vfsd.socket_path),
                                 *mount_opts(opts), str(mv)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    t.server = proc.pid
    t.stop.insert(0, lambda: unmount(mv, proc))
    wait_mounted(mv, proc, log)

    log = work / "passthrough_ll.log"
    with open(log, "wb") as f:
        proc_pt = subprocess.Popen([pt_bin, "-f", "-o", f"source={export}", "-o", "cache=auto",
                                    str(mp)], stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    t = Target("passthrough_ll", mp / "passthrough_ll", server=proc_pt.pid)
    t.stop.append(lambda: unmount(mp, proc_pt))
    out["passthrough_ll"] = t
    wait_mounted(mp, proc_pt, log)


def unmount(path: Path, proc: subprocess.Popen) -> None:
    if mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- workloads -------------------------------------------------------------------------------
def fio(directory: Path, rw: str, bs: str, size: int, *, invalidate: bool = False,
        io_size: int | None = None, jobs: int = 1, fsync: bool = False,
        seconds: float | None = None, name: str = "data", depth: int = 1,
        direct: bool = False) -> tuple[float, int]:
    """(bytes per second, operations) of one fio job group on `directory`/`name`. With
    `jobs` > 1 each job gets its own 1/jobs of the file (no job reads another's
    blocks, so none hits a page another one brought in). `depth` > 1: libaio."""
    engine = ["--ioengine=libaio", f"--iodepth={depth}"] if depth > 1 else ["--ioengine=psync"]
    cmd = ["fio", "--name=bench", f"--filename={directory / name}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size // jobs}", *engine, f"--invalidate={int(invalidate)}",
           f"--direct={int(direct)}", f"--numjobs={jobs}", "--group_reporting",
           "--output-format=json", "--randrepeat=0"]
    if jobs > 1:
        cmd.append(f"--offset_increment={size // jobs}")
    if io_size:
        cmd.append(f"--io_size={io_size // jobs}")
    if seconds:
        cmd += [f"--runtime={seconds}", "--time_based"]
    if fsync:
        cmd.append("--end_fsync=1")
    # a bound: a request the mount never answers must end the run, not hang it
    limit = 60 + (seconds or 0) * 2 + size / MiB / 10
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio {rw} on {directory} did not finish in {limit:.0f} s "
                           "(a FUSE request left unanswered?)") from None
    if r.returncode != 0:
        raise RuntimeError(f"fio failed on {directory}: {r.stderr.strip()[-1000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    part = job["write"] if "write" in rw else job["read"]
    return float(part["bw_bytes"]), int(part["total_ios"])


def files(directory: Path, count: int, timeout: float) -> list[tuple[float, int]]:
    """(ops/s, count) for create, stat and unlink of `count` files."""
    base = directory / "many"
    base.mkdir()
    names = [str(base / f"f{i:05d}") for i in range(count)]

    def timed(op: Callable[[str], object]) -> tuple[float, int]:
        t0 = time.perf_counter()
        for p in names:
            op(p)
        return count / (time.perf_counter() - t0), count

    def create(p: str) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))

    created = timed(create)
    time.sleep(timeout)  # the entries expire: each stat revalidates with a LOOKUP
    out = [created, timed(os.stat), timed(os.unlink)]
    base.rmdir()
    return out


@dataclass
class Result:
    value: float  # ops/s or MiB/s
    server_us: float | None = None  # CPU run time per operation
    server_user_us: float | None = None
    device_us: float | None = None


def measured(t: Target, fn: Callable[[], tuple[float, int]], scale: float = 1.0) -> Result:
    s0, d0 = group_times(t.server), group_times(t.device)
    value, ops = fn()
    s1, d1 = group_times(t.server), group_times(t.device)
    ops = max(ops, 1)
    if t.server is None:
        return Result(value * scale)
    return Result(value * scale, (s1[0] - s0[0]) / 1000 / ops,
                  (s1[1] - s0[1]) * 1e6 / CLK_TCK / ops,
                  (d1[0] - d0[0]) / 1000 / ops if t.device is not None else None)


def per_request(r: Result, requests_per_op: float) -> Result:
    """Result `r` of an operation that makes `requests_per_op` FUSE requests, per request."""
    k = max(requests_per_op, 1e-9)

    def div(x: float | None) -> float | None:
        return None if x is None else x / k

    return Result(r.value * k, div(r.server_us), div(r.server_user_us), div(r.device_us))


def strace_syscalls(server: int | None, out: Path,
                    workload: Callable[[], tuple[float, int]]) -> float | None:
    """Syscalls of the server's processes (process group `server`) per operation of
    `workload`, from `strace -c -f`."""
    if shutil.which("strace") is None or server is None:
        return None
    pids = group_pids(server)
    args = ["strace", "-c", "-f", "-o", str(out)]
    for pid in pids:
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    _, ops = workload()
    tracer.send_signal(signal.SIGINT)
    tracer.wait(10)
    total = None
    for line in out.read_text().splitlines():
        words = line.split()
        if words and words[-1] == "total":
            total = int(words[3])  # % time, seconds, usecs/call, calls, [errors,] total
    return None if total is None else total / max(ops, 1)


HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
NULL_FILE = 1 << 30  # the null device's file "null": READs report data never written


def null_mount(work: Path, seconds: float, count_syscalls: bool, opts: list[str]
               ) -> list[tuple[str, Result, float | None]]:
    """A vfsdrv mount over the null device (benchmarks/nulldev.c): no file work behind
    it, so what the FUSE server spends is the driver's own cost per request."""
    from vfsdrv.tools.nulldev import NullDevice

    mnt = work / "mnt-null"
    mnt.mkdir()
    rows: list[tuple[str, Result, float | None]] = []
    # entry and attr timeouts 0: every stat is a LOOKUP and a GETATTR
    with NullDevice(work / "null.sock", extra=("--attr-timeout", "0")) as dev:
        log = work / "vfsdrv-null-mount.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([*VFSDRV, "mount", "-f", "--vhost-user", str(dev.socket_path),
                                     *mount_opts(opts), str(mnt)], stdout=f,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_mounted(mnt, proc, log)
            t = Target("vfsdrv-null", mnt, server=proc.pid, device=dev.pid)
            for depth in (1, 16):
                def reads(depth: int = depth) -> tuple[float, int]:
                    return _iops(fio(mnt, "randread", "4k", NULL_FILE, name="null", direct=True,
                                     depth=depth, seconds=seconds))

                rows.append((f"4 KiB O_DIRECT read, {depth} in flight", measured(t, reads),
                             strace_syscalls(t.server, work / f"strace-null-{depth}.txt", reads)
                             if count_syscalls else None))

            def stats() -> tuple[float, int]:
                path = str(mnt / "hello")
                n = 0
                t0 = time.perf_counter()
                while (dt := time.perf_counter() - t0) < seconds:
                    for _ in range(100):
                        os.stat(path)
                    n += 100
                return n / dt, n

            # how many requests one stat makes (entry and attr timeouts 0: the kernel
            # revalidates the name and the attributes, and the root's on the way)
            c0 = dev.counters()
            _, n = stats()
            per_stat = (dev.counters() - c0).requests / max(n, 1)
            rows.append((f"stat: {per_stat:.1f} requests each", measured(t, stats),
                         strace_syscalls(t.server, work / "strace-null-stat.txt", stats)
                         if count_syscalls else None))
            rows.append((f"  the same, per request (x1/{per_stat:.1f})",
                         per_request(rows[-1][1], per_stat),
                         None if rows[-1][2] is None else rows[-1][2] / per_stat))
        finally:
            unmount(mnt, proc)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: 256 MiB, 64 MiB read")
    ap.add_argument("--size-mib", type=int, help="sequential file size (default 1024; quick 256)")
    ap.add_argument("--rand-mib", type=int,
                    help="bytes read by each random-read run (default 128; quick 64)")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rounds", type=int,
                    help="repeat everything, report medians (default 3; quick 1)")
    ap.add_argument("--no-null", action="store_true",
                    help="leave out the mount over the null device")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the servers' syscalls per random read with strace -c")
    ap.add_argument("--device", choices=("virtiofsd", "virtiofsd-rs"), default="virtiofsd",
                    help="the device behind the vfsdrv mount: Debian 12's C virtiofsd "
                    "(default) or Debian 13's Rust one (python3 -m vfsdrv.tools.virtiofsd_rs "
                    "fetches it)")
    ap.add_argument("--device-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the device's command line, e.g. "
                    "--device-arg=--thread-pool-size=0; repeatable")
    ap.add_argument("--cpus", type=cpu_list, metavar="LIST",
                    help="pin the whole run (servers, devices, fio) to these CPUs, "
                    "e.g. 0 or 0-1")
    ap.add_argument("--halt-poll-ns", type=int, metavar="NS",
                    help="for the run, let idle CPUs of this VM poll NS ns before they halt "
                    f"(cpuidle-haltpoll's guest_halt_poll_ns, {HALT_POLL}; restored after): "
                    "shows what cross-CPU wake-ups cost (README, Reading the figures on a "
                    "VM); 200000 is the kernel's default")
    ap.add_argument("--vfsdrv-opt", action="append", default=[], type=key_value,
                    metavar="KEY=VALUE",
                    help="a vfsdrv mount option (-o KEY=VALUE) for both vfsdrv mounts, e.g. "
                    "poll_us=20; repeatable")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)  # every process started from here inherits it
    # SIGTERM (timeout(1), a CI limit) unwinds like ^C: the mounts come down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    rand = min((args.rand_mib or (64 if args.quick else 128)) * MiB, size)
    if shutil.which("fio") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "fio"], check=True,
                       stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="vfsdrv-fs-bench-", dir="/tmp"))
    targets: dict[str, Target] = {}
    null_rows: list[tuple[str, Result, float | None]] = []
    results: dict[tuple[str, str], list[Result]] = {}
    syscalls: dict[str, float | None] = {}
    halt_poll_was = None
    if args.halt_poll_ns is not None:
        try:
            halt_poll_was = HALT_POLL.read_text().strip()
            HALT_POLL.write_text(str(args.halt_poll_ns))
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            ap.error(f"--halt-poll-ns needs the cpuidle-haltpoll driver of a KVM guest "
                     f"({HALT_POLL}): {exc.strerror}")
    t_start = time.monotonic()
    try:
        start_targets(work, targets, args.vfsdrv_opt, args.device, tuple(args.device_arg))
        order = list(TARGETS)
        # the entry timeout of cache=auto is 1 s for both FUSE servers
        workloads: list[tuple[str, str, Callable[[Target], Result]]] = []

        def add(name: str, unit: str, fn: Callable[[Target], Result]) -> None:
            workloads.append((name, unit, fn))

        add("1 MiB sequential write", "MiB/s", lambda t: measured(
            t, lambda: fio(t.dir, "write", "1M", size, fsync=True), 1 / MiB))
        add("1 MiB sequential read", "MiB/s", lambda t: measured(
            t, lambda: fio(t.dir, "read", "1M", size, invalidate=t.name != "plain"), 1 / MiB))
        add("4 KiB random read, qd1", "ops/s", lambda t: measured(
            t, lambda: _iops(fio(t.dir, "randread", "4k", size, io_size=rand,
                                 invalidate=t.name != "plain"))))
        add("4 KiB random read, 4 jobs", "ops/s", lambda t: measured(
            t, lambda: _iops(fio(t.dir, "randread", "4k", size, io_size=rand, jobs=4,
                                 invalidate=t.name != "plain"))))
        for _round in range(args.rounds):
            for name, _unit, fn in workloads:
                for tname in order:
                    results.setdefault((name, tname), []).append(fn(targets[tname]))
            for tname in order:
                t = targets[tname]
                s0, d0 = group_times(t.server), group_times(t.device)
                rates = files(t.dir, args.files, 1.5)
                s1, d1 = group_times(t.server), group_times(t.device)
                for op, (rate, _n) in zip(("create", "stat", "unlink"), rates, strict=True):
                    results.setdefault((f"{op} {args.files:,} files", tname), []).append(
                        Result(rate))
                if t.server is not None:  # CPU over the three phases, per file operation
                    n = 3 * args.files
                    results.setdefault(("create+stat+unlink, per op", tname), []).append(Result(
                        0.0, (s1[0] - s0[0]) / 1000 / n, (s1[1] - s0[1]) * 1e6 / CLK_TCK / n,
                        (d1[0] - d0[0]) / 1000 / n if t.device is not None else None))
            order = order[1:] + order[:1]
        if not args.no_null:
            null_rows = null_mount(work, 2.0 if args.quick else 5.0, args.syscalls,
                                   args.vfsdrv_opt)
        if args.syscalls:
            for tname in ("passthrough_ll", "vfsdrv"):
                t = targets[tname]
                syscalls[tname] = strace_syscalls(
                    t.server, work / f"strace-{tname}.txt",
                    lambda t=t: fio(t.dir, "randread", "4k", size, io_size=rand // 4,
                                    invalidate=True))
    finally:
        for t in targets.values():
            for stop in t.stop:
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - tear everything down regardless
                    print(f"teardown of {t.name}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        if halt_poll_was is not None:
            HALT_POLL.write_text(halt_poll_was)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"fs_bench: vfsdrv mount (relay -> vhost-user -> {args.device}) vs libfuse "
          f"passthrough_ll vs the plain directory; file {size // MiB} MiB, random reads "
          f"{rand // MiB} MiB, "
          f"{args.rounds} round(s), {time.monotonic() - t_start:.0f} s; load average {load}; "
          f"{os.cpu_count()} CPUs"
          f"{'; pinned to CPUs ' + ','.join(map(str, sorted(args.cpus))) if args.cpus else ''}"
          f"{'' if halt_poll_was is None else f'; guest_halt_poll_ns {args.halt_poll_ns}'}"
          f"; device args: {' '.join(args.device_arg) or 'none'}; vfsdrv mount options: "
          f"{','.join(args.vfsdrv_opt) if args.vfsdrv_opt else 'none'}")
    print(f"{'workload':<30} {'unit':<6} {'vfsdrv':>10} {'pt_ll':>10} {'plain':>10} "
          f"{'vfsdrv/pt':>9} {'plain/pt':>9}")
    for (name, unit, _fn) in [*workloads, *[(f"{op} {args.files:,} files", "ops/s", None)
                                            for op in ("create", "stat", "unlink")]]:
        v, p, f = (statistics.median(r.value for r in results[(name, t)])
                   for t in ("vfsdrv", "passthrough_ll", "plain"))
        print(f"{name:<30} {unit:<6} {v:>10,.0f} {p:>10,.0f} {f:>10,.0f} {v / p:>9.2f} "
              f"{f / p:>9.2f}")
    print()
    print("FUSE server CPU per operation, us (schedstat run time; user = utime); vfsdrv's "
          f"device is the {args.device} behind it")
    print(f"{'workload':<30} {'vfsdrv':>8} {'user':>6} {'device':>9} {'pt_ll':>8} "
          f"{'user':>6} {'vfsdrv/pt':>9}")
    names = [w[0] for w in workloads] + ["create+stat+unlink, per op"]
    for name in names:
        rv, rp = results[(name, "vfsdrv")], results[(name, "passthrough_ll")]

        def med(rs: list[Result], attr: str) -> float:
            return statistics.median(getattr(r, attr) or 0.0 for r in rs)

        v, p = med(rv, "server_us"), med(rp, "server_us")
        print(f"{name:<30} {v:>8.1f} {med(rv, 'server_user_us'):>6.1f} "
              f"{med(rv, 'device_us'):>9.1f} {p:>8.1f} {med(rp, 'server_user_us'):>6.1f} "
              f"{v / p if p else float('nan'):>9.2f}")
    if syscalls:
        print("syscalls per 4 KiB random read (strace -c -f of the server): " + ", ".join(
            f"{k} {v:.1f}" if v is not None else f"{k} n/a" for k, v in syscalls.items()))
    if null_rows:
        print()
        print("vfsdrv mount over the null device (no file work behind it): the FUSE server's "
              "own cost per operation (a read is one request)")
        print(f"{'workload':<34} {'ops/s':>10} {'cpu us':>7} {'user us':>7} {'nulldev us':>10} "
              f"{'syscalls':>8}")
        for name, r, sc in null_rows:
            print(f"{name:<34} {r.value:>10,.0f} {r.server_us or 0:>7.1f} "
                  f"{r.server_user_us or 0:>7.1f} {r.device_us or 0:>10.1f} "
                  f"{'n/a' if sc is None else f'{sc:.1f}':>8}")
    return 0


def _iops(r: tuple[float, int]) -> tuple[float, int]:
    """fio's bytes/s of a 4 KiB job as operations/s."""
    return r[0] / 4096, r[1]


if __name__ == "__main__":
    sys.exit(main())
