"""`vfsdrv audit`: the driver's own conformance, seen by the reference device.

    vfsdrv audit [--json] [--request-queues N]

Starts the reference device in auditing mode (docs/audit.rst) on a temporary
directory, runs the driver through a workload over two vhost-user frontends
(bring-up, FUSE_INIT, every FuseClient operation, a blocking lock completed by
FUSE_NOTIFY_LOCK, a FUSE_INTERRUPT of a waiting lock, FORGET and BATCH_FORGET,
FUSE_DESTROY, reset), then through two probes (a device offering a feature bit
the spec leaves undefined; one refusing FEATURES_OK), and prints, for every
driver-normative statement the device can observe, whether it held, was
violated or was not exercised, and how many statements of the checklist
(docs/driver-checklist.rst, items 1-67) were covered.

Exit status: 0 when no MUST statement was violated (SHOULD violations are
warnings), 1 otherwise or when the workload itself failed.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cliargs import int_range
from ..errors import FeatureNegotiationError
from ..fs.client import OFFSET_MAX, ROOT_ID, FuseClient, Lock
from ..fs.device import VirtioFs
from ..refdev import RefDevice
from ..refdev.audit import PROBE_REFUSE_FEATURES_OK, PROBE_UNKNOWN_FEATURE, AuditReport
from ..refdev.vhost_session import MAX_REQUEST_QUEUES
from ..virtio.transport import Transport
from ..virtio.vhost_user import VhostUserTransport

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
WAIT_TIMEOUT = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="run the driver against the reference device in auditing mode",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: {ok, covered, covered_items, checklist_size, "
                   "coverage: {covered, not_observable, not_exercised, checklist_size}, "
                   "violated, warnings, summary, statements: [{id, checklist, section, level, "
                   "statement, result, observed, held, violated}], workload}")
    p.add_argument("--request-queues", type=int_range(1, MAX_REQUEST_QUEUES), default=1,
                   metavar="N",
                   help="request queues the device offers (default 1)")
    p.set_defaults(func=run_audit)


@dataclass
class Workload:
    """What the workload did: every operation and how it ended."""

    ops: list[tuple[str, str]] = field(default_factory=list)  # (name, "ok" or the error)
    failed: list[str] = field(default_factory=list)  # operations that must not fail

    def run(self, name: str, fn: Callable[[], Any], *, may_fail: tuple[int, ...] = ()) -> Any:
        try:
            result = fn()
        except OSError as exc:
            self.ops.append((name, errno.errorcode.get(exc.errno or 0, str(exc))))
            if exc.errno not in may_fail:
                self.failed.append(f"{name}: {exc}")
            return None
        self.ops.append((name, "ok"))
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"operations": [{"op": n, "result": r} for n, r in self.ops],
                "failed": self.failed}


def _pump(clients: list[FuseClient], condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the device did not answer in time")
        for c in clients:
            c.fs.wait(0.02)


def _whole(type_: int) -> Lock:
    return Lock(0, OFFSET_MAX, type_, 0)


def run_workload(socket_path: str, w: Workload | None = None, *,
                 connect: Callable[[str], Transport] | None = None) -> Workload:
    """Drive the device at `socket_path` through every client operation from two
    frontends; the device's export starts empty. `connect` makes the transport of the
    first frontend (default: vhost-user to the socket; e.g. a virtio-pci function whose
    device model forwards to it, to audit the PCI transport too)."""
    w = w or Workload()
    opened: list[VirtioFs] = []
    try:
        for n in range(2):
            t = connect(socket_path) if connect is not None and n == 0 else (
                VhostUserTransport(socket_path))
            fs = VirtioFs(t).start()
            opened.append(fs)
            w.run("FUSE_INIT", fs.init)
        a, b = (FuseClient(fs) for fs in opened)
        _file_ops(a, w)
        _locks(a, b, w)
        _forgets(a, w)
        w.run("DESTROY", b.destroy)
    finally:
        for fs in opened:
            fs.close()
    return w


def _file_ops(c: FuseClient, w: Workload) -> None:
    run = w.run
    d = run("MKDIR", lambda: c.mkdir(ROOT_ID, "dir", 0o755))
    if d is None:
        return
    run("LOOKUP", lambda: c.lookup(ROOT_ID, "dir"))
    run("GETATTR", lambda: c.getattr(d.nodeid))
    created = run("CREATE", lambda: c.create(d.nodeid, "file", 0o644))
    if created is None:
        return
    e, h = created
    data = bytes(range(256)) * 64
    run("WRITE", lambda: c.write(e.nodeid, h.fh, 0, data))
    run("READ", lambda: c.read(e.nodeid, h.fh, 0, len(data)))
    run("SETATTR", lambda: c.setattr(e.nodeid, mode=0o600, size=len(data) * 2, fh=h.fh))
    run("FALLOCATE", lambda: c.fallocate(e.nodeid, h.fh, 0, 1 << 16),
        may_fail=(errno.EOPNOTSUPP,))
    run("LSEEK", lambda: c.lseek(e.nodeid, h.fh, 0, os.SEEK_DATA), may_fail=(errno.ENXIO,))
    run("FSYNC", lambda: c.fsync(e.nodeid, h.fh))
    run("FLUSH", lambda: c.flush(e.nodeid, h.fh))
    copy = run("CREATE", lambda: c.create(d.nodeid, "copy", 0o644))
    if copy is not None:
        e2, h2 = copy
        run("COPY_FILE_RANGE", lambda: c.copy_file_range(e.nodeid, h.fh, 0, e2.nodeid, h2.fh,
                                                         0, 4096))
        run("RELEASE", lambda: c.release(e2.nodeid, h2.fh))
    run("RELEASE", lambda: c.release(e.nodeid, h.fh))
    opened = run("OPEN", lambda: c.open(e.nodeid, os.O_RDWR))
    if opened is not None:
        run("GETATTR(fh)", lambda: c.getattr(e.nodeid, opened.fh))
        run("GETLK", lambda: c.getlk(e.nodeid, opened.fh, 1, _whole(F_WRLCK)))
        run("SETLK", lambda: c.setlk(e.nodeid, opened.fh, 1, Lock(0, 9, F_RDLCK, 0)))
        run("SETLK(flock)", lambda: c.setlk(e.nodeid, opened.fh, 2, _whole(F_WRLCK),
                                            flock=True))
        run("RELEASE", lambda: c.release(e.nodeid, opened.fh))
    # xattrs: the export's file system may not have user xattrs
    nox = (errno.EOPNOTSUPP,)
    run("SETXATTR", lambda: c.setxattr(e.nodeid, "user.audit", b"v"), may_fail=nox)
    if w.ops[-1][1] == "ok":
        run("GETXATTR", lambda: c.getxattr(e.nodeid, "user.audit"))
        run("GETXATTR(size)", lambda: c.getxattr_size(e.nodeid, "user.audit"))
        run("LISTXATTR", lambda: c.listxattr(e.nodeid))
        run("REMOVEXATTR", lambda: c.removexattr(e.nodeid, "user.audit"))
    run("SYMLINK", lambda: c.symlink(d.nodeid, "link", "file"))
    sl = run("LOOKUP", lambda: c.lookup(d.nodeid, "link"))
    if sl is not None:
        run("READLINK", lambda: c.readlink(sl.nodeid))
    run("MKNOD", lambda: c.mknod(d.nodeid, "fifo", stat.S_IFIFO | 0o644))
    run("LINK", lambda: c.link(e.nodeid, d.nodeid, "hard"))
    run("RENAME", lambda: c.rename(d.nodeid, "hard", d.nodeid, "hard2"))
    run("RENAME2", lambda: c.rename(d.nodeid, "hard2", ROOT_ID, "hard3",
                                    flags=1))  # RENAME_NOREPLACE
    run("ACCESS", lambda: c.access(e.nodeid, os.R_OK))
    run("STATFS", lambda: c.statfs())
    dh = run("OPENDIR", lambda: c.opendir(d.nodeid))
    if dh is not None:
        run("READDIR", lambda: c.readdir(d.nodeid, dh.fh))
        run("FSYNCDIR", lambda: c.fsyncdir(d.nodeid, dh.fh))
        run("RELEASEDIR", lambda: c.releasedir(d.nodeid, dh.fh))
    run("READDIRPLUS", lambda: c.readdir_all(d.nodeid, plus=True))
    for name in ("link", "fifo", "file", "copy"):
        run("UNLINK", lambda name=name: c.unlink(d.nodeid, name))
    run("UNLINK", lambda: c.unlink(ROOT_ID, "hard3"))
    run("RMDIR", lambda: c.rmdir(ROOT_ID, "dir"))


def _locks(a: FuseClient, b: FuseClient, w: Workload) -> None:
    """A blocking lock across two frontends completed by FUSE_NOTIFY_LOCK, then a
    waiting lock cancelled by FUSE_INTERRUPT on hiprio."""
    ea, ha = a.create(ROOT_ID, "locked", 0o644)
    eb = b.lookup(ROOT_ID, "locked")
    hb = b.open(eb.nodeid, os.O_RDWR)

    def blocking_lock() -> None:
        a.setlk(ea.nodeid, ha.fh, 1, _whole(F_WRLCK))
        pending = b.setlkw_async(eb.nodeid, hb.fh, 1, _whole(F_WRLCK))
        _pump([b], lambda: b.fs.lock_waiters == 1)  # the "wait" reply came
        a.setlk(ea.nodeid, ha.fh, 1, _whole(F_UNLCK))
        pending.result(WAIT_TIMEOUT)  # granted by FUSE_NOTIFY_LOCK
        b.setlk(eb.nodeid, hb.fh, 1, _whole(F_UNLCK))

    def interrupted_lock() -> None:
        a.setlk(ea.nodeid, ha.fh, 1, _whole(F_WRLCK))
        pending = b.setlkw_async(eb.nodeid, hb.fh, 1, _whole(F_RDLCK))
        _pump([b], lambda: b.fs.lock_waiters == 1)
        b.interrupt(pending.unique)
        try:
            pending.result(WAIT_TIMEOUT)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
        else:
            raise OSError(errno.EPROTO, "interrupted SETLKW was granted")
        a.setlk(ea.nodeid, ha.fh, 1, _whole(F_UNLCK))

    w.run("SETLKW+NOTIFY_LOCK", blocking_lock)
    w.run("SETLKW+INTERRUPT", interrupted_lock)
    w.run("RELEASE", lambda: b.release(eb.nodeid, hb.fh))
    w.run("RELEASE", lambda: a.release(ea.nodeid, ha.fh))


def _forgets(c: FuseClient, w: Workload) -> None:
    e = c.lookup(ROOT_ID, "locked")
    c.lookup(ROOT_ID, "locked")
    w.run("FORGET", lambda: c.forget(e.nodeid, 1))
    w.run("BATCH_FORGET", lambda: c.batch_forget([(e.nodeid, 1)]))
    w.run("GETATTR(root)", lambda: c.getattr(ROOT_ID))  # the hiprio buffers come back


def run_probes(make_device: Callable[..., RefDevice], w: Workload) -> None:
    """The driver against the two auditing probes (devices made by `make_device`)."""
    dev = make_device(PROBE_UNKNOWN_FEATURE)
    fs = VirtioFs(VhostUserTransport(dev.socket_path))
    try:
        w.run("probe unknown-feature: bring-up", fs.start)
        if fs.started:
            w.run("probe unknown-feature: FUSE_INIT", fs.init)
            w.run("probe unknown-feature: GETATTR", lambda: FuseClient(fs).getattr(ROOT_ID))
    finally:
        fs.close()
    dev = make_device(PROBE_REFUSE_FEATURES_OK)
    fs = VirtioFs(VhostUserTransport(dev.socket_path))

    def refused() -> None:
        try:
            fs.start()
        except FeatureNegotiationError:
            return
        raise OSError(errno.EPROTO, "the driver went on although FEATURES_OK was refused")

    try:
        w.run("probe refuse-features-ok: bring-up fails", refused)
    finally:
        fs.close()


def audit_driver(request_queues: int = 1) -> tuple[AuditReport, Workload]:
    """The whole `vfsdrv audit` run: devices, workload, probes, one report."""
    tmp = tempfile.mkdtemp(prefix="vfsdrv-audit-")
    devices: list[RefDevice] = []
    try:
        export = os.path.join(tmp, "export")
        os.mkdir(export)
        dev = RefDevice(os.path.join(tmp, "audit.sock"), export,
                        request_queues=request_queues, audit=True)
        assert dev.auditor is not None
        devices.append(dev)
        dev.start()

        def make_probe(probe: str) -> RefDevice:
            d = RefDevice(os.path.join(tmp, f"probe{len(devices)}.sock"), export,
                          request_queues=request_queues, auditor=dev.auditor,
                          audit_probes={probe})
            devices.append(d)
            d.start()
            return d

        w = run_workload(dev.socket_path)
        run_probes(make_probe, w)
        for d in devices:
            d.wait_sessions_closed()
        return dev.audit_report(), w
    finally:
        _clean_up(devices, tmp)


def _clean_up(devices: list[RefDevice], tmp: str) -> None:
    """Stop every device and remove the scratch directory, even when one stop fails or
    is interrupted (Ctrl-C): what went wrong first is raised once all is done."""
    pending: BaseException | None = None
    for d in devices:
        try:
            d.stop()
        except BaseException as exc:  # re-raised below
            pending = pending or exc
    while True:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            break
        except KeyboardInterrupt as exc:  # a second Ctrl-C: the files still go
            pending = pending or exc
    if pending is not None:
        raise pending


def run_audit(args: argparse.Namespace) -> int:
    import json

    report, workload = audit_driver(args.request_queues)
    if args.json:
        out = report.to_dict()
        out["workload"] = workload.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(report.format_table())
        done = sum(1 for _, r in workload.ops if r == "ok")
        print(f"workload: {done} of {len(workload.ops)} operations succeeded")
        for problem in workload.failed:
            print(f"workload failure: {problem}")
    return 0 if report.ok and not workload.failed else 1
