"""The hostile-device fuzzer (issue 10 item 19).

Each seed starts a HostileDevice (tests/fakes/hostile_device.py: the reference
device whose answers a seeded Mutator rewrites) on a fresh export and drives it

  * `client`: through the typed client (FuseClient over VirtioFs over
    VhostUserTransport), in this process, every call with a deadline;
  * `mount`: through a real relay mount (`vfsdrv mount -f --vhost-user`, its own
    process) used by ordinary programs (ls, cat, stat, cp, find, sha256sum,
    readlink, a shell redirect, flock), each with a timeout. Every program also
    runs on the export itself: that is what an honest device would have shown.

Every step's outcome is one of
    ok / error    the step worked, or failed with a clean per-request error;
    failed        the device was declared failed (typed client: a DeviceError;
                  mount: ENOTCONN) or refused at bring-up;
    wrong         a success carrying data an honest device would not have given
                  (a rewritten reply the driver had to refuse, impossible data, or
                  a mismatch with the honest result), or files written under a
                  mount point after its device failed;
    hang          a call, program or vfsdrv command blocked past its timeout;
    crash         a Python traceback, a server killed by a signal, a sanitizer report.
Only the first three are allowed. Exit status: 0 all allowed, 1 findings (each
printed with the command that replays its seed), 3 the fuzzer itself got stuck.

    hostile_fuzz.py --mode client --seeds 0:40         a bounded run (CI)
    hostile_fuzz.py --long                             both modes for $VFSDRV_FUZZ_SECONDS
                                                       (default 4 hours) from a random seed
    VFSDRV_NATIVE_SO=/tmp/x/_native.abi3.so hostile_fuzz.py ...   another native build
                                                       (build-sanitized.sh)
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(TESTS), str(HERE)]

import native_override  # noqa: E402

NATIVE_SO = native_override.install()

from fakes.hostile_device import (  # noqa: E402
    CLIENT_ONLY,
    KNOWN_DEFECTS,
    NOTIFY_KINDS,
    REPLY_KINDS,
    SESSION_KINDS,
    HostileDevice,
    Mutation,
    Mutator,
)
from vfsdrv.errors import VfsdrvError  # noqa: E402
from vfsdrv.fs import abi  # noqa: E402
from vfsdrv.fs.abi import Opcode  # noqa: E402
from vfsdrv.fs.client import OFFSET_MAX, ROOT_ID, FuseClient, Lock  # noqa: E402
from vfsdrv.fs.client import check_attr as client_check_attr  # noqa: E402
from vfsdrv.fs.device import Pending, VirtioFs  # noqa: E402
from vfsdrv.virtio.vhost_user import VhostUserTransport  # noqa: E402

ALLOWED = ("ok", "error", "failed")
SEVERITY = {name: i for i, name in enumerate(["ok", "error", "failed", "wrong", "hang", "crash"])}
#: seconds a typed call, a program, a mount or an unmount may take
CALL_TIMEOUT = 10.0
PROGRAM_TIMEOUT = float(os.environ.get("VFSDRV_FUZZ_PROGRAM_TIMEOUT", 10))
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 15.0
#: a seed that takes longer than this has hung the fuzzer itself
SEED_WATCHDOG = 120.0
LLONG_MAX = (1 << 63) - 1
VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
               stat.S_IFIFO, stat.S_IFSOCK}
#: what the relay mount is fuzzed with: the typed client's list without the lies only
#: it can judge, and without what the kernel's own FUSE client takes from any server
#: (the relay forwards READDIR payloads to it as they are): NUL in dirent names
#: (parse_dirfile checks only '/'), offsets that never advance (a listing then
#: repeats its names, as with any FUSE server doing so)
MOUNT_KINDS = [k for k in REPLY_KINDS
               if k not in CLIENT_ONLY and k not in ("dirent_nul", "dirent_off_stuck")
               and k not in KNOWN_DEFECTS]
CLIENT_KINDS = [k for k in REPLY_KINDS if k not in KNOWN_DEFECTS]
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")


@dataclass
class Finding:
    seed: int
    mode: str
    outcome: str
    step: str
    detail: str
    mutations: list[str] = field(default_factory=list)

    def replay(self) -> str:
        forced = (f" --kinds {','.join(FORCED.kinds)}" if FORCED.kinds else "") + (
            f" --rate {FORCED.rate}" if FORCED.rate is not None else "") + (
            f" --ring {FORCED.ring}" if FORCED.ring else "")
        return (f"python tests/fuzz/hostile_fuzz.py --mode {self.mode} --seeds {self.seed}"
                + forced)


@dataclass
class SeedResult:
    seed: int
    mode: str
    outcome: str = "ok"
    counts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    mutations: int = 0
    failed_at: str = ""  #: the step at which the device was declared failed

    def add(self, outcome: str, step: str, detail: str = "",
            mutations: list[Mutation] | None = None) -> None:
        self.counts[outcome] += 1
        if outcome == "failed" and not self.failed_at:
            self.failed_at = step
        if SEVERITY[outcome] > SEVERITY[self.outcome]:
            self.outcome = outcome
        if outcome not in ALLOWED:
            self.findings.append(Finding(self.seed, self.mode, outcome, step, detail[:2000],
                                         [str(m) for m in mutations or []]))


# -- the export every seed starts from ---------------------------------------------------
def make_export(root: Path, rng: random.Random) -> None:
    root.mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello from an honest device\n" * rng.randint(1, 60))
    (root / "b.bin").write_bytes(rng.randbytes(rng.choice([0, 1, 4096, 70_000, 300_000])))
    d = root / "d"
    d.mkdir()
    for i in range(rng.randint(1, 40)):
        (d / f"f{i:03d}").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    os.symlink("a.txt", root / "s")
    (root / "lockf").write_bytes(b"")


@dataclass
class Forced:
    """What --kinds/--rate fix instead of the seed's choice (a replay, a self-test)."""

    kinds: list[str] | None = None
    rate: float | None = None
    ring: str | None = None  #: "split" or "packed" instead of the seed's choice


