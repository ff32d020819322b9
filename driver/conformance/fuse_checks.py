"""FUSE-level checks in a live session: the opcodes a device serves or claims, error
paths, many requests in flight per request queue, FORGET storms on hiprio while the
request queues are busy, and the notification queue under load.

They work in a scratch directory the checker creates in the export's root
(`.vfsdrv-check-<pid>`) and removes afterwards; with `--read-only` only what needs no
write runs (the rest is skipped and listed as not exercised).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import DeviceNeedsResetError, RingError, TransportError, VfsdrvError
from ..fs import abi
from ..fs.abi import InitFlag, Opcode
from ..fs.client import OFFSET_MAX, ROOT_ID, FuseClient, Lock
from . import interrupt
from .model import FAIL, PASS, SKIP, Report

if TYPE_CHECKING:
    from ..fs.device import Pending
    from .runner import _ProbeFs

log = logging.getLogger(__name__)

#: opcode -> the FUSE_INIT flag that claims it (0: every device must serve it;
#: None: optional, ENOSYS allowed)
CLAIMS: dict[str, int | None] = {
    "LOOKUP": 0, "GETATTR": 0, "SETATTR": 0, "MKDIR": 0, "RMDIR": 0, "OPEN": 0, "READ": 0,
    "WRITE": 0, "RELEASE": 0, "OPENDIR": 0, "READDIR": 0, "RELEASEDIR": 0, "STATFS": 0,
    "UNLINK": 0, "RENAME": 0, "CREATE": None, "FLUSH": None, "FSYNC": None,
    "FALLOCATE": None, "LSEEK": None, "COPY_FILE_RANGE": None, "SETXATTR": None,
    "GETXATTR": None, "LISTXATTR": None, "REMOVEXATTR": None, "SYMLINK": None,
    "READLINK": None, "MKNOD": None, "LINK": None, "RENAME2": None, "ACCESS": None,
    "FSYNCDIR": None, "GETLK": int(InitFlag.POSIX_LOCKS), "SETLK": int(InitFlag.POSIX_LOCKS),
    "SETLKW": int(InitFlag.POSIX_LOCKS), "SETLK(flock)": int(InitFlag.FLOCK_LOCKS),
    "READDIRPLUS": int(InitFlag.DO_READDIRPLUS),
}
IN_FLIGHT = 16  # requests in flight per request queue
STORM = 64  # FORGETs on hiprio in one storm
STORM_WINDOW = 12  # of them in flight at most
LOCK_WAITERS = 12  # more than the 8 notification buffers check posts


#: what ends the session, not one request: a broken ring, the device gone or asking
#: for a reset (the check that meets it fails; runner.py skips the rest)
SESSION_BROKEN = (RingError, TransportError, DeviceNeedsResetError)


def _errname(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno} (not a Linux errno)")
    return f"{type(exc).__name__}: {exc}"


def _failure(exc: BaseException) -> str:
    """_errname and what the error says (a failed check shows why, not just EPROTO)."""
    if isinstance(exc, OSError) and exc.errno and exc.strerror:
        return f"{_errname(exc)}: {exc.strerror}"
    return _errname(exc)


class Scratch:
    """The scratch directory and what was created in it (for the clean-up)."""

    def __init__(self, client: FuseClient) -> None:
        self.client = client
        self.name = f".vfsdrv-check-{os.getpid()}"
        self.nodeid = 0
        self.names: list[str] = []  # entries created directly in the scratch dir
        self.dirs: list[str] = []  # sub-directories created in it

    def create(self) -> int:
        for n in range(10):
            name = self.name if n == 0 else f"{self.name}-{n}"
            try:
                self.nodeid = self.client.mkdir(ROOT_ID, name, 0o755).nodeid
            except FileExistsError:
                continue
            self.name = name
            return self.nodeid
        raise FileExistsError(errno.EEXIST, f"{self.name}: exists (an earlier check?)")

    def discard(self) -> None:
        """After a failed create(): the MKDIR may still have made the directory (a
        malformed reply to it, a timeout), so remove it by name if it is there, empty."""
        try:
            self.client.rmdir(ROOT_ID, self.name)
        except (VfsdrvError, OSError, TimeoutError) as exc:
            log.debug("no scratch directory %r to remove: %s", self.name, exc)

    def remove(self) -> None:
        try:
            self._empty(self.nodeid, depth=2)
            self.client.rmdir(ROOT_ID, self.name)
        except (VfsdrvError, OSError) as exc:
            log.warning("could not remove the scratch directory %r: %s", self.name, exc)

    def _empty(self, nodeid: int, depth: int) -> None:
        """Remove what directory `nodeid` holds, sub-directories `depth` deep (the
        checks make them one deep; a check interrupted half-way leaves its own)."""
        c = self.client
        for e in c.readdir_all(nodeid):
            if e.name in (b".", b".."):
                continue
            try:
                c.unlink(nodeid, e.name)
            except IsADirectoryError:
                if depth:
                    self._empty(c.lookup(nodeid, e.name).nodeid, depth - 1)
                c.rmdir(nodeid, e.name)


#: opcodes the check sends on what it just made (its scratch directory, a file in it):
#: a file system answers them, an errno is a failure (D86: READ and WRITE)
MUST_SUCCEED = frozenset({"LOOKUP", "GETATTR", "WRITE", "READ", "OPENDIR", "READDIR",
                          "STATFS"})


def _classify(fs: _ProbeFs, name: str, fn: Callable[[], Any], report: Report,
              granted: int) -> tuple[bool, Any]:
    """Run one opcode; record fuse.opcodes[name]. Returns (answered without error, result)."""
    interrupt.checkpoint()  # between two requests: a Ctrl-C stops here
    claim = CLAIMS[name]
    claimed = claim == 0 or (claim is not None and granted & claim)
    bad = fs.stats.get("bad_reply", 0)
    try:
        result = fn()
    except SESSION_BROKEN:
        raise
    except TimeoutError as exc:
        report.add("fuse.opcodes", FAIL, f"no reply: {exc}", instance=name)
        return False, None
    except (OSError, VfsdrvError) as exc:
        if fs.stats.get("bad_reply", 0) > bad:
            report.add("fuse.opcodes", FAIL, f"malformed reply: "
                       f"{fs.last_bad_reply} (the driver answered EIO)",
                       instance=name)
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
            if claimed:
                why = "every FUSE server must serve it" if claim == 0 else (
                    f"claimed by {InitFlag(claim).name} in FUSE_INIT")
                report.add("fuse.opcodes", FAIL, f"ENOSYS, but {why}", instance=name)
            else:
                report.add("fuse.opcodes", PASS, "ENOSYS (optional, not implemented)",
                           instance=name)
        elif name in MUST_SUCCEED:
            report.add("fuse.opcodes", FAIL, f"answered {_errname(exc)}, on what the check "
                       "had just made: a file system serves it", instance=name)
        else:
            report.add("fuse.opcodes", PASS, f"answered {_errname(exc)}", instance=name)
        return False, None
    # "claimed" only when FUSE_INIT granted the flag that claims it
    report.add("fuse.opcodes", PASS, "answered" + (" (claimed in FUSE_INIT)"
                                                   if claim and claimed else ""),
               instance=name)
    return True, result


def _quietly(fn: Callable[[], Any]) -> Any:
    """A request that only prepares or tidies up (its own opcode is checked elsewhere):
    its result, or None when the device refused it."""
    try:
        return fn()
    except SESSION_BROKEN:
        raise
    except (OSError, VfsdrvError, TimeoutError):
        return None


def opcode_checks(fs: _ProbeFs, report: Report, scratch: Scratch) -> None:
    """Every opcode in CLAIMS, in the scratch directory."""
    c = scratch.client
    granted = fs.init_flags
    s = scratch.nodeid
    report.add("fuse.opcodes", PASS, "answered (the scratch directory)", instance="MKDIR")

    def run(name: str, fn: Callable[[], Any]) -> Any:
        return _classify(fs, name, fn, report, granted)[1]

    def ok(name: str, fn: Callable[[], Any]) -> bool:
        return _classify(fs, name, fn, report, granted)[0]

    run("LOOKUP", lambda: c.lookup(ROOT_ID, scratch.name))
    run("GETATTR", lambda: c.getattr(s))
    created = run("CREATE", lambda: c.create(s, "file", 0o644))
    if created is None:  # no CREATE: MKNOD + OPEN, as the kernel does
        made = run("MKNOD", lambda: c.mknod(s, "file", stat.S_IFREG | 0o644))
        if made is None:
            return
        opened = run("OPEN", lambda: c.open(made.nodeid, os.O_RDWR))
        if opened is None:
            return
        e, h = made, opened
    else:
        e, h = created
    scratch.names.append("file")
    data = bytes(range(256)) * 16
    run("WRITE", lambda: c.write(e.nodeid, h.fh, 0, data))
    back = run("READ", lambda: c.read(e.nodeid, h.fh, 0, len(data)))
    if back is not None and back != data:
        report.add("fuse.opcodes", FAIL, f"READ returned {len(back)} bytes that differ from "
                   "what was written", instance="READ(data)")
    run("SETATTR", lambda: c.setattr(e.nodeid, mode=0o640, size=len(data) * 2, fh=h.fh))
    run("FALLOCATE", lambda: c.fallocate(e.nodeid, h.fh, 0, 8192))
    run("LSEEK", lambda: c.lseek(e.nodeid, h.fh, 0, os.SEEK_DATA))
    run("FSYNC", lambda: c.fsync(e.nodeid, h.fh))
    run("FLUSH", lambda: c.flush(e.nodeid, h.fh))
    try:
        copy = c.create(s, "copy", 0o644) if created else None
    except OSError:
        copy = None
    if copy is not None:
        scratch.names.append("copy")
        e2, h2 = copy
        run("COPY_FILE_RANGE", lambda: c.copy_file_range(e.nodeid, h.fh, 0, e2.nodeid, h2.fh,
                                                         0, 4096))
        _quietly(lambda: c.release(e2.nodeid, h2.fh))
    whole = Lock(0, OFFSET_MAX, fcntl.F_WRLCK, os.getpid())
    run("GETLK", lambda: c.getlk(e.nodeid, h.fh, 1, whole))
    run("SETLK", lambda: c.setlk(e.nodeid, h.fh, 1, Lock(0, 9, fcntl.F_RDLCK, os.getpid())))
    run("SETLKW", lambda: c.setlkw(e.nodeid, h.fh, 1, Lock(10, 19, fcntl.F_WRLCK, os.getpid()),
                                   timeout=c.timeout))
    run("SETLK(flock)", lambda: c.setlk(e.nodeid, h.fh, 2, whole, flock=True))
    for owner, flock in ((1, False), (2, True)):
        try:
            c.setlk(e.nodeid, h.fh, owner, Lock(0, OFFSET_MAX, fcntl.F_UNLCK, os.getpid()),
                    flock=flock)
        except OSError:
            pass
    run("RELEASE", lambda: c.release(e.nodeid, h.fh))
    run("SETXATTR", lambda: c.setxattr(e.nodeid, "user.vfsdrv-check", b"v"))
    run("GETXATTR", lambda: c.getxattr(e.nodeid, "user.vfsdrv-check"))
    run("LISTXATTR", lambda: c.listxattr(e.nodeid))
    run("REMOVEXATTR", lambda: c.removexattr(e.nodeid, "user.vfsdrv-check"))
    if run("SYMLINK", lambda: c.symlink(s, "link", "file")) is not None:
        scratch.names.append("link")
        link = _quietly(lambda: c.lookup(s, "link"))
        if link is not None:
            run("READLINK", lambda: c.readlink(link.nodeid))
    if created is not None and run("MKNOD", lambda: c.mknod(s, "fifo", stat.S_IFIFO | 0o644)):
        scratch.names.append("fifo")
    if run("LINK", lambda: c.link(e.nodeid, s, "hard")) is not None:
        scratch.names.append("hard")
        if ok("RENAME", lambda: c.rename(s, "hard", s, "hard2")):
            scratch.names[-1] = "hard2"
            if ok("RENAME2", lambda: c.rename(s, "hard2", s, "hard3", flags=1)):  # NOREPLACE
                scratch.names[-1] = "hard3"
    else:
        run("RENAME", lambda: c.rename(s, "file", s, "file2"))
        run("RENAME2", lambda: c.rename(s, "file2", s, "file", flags=1))
    run("ACCESS", lambda: c.access(e.nodeid, os.R_OK))
    run("STATFS", lambda: c.statfs())
    dh = run("OPENDIR", lambda: c.opendir(s))
    if dh is not None:
        run("READDIR", lambda: c.readdir(s, dh.fh))
        run("FSYNCDIR", lambda: c.fsyncdir(s, dh.fh))
        run("RELEASEDIR", lambda: c.releasedir(s, dh.fh))
    run("READDIRPLUS", lambda: c.readdir_all(s, plus=True))
    try:
        c.mkdir(s, "gone", 0o755)
        run("RMDIR", lambda: c.rmdir(s, "gone"))
    except SESSION_BROKEN:
        raise
    except (OSError, VfsdrvError, TimeoutError) as exc:
        report.add("fuse.opcodes", SKIP, f"MKDIR of a second directory: {_errname(exc)}",
                   instance="RMDIR")
    made_it = _quietly(lambda: c.mknod(s, "unlinkme", stat.S_IFREG | 0o644))
    if made_it is None:
        made = _quietly(lambda: c.create(s, "unlinkme", 0o644))
        if made is not None:
            _quietly(lambda: c.release(made[0].nodeid, made[1].fh))
        else:
            report.add("fuse.opcodes", SKIP, "neither MKNOD nor CREATE made a file to "
                       "unlink", instance="UNLINK")
            return
    if not ok("UNLINK", lambda: c.unlink(s, "unlinkme")):
        scratch.names.append("unlinkme")


def error_checks(fs: _ProbeFs, report: Report, scratch: Scratch | None) -> None:
    """The errno of each error path, and an error reply with no payload (the driver
    turns a payload on an error into EIO and counts it as a bad reply)."""
    c = fs.client()
    parent = scratch.nodeid if scratch else ROOT_ID
    cases: list[tuple[str, Callable[[], Any] | None, str]] = [
        ("ENOENT", lambda: c.lookup(parent, "no-such-entry-vfsdrv"), "LOOKUP of a missing name"),
        ("ENAMETOOLONG", lambda: c.lookup(parent, "n" * 256), "LOOKUP of a 256-byte name"),
    ]
    if scratch is not None:
        s = scratch.nodeid

        def eexist() -> None:
            c.mkdir(s, "dir", 0o755)
            scratch.dirs.append("dir")
            c.mkdir(s, "dir", 0o755)

        def enotempty() -> None:
            if "dir" not in scratch.dirs:
                c.mkdir(s, "dir", 0o755)
                scratch.dirs.append("dir")
            d = c.lookup(s, "dir").nodeid
            c.mknod(d, "inside", stat.S_IFREG | 0o644)
            c.rmdir(s, "dir")

        def ebadf() -> None:
            c.mknod(s, "badf", stat.S_IFREG | 0o644)
            scratch.names.append("badf")
            f = c.lookup(s, "badf")
            c.read(f.nodeid, 0x7BAD_F00D_0000_0001, 0, 4096)

        cases += [("EEXIST", eexist, "MKDIR of an existing directory"),
                  ("ENOTEMPTY", enotempty, "RMDIR of a directory with a file in it"),
                  ("EBADF", ebadf, "READ with a file handle never handed out")]
    else:
        for name in ("EEXIST", "ENOTEMPTY", "EBADF"):
            cases.append((name, None, "needs the scratch directory (--read-only, or it "
                                      "could not be created)"))
    for name, fn, what in cases:
        if fn is None:
            report.add("fuse.errors", SKIP, what, instance=name)
            continue
        if fs.broken is not None:
            raise fs.broken  # the device stopped or broke: the rest is not reached
        want = getattr(errno, name)
        bad = fs.stats.get("bad_reply", 0)
        try:
            fn()
        except OSError as exc:
            if fs.stats.get("bad_reply", 0) > bad:
                report.add("fuse.errors", FAIL,
                           f"{what}: malformed error reply: {fs.last_bad_reply}", instance=name)
            elif exc.errno == want:
                report.add("fuse.errors", PASS, f"{what}: {name}", instance=name)
            else:
                report.add("fuse.errors", FAIL, f"{what}: {_errname(exc)} (expected {name})",
                           instance=name)
        except (TimeoutError, VfsdrvError) as exc:
            report.add("fuse.errors", FAIL, f"{what}: {_failure(exc)}", instance=name)
        else:
            report.add("fuse.errors", FAIL, f"{what}: succeeded (expected {name})",
                       instance=name)


def inflight_checks(fs: _ProbeFs, report: Report, timeout: float) -> None:
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    for qs in fs.request_queues:
        fs.target = qs
        try:
            start = time.monotonic()
            pending = [fs.call_async(Opcode.GETATTR, ROOT_ID, body) for _ in range(IN_FLIGHT)]
            peak = qs.vq.size - qs.vq.num_free
            done = 0
            for p in pending:
                p.result(timeout)
                done += 1
            report.add("queues.inflight", PASS,
                       f"{IN_FLIGHT} GETATTRs ({peak} chains in the ring at once) answered in "
                       f"{(time.monotonic() - start) * 1000:.1f} ms", instance=str(qs.vq.index))
        except (VfsdrvError, OSError, TimeoutError) as exc:
            report.add("queues.inflight", FAIL, _failure(exc), instance=str(qs.vq.index))
        finally:
            fs.target = None


def storm_check(fs: _ProbeFs, report: Report, timeout: float, scratch: Scratch | None) -> None:
    """LOOKUP one entry STORM times, then, with GETATTRs in flight on every request queue,
    FORGET it STORM - 8 times and BATCH_FORGET the rest (8 entries of nlookup 1)."""
    c = fs.client()
    assert fs.hiprio is not None
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    try:
        if scratch is not None:
            nodeid, what = scratch.nodeid, "the scratch directory"
            for _ in range(STORM):
                c.lookup(ROOT_ID, scratch.name)
        else:
            nodeid, what = ROOT_ID, "the root (nlookup 0: no-ops)"
        busy = []
        for qs in fs.request_queues:
            fs.target = qs
            busy += [fs.call_async(Opcode.GETATTR, ROOT_ID, body) for _ in range(4)]
        fs.target = None
        in_flight = sum(1 for p in busy if not p.done)
        start = time.monotonic()
        n = 1 if scratch is not None else 0
        deadline = start + timeout
        for _ in range(STORM - 8):
            # each FORGET holds a request buffer until the device uses it: at most
            # STORM_WINDOW at a time, so that a device that stalls hiprio fails this check
            # within the timeout and leaves the driver buffers for the checks after it
            if not _hiprio_room(fs, deadline):
                break
            fs.call_async(Opcode.FORGET, nodeid, abi.pack("fuse_forget_in", nlookup=n))
        else:
            if _hiprio_room(fs, deadline):
                c.batch_forget([(nodeid, n)] * 8)
        while not fs.hiprio.vq.idle and time.monotonic() < deadline:
            fs.wait(0.02)
        took = time.monotonic() - start
        if not fs.hiprio.vq.idle:
            report.add("hiprio.storm", FAIL, f"{STORM - 8} FORGETs + a BATCH_FORGET of 8 on "
                       f"{what}: not all used within {timeout:g} s")
            return
        left = sum(1 for p in busy if not p.done)
        for p in busy:
            p.result(timeout)
        c.getattr(nodeid)
        report.add("hiprio.storm", PASS, f"{STORM - 8} FORGETs + a BATCH_FORGET of 8 on {what}, "
                   f"sent with {in_flight} GETATTRs in flight on the request queues: all used "
                   f"in {took * 1000:.1f} ms ({left} GETATTRs still unanswered then); the "
                   "device still answers")
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("hiprio.storm", FAIL, _failure(exc))
    finally:
        fs.target = None


def _hiprio_room(fs: _ProbeFs, deadline: float) -> bool:
    """Fewer than STORM_WINDOW hiprio chains in flight (waiting until `deadline`)?"""
    assert fs.hiprio is not None
    while fs.hiprio.vq.in_flight >= STORM_WINDOW:
        if time.monotonic() >= deadline:
            return False
        fs.wait(0.02)
    return True


def notify_load_check(fs: _ProbeFs, report: Report, timeout: float,
                      scratch: Scratch | None, read_only: bool = False) -> None:
    """LOCK_WAITERS owners wait (SETLKW, shared) behind one write lock; its release grants
    them all at once, more FUSE_NOTIFY_LOCKs than notification buffers are posted."""
    if not fs.notification:
        report.add("notify.load", SKIP, "VIRTIO_FS_F_NOTIFICATION not negotiated")
        return
    if not fs.init_flags & InitFlag.POSIX_LOCKS:
        report.add("notify.load", SKIP, "the device did not grant FUSE_POSIX_LOCKS")
        return
    if scratch is None:
        report.add("notify.load", SKIP, "needs a file in a scratch directory ("
                   + ("--read-only" if read_only else "none was made: see MKDIR") + ")")
        return
    c = fs.client()
    pid = os.getpid()
    whole = (0, OFFSET_MAX)
    try:
        e, h = c.create(scratch.nodeid, "lockload", 0o644)
        scratch.names.append("lockload")
        notes = fs.stats["lock_notifications"] + fs.stats["lock_notify_before_reply"]
        c.setlk(e.nodeid, h.fh, 1, Lock(*whole, fcntl.F_WRLCK, pid))
        waiting = [c.setlkw_async(e.nodeid, h.fh, 100 + i, Lock(*whole, fcntl.F_RDLCK, pid))
                   for i in range(LOCK_WAITERS)]
        # a device out of lock resources refuses waiters with ENOLCK (the proposal
        # allows it); any other answer before the release grants a conflicting lock
        refused: list[Pending] = []

        def sort_finished() -> None:
            for p in waiting:
                if p.done and p not in refused:
                    if fs.broken is not None:
                        raise fs.broken
                    if p.completion != -errno.ENOLCK:
                        raise OSError(errno.EPROTO, "a conflicting SETLKW completed (error "
                                      f"{p.completion}) while the write lock was held")
                    refused.append(p)

        deadline = time.monotonic() + timeout
        while fs.lock_waiters + len(refused) < LOCK_WAITERS and time.monotonic() < deadline:
            sort_finished()
            fs.wait(0.02)
        sort_finished()  # those answered in the last wait
        parked = fs.lock_waiters
        start = time.monotonic()
        c.setlk(e.nodeid, h.fh, 1, Lock(*whole, fcntl.F_UNLCK, pid))
        for p in waiting:
            if p not in refused:
                p.result(timeout)
        took = time.monotonic() - start
        got = fs.stats["lock_notifications"] + fs.stats["lock_notify_before_reply"] - notes
        bufs = fs.notify_buffers
        granted = LOCK_WAITERS - len(refused)
        desc = (f"{LOCK_WAITERS} SETLKW waiters ({parked} parked on \"wait\""
                + (f", {len(refused)} refused with ENOLCK" if refused else "")
                + f"), one release: {got} FUSE_NOTIFY_LOCK through {bufs} notification "
                f"buffers in {took * 1000:.1f} ms")
        if got < granted:
            report.add("notify.load", FAIL, desc + " (some grants came without a notification)")
        elif granted <= bufs:
            report.add("notify.load", SKIP, desc + ": the device parks no more waiters than "
                       "there are buffers, so their replenishing was not exercised")
        else:
            report.add("notify.load", PASS, desc)
        for i in range(LOCK_WAITERS):
            c.setlk(e.nodeid, h.fh, 100 + i, Lock(*whole, fcntl.F_UNLCK, pid))
        c.release(e.nodeid, h.fh)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("notify.load", FAIL, _failure(exc))
