"""`vfsdrv demo`: the driver end to end on the embedded default, no VM.

Starts Debian's virtiofsd on a temporary directory, brings the device up over
vhost-user through vfsdrv (features, queues, FUSE_INIT) and drives it with the
typed client: list, read, write, rename, xattr. Then mounts a second virtiofsd
instance of the same directory with `vfsdrv mount` (the relay frontend) and lets
ordinary programs (ls, cat, cp, sha256sum, df) use it, checks every result on the
host side, and unmounts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..frontends.fuse_dev import is_mount_point, mount_table, umount
from ..fs.client import ROOT_ID, FuseClient
from ..fs.config import encode_config
from ..fs.device import VirtioFs
from ..virtio.constants import feature_names
from ..virtio.vhost_user import VhostUserTransport
from .backends import BACKENDS, DEFAULT_BACKEND, Backend, check_available


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="drive a local virtiofsd through vfsdrv and show it working",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="the device: Debian 12's C virtiofsd (default), Debian 13's Rust "
                   "virtiofsd (fetched by: .venv/bin/python -m vfsdrv.tools.virtiofsd_rs) or "
                   "the reference device")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        from ..errors import VfsdrvError

        raise VfsdrvError("demo needs root: the backend writes its pid file under /run and "
                          "the mount needs /dev/fuse (run it with sudo)")
    teardown = _Teardown(keep=args.keep)
    status = 1
    try:
        teardown.catch_signals()
        with _signals_blocked():  # a signal right after: the teardown knows the directory
            teardown.work = Path(tempfile.mkdtemp(prefix="vfsdrv-demo-"))
        status = _demo(args, teardown)
    except _Stopped:
        pass  # the teardown knows the signal: the exit status says it
    finally:  # Ctrl-C, SIGTERM, SIGHUP and failures too: nothing left mounted or
        # running, no temporary directory left behind
        teardown.finish()  # from its start a signal is noted, not raised
    if teardown.signum is not None:
        print(f"demo: stopped by {signal.Signals(teardown.signum).name}", file=sys.stderr)
        return 128 + teardown.signum
    return status


def _demo(args: argparse.Namespace, teardown: _Teardown) -> int:
    work = teardown.work
    assert work is not None
    check_available(args.backend)  # before anything is created: says how to get it
    src = work / "export"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host\n")
    (src / "data.bin").write_bytes(os.urandom(3 << 20))
    (src / "docs").mkdir()
    step = _Printer()
    with Backend(args.backend, src, work / "backend.sock", tag="demo") as backend:
        step(f"{backend.name} (pid {backend.proc.pid}) exports {src}")
        transport = VhostUserTransport(str(backend.socket_path),
                                       config=encode_config("demo", 1), num_queues=2)
        fs = VirtioFs(transport).start()
        try:
            step(f"device up over {transport.name}: features "
                 f"{feature_names(fs.dev.features, {30: 'VHOST_USER_PROTOCOL_FEATURES'})}; "
                 f"tag {fs.config.tag!r}; "
                 f"{len(fs.request_queues)} request queue(s) of {fs.request_queues[0].vq.size}")
            c = FuseClient(fs)
            out = c.init()
            step(f"FUSE_INIT: protocol 7.{fs.minor}, max_write {fs.max_write}, "
                 f"flags {out.flags:#x}")
            names = sorted(d.name.decode() for d in c.readdir_all(ROOT_ID)
                           if d.name not in (b".", b".."))
            step(f"readdir /: {names}")
            e = c.lookup(ROOT_ID, "hello.txt")
            h = c.open(e.nodeid)
            text = c.read(e.nodeid, h.fh, 0, 4096)
            c.release(e.nodeid, h.fh)
            step(f"read hello.txt: {text!r}")
            big = c.lookup(ROOT_ID, "data.bin")
            h = c.open(big.nodeid)
            t0 = time.perf_counter()
            digest = hashlib.sha256()
            off = 0
            while chunk := c.read(big.nodeid, h.fh, off, 1 << 20):
                digest.update(chunk)
                off += len(chunk)
            dt = time.perf_counter() - t0
            c.release(big.nodeid, h.fh)
            same = digest.hexdigest() == hashlib.sha256((src / "data.bin").read_bytes()).hexdigest()
            step(f"read data.bin: {off} bytes in {dt * 1e3:.1f} ms, sha256 matches host: {same}")
            docs = c.lookup(ROOT_ID, "docs")
            ne, nh = c.create(docs.nodeid, "note.txt", 0o644)
            c.write(ne.nodeid, nh.fh, 0, b"written through vfsdrv\n")
            c.release(ne.nodeid, nh.fh)
            c.setxattr(ne.nodeid, "user.origin", b"vfsdrv")
            c.lookup(docs.nodeid, "note.txt")
            c.rename(docs.nodeid, "note.txt", ROOT_ID, "note.txt")
            host_text = (src / "note.txt").read_text()
            step(f"created docs/note.txt, renamed to /note.txt; host sees {host_text!r} "
                 f"with user.origin={os.getxattr(src / 'note.txt', 'user.origin')!r}")
            st = c.statfs()
            step(f"statfs: {st.blocks * st.frsize >> 20} MiB, {st.bavail * st.frsize >> 20} MiB "
                 "available")
            c.destroy()
            ok = same and host_text == "written through vfsdrv\n"
        finally:
            fs.close()
    # not `with`: interrupted, the teardown stops it after the unmount, not before
    backend = Backend(args.backend, src, work / "backend-mount.sock", tag="demo")
    ok = _mounted_part(step, src, work, backend.socket_path) and ok
    backend.stop()
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def _call(*cmd: str, capture: bool = False, timeout: float | None = None) -> str:
    """Run `cmd` in a session of its own: a terminal's Ctrl-C reaches the demo alone,
    which then stops it (SIGTERM, SIGKILL after 10 s) and takes everything down in
    order (unmount, then the backend). CalledProcessError if it fails."""
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    try:
        out, _err = proc.communicate(timeout=timeout)
    except BaseException:  # a signal or the timeout: it does not outlive the call
        _terminate(proc)
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    return out or ""


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()  # `vfsdrv mount` stops the server it is setting up
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def _run(step: _Printer, *cmd: str) -> str:
    out = _call(*cmd, capture=True)
    step("\n".join([f"$ {' '.join(cmd)}", *(f"          {line}" for line in out.splitlines())]))
    return out


def _mounted_part(step: _Printer, src: Path, work: Path, sock: Path) -> bool:
    """The same directory as a real mount: ordinary programs through the relay."""
    mnt = work / "mnt"
    mnt.mkdir()
    # interrupted from here on, the teardown unmounts (the mount may be up already)
    _call(*VFSDRV, "mount", "--vhost-user", str(sock), "--tag", "demo", str(mnt))
    _run(step, "findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", str(mnt))
    _run(step, "ls", "-l", str(mnt))
    _run(step, "cat", str(mnt / "hello.txt"))
    (work / "upload.bin").write_bytes(os.urandom(5 << 20))
    _run(step, "cp", str(work / "upload.bin"), str(mnt / "upload.bin"))
    sums = _run(step, "sha256sum", str(mnt / "upload.bin"), str(mnt / "data.bin"))
    host = [hashlib.sha256((src / n).read_bytes()).hexdigest() for n in
            ("upload.bin", "data.bin")]
    same = [line.split()[0] for line in sums.splitlines()] == host
    step(f"checksums through the mount match the host's files: {same}")
    _run(step, "df", "-h", str(mnt))
    _unmount(mnt)
    mounted = _is_mounted(mnt)
    step(f"unmounted: {not mounted}")
    return same and not mounted


VFSDRV = (sys.executable, "-m", "vfsdrv.tools.cli")

#: the signals that stop the demo: Ctrl-C, kill/timeout(1)/systemd, a closed terminal
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(KeyboardInterrupt):
    """One of _SIGNALS: the demo unwinds as for Ctrl-C and exits 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """_SIGNALS wait (pending) until the end of the block: a step of the teardown is
    not cut short. What is started inside inherits the mask (none stops a command
    that has a timeout: SIGKILL)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_mounted(path: Path) -> bool:
    return is_mount_point(str(path), resolved=True)  # the mount table only: no stat


def _mounted_under(work: Path) -> list[str]:
    return [m for m, _type, _source in mount_table() if m.startswith(f"{work}/")]


def _unmount(mnt: Path) -> None:
    """Unmount `mnt` if it is mounted, whatever signal comes meanwhile: `vfsdrv umount`
    (its server then exits), then the server's own stop (a busy mount: written back,
    then detached), then detached here. Bounded: about 70 s at the very worst."""
    with _signals_blocked():
        if not _is_mounted(mnt):
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _call(*VFSDRV, "umount", str(mnt), timeout=20)
        if _is_mounted(mnt):
            servers = [pid for pid, argv in _children().items() if str(mnt) in argv]
            for pid in servers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40  # a busy mount: syncfs for up to 30 s
            while _is_mounted(mnt) and time.monotonic() < deadline and \
                    any(pid in _children() for pid in servers):
                _reap()
                time.sleep(0.02)
        if _is_mounted(mnt):
            with contextlib.suppress(OSError):
                umount(str(mnt), lazy=True)  # in the demo's own directory


def _children() -> dict[int, str]:
    """This process's children still running: pid -> command line. The demo is their
    subreaper: what they leave behind (the mount's server, a virtiofsd's fork) is a
    child too."""
    me = str(os.getpid())
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if fields[1] != me or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _reap() -> None:
    """Collect the children that have exited (Popen's own ones say ECHILD: fine)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, ctypes.c_ulong(int(on)), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class _Teardown:
    """Everything the demo leaves is taken down here, whatever the moment of a signal
    (SIGINT, SIGTERM, SIGHUP) and however many come: in order (unmount, then the
    processes, then the directory), with the signals held off, each step bounded."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.work: Path | None = None
        #: the first signal received; the exit status is 128 + it
        self.signum: int | None = None
        #: set when the teardown starts: a signal then is noted, no longer raised
        self.finishing = False
        self._handlers: dict[int, Any] = {}

    def catch_signals(self) -> None:
        _subreaper(True)
        for sig in _SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup: stays ignored
                self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.finishing:
                raise _Stopped(signum)
        # a second signal: the unwinding (or the teardown) the first one started goes on

    def finish(self) -> None:
        self.finishing = True
        with _signals_blocked():
            for step in (self._unmount, self._stop_children, self._unmount, self._remove):
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - the next steps run all the same
                    print(f"demo: cleaning up: {exc}", file=sys.stderr)
        # the signals held off arrived as the block ended: noted by _on_signal
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        _subreaper(False)

    def _unmount(self) -> None:
        if self.work is not None:
            _unmount(self.work / "mnt")

    def _stop_children(self) -> None:
        """The mount's server exits once unmounted, a virtiofsd once its connection is
        closed: SIGTERM to what is left, SIGKILL 5 s later."""
        start = time.monotonic()
        termed: set[int] = set()
        while True:
            _reap()
            children = _children()
            if not children:
                return
            late = time.monotonic() - start
            if late > 10:  # unkillable (stuck in the kernel): say so, go on
                raise RuntimeError(f"still running: {sorted(children.values())}")
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    if late > 5:
                        os.kill(pid, signal.SIGKILL)
                    elif pid not in termed:
                        os.kill(pid, signal.SIGTERM)
                        termed.add(pid)
            time.sleep(0.01)

    def _remove(self) -> None:
        if self.work is None:
            return
        if self.keep:
            print(f"kept {self.work} (--keep)", file=sys.stderr)
            return
        if mounted := _mounted_under(self.work):  # never removed through a mount
            raise RuntimeError(f"{self.work} kept: {', '.join(mounted)} still mounted")
        shutil.rmtree(self.work, ignore_errors=True)


class _Printer:
    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.n += 1
        print(f"[{self.n:2d}] {time.perf_counter() - self.t0:6.3f}s  {msg}", flush=True)