FORCED = Forced()


def choose_ring(rng: random.Random) -> str | None:
    """The device's ring offer: None offers packed (the driver takes it), "split" withholds it."""
    ring = rng.choice([None, "split"])
    return FORCED.ring if FORCED.ring is not None else ring


def choose_mutator(seed: int, kinds: list[str], rates: list[float]) -> Mutator:
    rng = random.Random(seed * 7919 + 1)
    session = [rng.choice(SESSION_KINDS)] if rng.random() < 0.12 else []
    # a seed fuzzes a few kinds at a time, so each gets a chance to hit its opcode
    chosen = rng.sample(kinds, k=min(len(kinds), rng.choice([1, 2, 3, 6, len(kinds)])))
    rate = rng.choice(rates)
    notify_rate = rng.choice([0.0, 0.02, 0.1])
    notify_kinds = list(NOTIFY_KINDS)
    if FORCED.kinds is not None:
        chosen = [k for k in FORCED.kinds if k in REPLY_KINDS]
        session = [k for k in FORCED.kinds if k in SESSION_KINDS]
        notify_kinds = [k for k in FORCED.kinds if k in NOTIFY_KINDS]
        notify_rate = 1.0 if notify_kinds else 0.0
    if FORCED.rate is not None:
        rate = FORCED.rate
    m = Mutator(seed, rate=rate, kinds=chosen, session=session,
                notify_rate=notify_rate, notify_kinds=notify_kinds,
                flood=rng.choice([50, 300, 2000]))
    for kind in session:  # listed with the findings; not tied to a request
        m.record(Mutation(kind, detectable=False))
    return m


# -- typed client --------------------------------------------------------------------------
class RecordingClient(FuseClient):
    """A FuseClient that remembers the unique of every request it sent."""

    def __init__(self, fs: VirtioFs) -> None:
        super().__init__(fs)
        self.timeout = CALL_TIMEOUT
        self.uniques: set[int] = set()

    def submit(self, opcode: int, nodeid: int, *parts: bytes | memoryview) -> Pending:
        pending = super().submit(opcode, nodeid, *parts)
        self.uniques.add(pending.unique)
        return pending


class Impossible(Exception):
    """The data a call returned breaks a rule no real file system breaks."""


class Mismatch(Exception):
    """The data differs from what the honest device holds."""


def _check_attr(a, what: str) -> None:
    if stat.S_IFMT(a.mode) not in VALID_TYPES:
        raise Impossible(f"{what}: mode {a.mode:#o}")
    if a.size > LLONG_MAX:
        raise Impossible(f"{what}: size {a.size}")


def _check_entry(e, what: str, new: bool = False) -> None:
    if e.nodeid == 0 or (new and e.nodeid == ROOT_ID):
        raise Impossible(f"{what}: node id {e.nodeid}")
    _check_attr(e.attr, what)


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise Mismatch(what)


class ClientSeed:
    """The typed-client workload of one seed: a list of self-contained steps."""

    def __init__(self, c: RecordingClient, export: Path, seed: int) -> None:
        self.c = c
        self.export = export
        self.seed = seed
        self.round = 0

    def _node(self, parent: int, name: str) -> int:
        e = self.c.lookup(parent, name)
        _check_entry(e, f"LOOKUP {name}")
        return e.nodeid

    def _read_all(self, nodeid: int, fh: int) -> bytes:
        out, off = bytearray(), 0
        while True:
            chunk = self.c.read(nodeid, fh, off, 65536)
            out += chunk
            off += len(chunk)
            if len(chunk) < 65536:
                return bytes(out)
            if off > 1 << 24:
                raise Mismatch("file without end")

    def lookup_getattr(self) -> None:
        e = self.c.lookup(ROOT_ID, "b.bin")
        _check_entry(e, "LOOKUP b.bin")
        host = os.stat(self.export / "b.bin")
        _expect(stat.S_ISREG(e.attr.mode) and e.attr.size == host.st_size,
                f"LOOKUP b.bin: mode {e.attr.mode:#o} size {e.attr.size}, host {host.st_size}")
        a = self.c.getattr(e.nodeid)
        _check_attr(a, "GETATTR b.bin")
        _expect(a.size == host.st_size, f"GETATTR b.bin: size {a.size}, host {host.st_size}")
        root = self.c.getattr(ROOT_ID)
        _check_attr(root, "GETATTR root")
        _expect(stat.S_ISDIR(root.mode), f"GETATTR root: mode {root.mode:#o}")

    def read_file(self, name: str = "a.txt") -> None:
        node = self._node(ROOT_ID, name)
        h = self.c.open(node, os.O_RDONLY)
        try:
            data = self._read_all(node, h.fh)
        finally:
            self.c.release(node, h.fh)
        host = (self.export / name).read_bytes()
        _expect(data == host, f"READ {name}: {len(data)} bytes differ from the host's {len(host)}")

    def read_big(self) -> None:
        self.read_file("b.bin")

    def _listing(self, nodeid: int, host: Path, plus: bool) -> None:
        entries = self.c.readdir_all(nodeid, plus=plus)
        for d in entries:
            if not d.name or len(d.name) > 255 or b"/" in d.name or b"\0" in d.name:
                raise Impossible(f"dirent name {d.name!r}")
            if d.entry is not None and d.entry.nodeid and d.name not in (b".", b".."):
                _check_entry(d.entry, f"READDIRPLUS {d.name!r}")
        names = {d.name for d in entries} - {b".", b".."}
        want = {os.fsencode(n) for n in os.listdir(host)}
        _expect(names == want, f"READDIR{'PLUS' if plus else ''} {host.name}: "
                f"{sorted(names ^ want)[:8]} differ")

    def readdir_root(self) -> None:
        self._listing(ROOT_ID, self.export, plus=False)

    def readdirplus_sub(self) -> None:
        self._listing(self._node(ROOT_ID, "d"), self.export / "d", plus=True)

    def readdir_sub(self) -> None:
        self._listing(self._node(ROOT_ID, "d"), self.export / "d", plus=False)

    def readlink(self) -> None:
        target = self.c.readlink(self._node(ROOT_ID, "s"))
        _expect(target == b"a.txt", f"READLINK s: {target!r}")

    def create_write(self) -> None:
        name = f"n{self.round}"
        data = random.Random(self.seed + self.round).randbytes(5000)
        e, h = self.c.create(ROOT_ID, name)
        _check_entry(e, f"CREATE {name}", new=True)
        _expect(stat.S_ISREG(e.attr.mode), f"CREATE {name}: mode {e.attr.mode:#o}")
        try:
            step = max(1, self.c.fs.max_write)  # the session's max_write (INIT may cut it)
            for off in range(0, len(data), step):
                n = self.c.write(e.nodeid, h.fh, off, data[off : off + step])
                _expect(n == len(data[off : off + step]), f"WRITE {name}: {n} bytes written")
            back = self._read_all(e.nodeid, h.fh)
        finally:
            self.c.release(e.nodeid, h.fh)
        _expect(back == data, f"READ back {name}: {len(back)} bytes differ")
        self.c.unlink(ROOT_ID, name)

    def mkdir(self) -> None:
        name = f"m{self.round}"
        e = self.c.mkdir(ROOT_ID, name)
        _check_entry(e, f"MKDIR {name}", new=True)
        _expect(stat.S_ISDIR(e.attr.mode), f"MKDIR {name}: mode {e.attr.mode:#o}")
        _expect((self.export / name).is_dir(), f"MKDIR {name}: no directory on the host")
        self.c.rmdir(ROOT_ID, name)

    def statfs(self) -> None:
        self.c.statfs()

    def lock(self) -> None:
        """A blocking lock that must wait: granted through FUSE_NOTIFY_LOCK."""
        node = self._node(ROOT_ID, "lockf")
        owner1, owner2 = 1000 + 2 * self.round, 1001 + 2 * self.round
        h1 = self.c.open(node, os.O_RDWR)
        h2 = None
        try:
            h2 = self.c.open(node, os.O_RDWR)
            whole = Lock(0, OFFSET_MAX, 1, 0)  # F_WRLCK
            self.c.setlk(node, h1.fh, owner1, whole)
            waiting = self.c.setlkw_async(node, h2.fh, owner2, whole)
            time.sleep(0.02)  # let the device park it
            self.c.setlk(node, h1.fh, owner1, Lock(0, OFFSET_MAX, 2, 0))  # F_UNLCK
            waiting.result(CALL_TIMEOUT)
            self.c.setlk(node, h2.fh, owner2, Lock(0, OFFSET_MAX, 2, 0))
        finally:
            self.c.release(node, h1.fh, release_flags=2, lock_owner=owner1)
            if h2 is not None:
                self.c.release(node, h2.fh, release_flags=2, lock_owner=owner2)

    def many_in_flight(self) -> None:
        """Requests in flight together: used entries come back in batches."""
        n = random.Random(self.seed * 31 + self.round).choice([4, 16, 48])
        body = abi.pack("fuse_getattr_in")
        pending = [self.c.submit(Opcode.GETATTR, ROOT_ID, body) for _ in range(n)]
        for p in pending:
            data = p.result(CALL_TIMEOUT)
            out = abi.unpack("fuse_attr_out", data)
            client_check_attr(out.attr, "GETATTR")  # what FuseClient.getattr does
            _check_attr(out.attr, "GETATTR root (batch)")
            _expect(stat.S_ISDIR(out.attr.mode), f"GETATTR root: mode {out.attr.mode:#o}")

    STEPS = ["many_in_flight", "lookup_getattr", "read_file", "read_big", "readdir_root",
             "readdirplus_sub", "readdir_sub", "readlink", "create_write", "mkdir", "statfs",
             "lock"]


def judge_call(res: SeedResult, fs: VirtioFs, c: RecordingClient, mutator: Mutator,
               step: str, fn: Callable[[], object]) -> None:
    """Run one step and classify it."""
    mark = mutator.mark()
    c.uniques.clear()
    try:
        fn()
    except TimeoutError as exc:  # before OSError: it is one
        if exc.errno is None:  # the call's deadline passed (an ETIMEDOUT reply is an error)
            res.add("hang", step, f"{exc}", mutator.since(mark))
        else:
            res.add("failed" if fs.broken is not None else "error", step)
        return
    except Impossible as exc:
        res.add("wrong", step, f"impossible data returned as success: {exc}",
                mutator.since(mark))
        return
    except Mismatch as exc:
        muts = [m for m in mutator.since(mark) if m.unique in c.uniques or not m.unique]
        lies = [m for m in muts if not m.detectable]
        if lies:  # a plausible lie: nobody could have told
            res.add("ok", step)
        else:
            res.add("wrong", step, f"success differs from the honest device: {exc}", muts)
        return
    except VfsdrvError as exc:
        if isinstance(exc, OSError) and exc.errno is not None and not 0 < exc.errno < 512:
            res.add("wrong", step, f"errno {exc.errno!r} no program can get: {exc!r}",
                    mutator.since(mark))
        elif fs.broken is not None:
            res.add("failed", step)
        else:
            res.add("error", step)  # a reply refused as malformed (ProtocolError)
        return
    except OSError as exc:
        if exc.errno is None or not 0 < exc.errno < 512:
            # the kernel refuses such an error (a program would wait forever): the
            # reply had to become EIO
            res.add("wrong", step, f"errno {exc.errno!r} no program can get: {exc!r}",
                    mutator.since(mark))
        else:
            res.add("failed" if fs.broken is not None else "error", step)
        return
    except Exception:
        res.add("crash", step, traceback.format_exc(), mutator.since(mark))
        return
    muts = mutator.since(mark)
    refused = [m for m in muts if m.detectable and m.unique in c.uniques]
    if refused:
        res.add("wrong", step, "succeeded although a reply had to be refused", refused)
    else:
        res.add("ok", step)


def run_client_seed(seed: int, work: Path, rounds: int = 3) -> SeedResult:
    res = SeedResult(seed, "client")
    rng = random.Random(seed)
    mutator = choose_mutator(seed, CLIENT_KINDS, [0.02, 0.05, 0.15, 0.4])
    export = work / "export"
    make_export(export, rng)
    sock = str(work / "d.sock")
    queues = rng.choice([1, 1, 2])
    # packed rings when the driver takes them (the default), or split only
    dev = HostileDevice(sock, str(export), mutator, request_queues=queues,
                        ring=choose_ring(rng))
    dev.start()
    fs = None
    try:
        mark = mutator.mark()
        try:
            fs = VirtioFs(VhostUserTransport(sock, timeout=5.0, teardown_timeout=5.0),
                          queue_size=rng.choice([8, 64, 256]), small_slots=rng.choice([4, 64]),
                          large_slots=rng.choice([2, 8]), poll=rng.random() < 0.2)
            fs.start()
            fs.init(timeout=CALL_TIMEOUT)
        except TimeoutError as exc:
            res.add("hang", "bring-up", str(exc), mutator.since(mark))
            return res
        except (VfsdrvError, OSError):
            res.add("failed", "bring-up")  # a device refused at bring-up (or INIT)
            return res
        except Exception:
            res.add("crash", "bring-up", traceback.format_exc(), mutator.since(mark))
            return res
        init_muts = [m for m in mutator.since(mark) if m.detectable]
        if init_muts:
            res.add("wrong", "bring-up", "FUSE_INIT accepted a reply it had to refuse",
                    init_muts)
        c = RecordingClient(fs)
        steps = ClientSeed(c, export, seed)
        for r in range(rounds):
            steps.round = r
            order = list(ClientSeed.STEPS)
            rng.shuffle(order)
            for name in order:
                judge_call(res, fs, c, mutator, name, getattr(steps, name))
                if fs.broken is not None:
                    return res
    finally:
        res.mutations = len(mutator.mutations)
        if fs is not None:
            try:
                fs.close()
            except VfsdrvError:
                pass
            except Exception:
                res.add("crash", "close", traceback.format_exc())
        dev.stop()
    return res


# -- relay mount ---------------------------------------------------------------------------
def _mountinfo() -> dict[str, str]:
    """mount point -> major:minor"""
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4]: line.split()[2] for line in f}


def _abort_fuse(mnt: Path) -> None:
    """Abort the FUSE connection of `mnt`: what frees a program stuck in it."""
    dev = _mountinfo().get(str(mnt))
    if dev is None:
        return
    minor = dev.split(":")[1]
    try:
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    except OSError:
        pass


def _force_unmount(mnt: Path) -> None:
    for _ in range(10):
        if str(mnt) not in _mountinfo():
            return
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)
        time.sleep(0.05)


def program_env(**extra: str) -> dict[str, str]:
    """The environment of the ordinary programs: not under the sanitizer's preload."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VFSDRV_NATIVE_SO")}
    return {**env, **extra}


def run_program(argv: list[str], timeout: float, mnt: Path | None,
                env: dict | None = None) -> tuple[int | None, bytes, bytes]:
    """(returncode or None on timeout, stdout, stderr). A program stuck past its
    timeout is killed; one that cannot die (D state) is freed by aborting the mount."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=program_env() if env is None else env)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            if mnt is not None:
                _abort_fuse(mnt)
            proc.communicate(timeout=10)
        return None, b"", b""


#: shell programs run with R = the mount, then R = the export (the honest answer)
PROGRAMS: list[tuple[str, str]] = [
    ("ls", 'ls -a -1 "$R" | sort'),
    ("cat", 'cat "$R/a.txt"'),
    ("stat", "stat -c '%n %s %F' \"$R/b.bin\" \"$R/s\" \"$R/d\" | sed \"s|^$R||\""),
    ("cp", 'cp "$R/b.bin" "$T/copy" && sha256sum < "$T/copy"'),
    ("find", 'cd "$R" && find . | sort'),
    ("sha256sum", 'cd "$R/d" && sha256sum *'),
    ("readlink", 'readlink "$R/s"'),
    ("cat-big", 'cat "$R/b.bin" | sha256sum'),
    # several programs at once: requests in flight together on every queue
    ("parallel", 'for i in 1 2 3 4; do (cat "$R/b.bin" | sha256sum && cat "$R"/d/* | wc -c) '
                 '>"$T/p$i" & p="$p $!"; done; for j in $p; do wait $j || exit 1; done; '
                 'cat "$T"/p?; rm -f "$T"/p?'),
]


def run_mount_seed(seed: int, work: Path) -> SeedResult:
    res = SeedResult(seed, "mount")
    rng = random.Random(seed)
    mutator = choose_mutator(seed, MOUNT_KINDS, [0.01, 0.03, 0.08])
    export, mnt, scratch = work / "export", work / "mnt", work / "t"
    make_export(export, rng)
    mnt.mkdir()
    scratch.mkdir()
    sock = str(work / "d.sock")
    log = work / "serve.log"
    dev = HostileDevice(sock, str(export), mutator, request_queues=rng.choice([1, 2]),
                        ring=choose_ring(rng))
    dev.start()
    # few slots (the pumps stall and resume), polling, no notification queue
    extra = rng.choice([[], [], ["--small-slots", "2", "--large-slots", "1"], ["--poll"],
                        ["--no-notification"], ["--threads", "1"]])
    cmd = [sys.executable, str(HERE / "native_override.py"), "-m", "vfsdrv.tools.cli",
           "mount", "-f", "-v", "--vhost-user", sock, "--timeout", "5", *extra, str(mnt)]
    proc = None
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.bind(str(work / "notify.sock"))
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, "NOTIFY_SOCKET": str(work / "notify.sock")})
        if not _wait_mount(res, proc, ready, mnt, mutator):
            return res
        _programs(res, mnt, export, scratch, mutator, seed)
        if not res.counts["hang"]:
            _flock(res, mnt, mutator)
    finally:
        ready.close()
        _stop_server(res, proc, mnt, log)
        res.mutations = len(mutator.mutations)
        dev.stop()
    return res


def _wait_mount(res: SeedResult, proc: subprocess.Popen, ready: socket.socket, mnt: Path,
                mutator: Mutator) -> bool:
    """Wait for the server's READY=1 (sd_notify: the mount is usable) or its exit."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:
        if select.select([ready], [], [], 0.05)[0] and b"READY=1" in ready.recv(4096):
            return True
        if proc.poll() is not None:
            res.add("failed", "mount")  # refused the device; checked for tracebacks later
            if str(mnt) in _mountinfo():
                res.add("wrong", "mount", "vfsdrv mount failed and left the mount behind")
            return False
        if time.monotonic() > deadline:
            res.add("hang", "mount", f"vfsdrv mount neither ready nor failed in "
                    f"{MOUNT_TIMEOUT:.0f} s", mutator.since(0))
            return False


def _judge_program(res: SeedResult, step: str, rc: int | None, out: bytes, err: bytes,
                   want: bytes | None, muts: list[Mutation]) -> None:
    if rc is None:
        res.add("hang", step, f"blocked past {PROGRAM_TIMEOUT:.0f} s", muts)
    elif rc != 0:
        res.add("failed" if b"not connected" in err else "error", step)
    elif want is not None and out != want:
        lies = [m for m in muts if not m.detectable]
        if lies:
            res.add("ok", step)
        else:
            res.add("wrong", step, f"exit 0 with {out[:300]!r}, honest: {want[:300]!r}", muts)
    else:
        res.add("ok", step)


def _programs(res: SeedResult, mnt: Path, export: Path, scratch: Path, mutator: Mutator,
              seed: int) -> None:
    for step, script in PROGRAMS:
        if res.counts["hang"]:
            return  # the stuck program's connection was aborted: the mount is gone
        (scratch / "copy").unlink(missing_ok=True)
        mark = mutator.mark()
        rc, out, err = run_program(["bash", "-o", "pipefail", "-c", script], PROGRAM_TIMEOUT, mnt,
                                   env=program_env(R=str(mnt), T=str(scratch)))
        muts = mutator.since(mark)
        want = None
        if rc == 0:
            (scratch / "copy").unlink(missing_ok=True)
            _hrc, want, _ = run_program(["bash", "-o", "pipefail", "-c", script],
                                        PROGRAM_TIMEOUT, None,
                                        env=program_env(R=str(export), T=str(scratch)))
        _judge_program(res, step, rc, out, err, want, muts)
    if res.counts["hang"]:
        return
    # a write through the mount lands in the export, nowhere else
    token = f"seed {seed} was here\n".encode()
    mark = mutator.mark()
    rc, out, err = run_program(["sh", "-c", 'echo "seed $S was here" > "$R/w" && cat "$R/w"'],
                               PROGRAM_TIMEOUT, mnt, env=program_env(R=str(mnt), S=str(seed)))
    _judge_program(res, "write", rc, out, err, token, mutator.since(mark))
    if rc == 0:
        try:
            held = (export / "w").read_bytes()
        except OSError as exc:
            held = repr(exc).encode()
        if held != token:
            res.add("wrong", "write", f"a write said done; the export holds {held[:200]!r}",
                    mutator.since(mark))


def _flock(res: SeedResult, mnt: Path, mutator: Mutator) -> None:
    """flock(1) waiting for another holder: SETLKW answered "wait", then
    FUSE_NOTIFY_LOCK (whose error the device may have mangled)."""
    mark = mutator.mark()
    holder = subprocess.Popen(["flock", str(mnt / "lockf"), "sleep", "0.5"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, env=program_env())
    time.sleep(0.2)
    rc, out, err = run_program(["flock", str(mnt / "lockf"), "true"], PROGRAM_TIMEOUT, mnt)
    try:
        hrc = holder.wait(PROGRAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(holder.pid, signal.SIGKILL)
        try:
            holder.wait(3)
        except subprocess.TimeoutExpired:
            _abort_fuse(mnt)
            holder.wait(10)
        hrc = None
    muts = mutator.since(mark)
    if hrc is None:
        res.add("hang", "flock-holder", f"blocked past {PROGRAM_TIMEOUT:.0f} s", muts)
    _judge_program(res, "flock", rc, out, err, b"", muts)


def _stop_server(res: SeedResult, proc: subprocess.Popen | None, mnt: Path, log: Path) -> None:
    if str(mnt) in _mountinfo():
        # as a user would: `vfsdrv umount` must return whatever the device did (and
        # must not touch the file system it unmounts, item 4); the server then exits
        rc, _out, err = run_program([sys.executable, "-m", "vfsdrv.tools.cli", "umount",
                                     str(mnt)], UNMOUNT_TIMEOUT, mnt)
        if rc is None:
            res.add("hang", "vfsdrv umount", f"blocked past {UNMOUNT_TIMEOUT:.0f} s")
        elif rc != 0:
            res.add("error", "vfsdrv umount")
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(UNMOUNT_TIMEOUT if str(mnt) not in _mountinfo() else 0.1)
        except subprocess.TimeoutExpired:
            pass
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            res.add("hang", "unmount", f"the server ignored SIGTERM for {UNMOUNT_TIMEOUT:.0f} s")
            _abort_fuse(mnt)
            proc.kill()
            proc.wait()
    _force_unmount(mnt)
    if proc is not None and proc.returncode is not None and proc.returncode < 0 \
            and proc.returncode != -signal.SIGTERM:
        res.add("crash", "server", f"vfsdrv mount died by signal {-proc.returncode}")
    text = log.read_text(errors="replace") if log.exists() else ""
    if "Traceback (most recent call last)" in text:
        res.add("crash", "server", "a Python traceback in the server's log:\n" + text[-3000:])
    for mark in SANITIZER_MARKS:
        if mark in text:
            at = text.index(mark)
            res.add("crash", "server", "sanitizer report:\n" + text[max(0, at - 200):at + 3000])
            break
    if str(mnt) not in _mountinfo():
        try:
            underneath = os.listdir(mnt)
        except OSError as exc:
            res.add("wrong", "unmount", f"the mount point is gone: {exc}")
            return
        if underneath:
            res.add("wrong", "unmount", f"written under the mount point: {underneath[:10]}")


# -- driver --------------------------------------------------------------------------------
KEEP = False  # --keep: leave each seed's directory (export, server log) behind


def run_seed(mode: str, seed: int) -> SeedResult:
    work = Path(tempfile.mkdtemp(prefix=f"fz{mode[0]}{seed}-", dir="/tmp"))
    watchdog = threading.Timer(SEED_WATCHDOG, _stuck, (mode, seed))
    watchdog.daemon = True
    watchdog.start()
    try:
        if mode == "client":
            return run_client_seed(seed, work)
        return run_mount_seed(seed, work)
    finally:
        watchdog.cancel()
        if KEEP:
            print(f"{mode} seed {seed}: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _stuck(mode: str, seed: int) -> None:
    """The fuzzer itself is stuck in a seed (a call without a deadline): say where, exit 3."""
    print(f"FINDING hang seed {seed} ({mode}): the seed ran past {SEED_WATCHDOG:.0f} s; "
          f"stacks follow\n  replay: python tests/fuzz/hostile_fuzz.py --mode {mode} "
          f"--seeds {seed}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":")
            out.extend(range(int(a), int(b)))
        else:
            out.append(int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["client", "mount", "both"], default="both")
    ap.add_argument("--seeds", default="0:20", help="A:B (range), N, or a comma list")
    ap.add_argument("--long", action="store_true",
                    help="run fresh seeds for $VFSDRV_FUZZ_SECONDS (default 14400)")
    ap.add_argument("--seconds", type=float, help="with --long: how long")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep each seed's directory")
    ap.add_argument("--kinds", help="comma list: only these mutations (REPLY_KINDS, "
                    "SESSION_KINDS, NOTIFY_KINDS of tests/fakes/hostile_device.py)")
    ap.add_argument("--rate", type=float, help="chance that a reply is rewritten")
    ap.add_argument("--ring", choices=["split", "packed"], help="the device's ring layout")
    ap.add_argument("-v", "--verbose", action="store_true", help="the driver's warnings too")
    args = ap.parse_args(argv)
    # the driver logs every refused reply: thousands of warnings per run
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL,
                        format="%(threadName)s %(name)s: %(message)s")
    if os.geteuid() != 0 and args.mode != "client":
        print("mount mode needs root", file=sys.stderr)
        return 2
    global KEEP
    KEEP = args.keep
    if args.kinds:
        unknown = (set(args.kinds.split(",")) - set(REPLY_KINDS) - set(SESSION_KINDS)
                   - set(NOTIFY_KINDS))
        if unknown:
            ap.error(f"unknown mutation kinds {sorted(unknown)}")
        FORCED.kinds = args.kinds.split(",")
    FORCED.rate = args.rate
    FORCED.ring = args.ring
    modes = ["client", "mount"] if args.mode == "both" else [args.mode]
    results: list[SeedResult] = []
    started = time.monotonic()
    if args.long:
        budget = args.seconds or float(os.environ.get("VFSDRV_FUZZ_SECONDS", 14400))
        seed = random.SystemRandom().randrange(1 << 30)
        print(f"long run: {budget:.0f} s from seed {seed}", flush=True)
        i = 0
        while time.monotonic() - started < budget:
            mode = modes[0] if len(modes) == 1 else ("mount" if i % 5 == 4 else "client")
            results.append(_one(mode, seed + i, args.quiet))
            i += 1
    else:
        for mode in modes:
            for seed in parse_seeds(args.seeds):
                results.append(_one(mode, seed, args.quiet))
    findings = [f for r in results for f in r.findings]
    totals = Counter(r.outcome for r in results)
    print(f"{len(results)} seeds in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
          + (f"; native core {NATIVE_SO}" if NATIVE_SO else ""), flush=True)
    for f in findings:
        print(f"FINDING {f.outcome} seed {f.seed} ({f.mode}) at {f.step}: {f.detail}\n"
              f"  mutations: {f.mutations}\n  replay: {f.replay()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seeds": [{"seed": r.seed, "mode": r.mode, "outcome": r.outcome,
                       "failed_at": r.failed_at,
                       "counts": dict(r.counts), "mutations": r.mutations} for r in results],
            "findings": [asdict(f) for f in findings],
        }, indent=1))
    return 1 if findings else 0


def _one(mode: str, seed: int, quiet: bool) -> SeedResult:
    t = time.monotonic()
    r = run_seed(mode, seed)
    if not quiet:
        where = f" at {r.failed_at}" if r.failed_at else ""
        print(f"{mode} seed {seed}: {r.outcome}{where} ({dict(r.counts)}, "
              f"{r.mutations} mutations, "
              f"{time.monotonic() - t:.1f} s)", flush=True)
    return r


if __name__ == "__main__":
    threading.current_thread().name = "fuzzer"
    sys.exit(main())
