"""`vfsdrv status [--json]`: every running vfsdrv mount, as its server sees it.

Each mount server listens on a control socket, /run/vfsdrv/mounts/PID.sock
(directory 0700, socket 0600, peers other than root refused by SO_PEERCRED). A
client connects and reads one JSON object: mountpoint, source, pid, frontend and
whatever figures the server's figure function returns (device, transport,
negotiated features, queues with requests served and in flight, errors,
notifications, lock waiters, uptime). A socket whose server is gone is removed.
A vfsdrv mount in the mount table whose server is gone (killed, or ended by a
failed device) is listed too, as unserved: it answers ENOTCONN until it is
unmounted; a server that ended because its device failed left why in
mounts/ended-HASH.json (its mount point's), shown with it. A server that does not answer
(stopped, stuck) is listed with an error and its mount (from PID.json beside its
socket), not as unserved; one unmounted lazily but still serving says it is
"detached".

    vfsdrv status            one block per mount, then a line per unserved mount
    vfsdrv status --json     {"mounts": [{"mountpoint": ..., ...}, ...],
                              "unserved": [{"mountpoint": ..., "source": ...}, ...],
                              "unlisted": [...]}  (served, status socket not reachable)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import os
import shlex
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: how long a client waits for one server's answer
CLIENT_TIMEOUT = 5.0
#: what PID.json beside a server's socket says of its mount
IDENTITY = ("mountpoint", "source", "pid", "frontend")
_UCRED = struct.Struct("iII")  # pid, uid, gid


def run_dir() -> Path:
    """/run/vfsdrv, or $VFSDRV_STATE_DIR (tests, non-standard layouts)."""
    # absolute: a background server leaves its working directory for /
    return Path(os.path.abspath(os.environ.get("VFSDRV_STATE_DIR", "/run/vfsdrv")))


def sockets_dir() -> Path:
    return run_dir() / "mounts"


def _made(d: Path) -> Path:
    """The servers' directory, made root's alone (0700) if it was not already."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


class StatusServer:
    """The control socket of one mount server: answers every connection with
    `figures()` as JSON, from a daemon thread (the serving loop is never involved
    beyond the figure function reading its counters)."""

    def __init__(self, figures: Callable[[], dict[str, Any]], path: Path | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        self.figures = figures
        self.identity = identity  # IDENTITY's keys: else taken from a first snapshot
        self.path = path or sockets_dir() / f"{os.getpid()}.sock"
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> StatusServer:
        _made(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a previous server of this pid is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        self.sock = sock
        self._write_identity()
        self._thread = threading.Thread(target=self._serve, name="vfsdrv-status", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                try:
                    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                    _pid, uid, _gid = _UCRED.unpack(cred)
                    if uid != 0:
                        conn.sendall(b'{"error": "root only"}\n')
                        continue
                    conn.sendall(json.dumps(self.snapshot()).encode() + b"\n")
                except OSError:
                    pass

    def _write_identity(self) -> None:
        """PID.json beside the socket: which mount this is, for a client whose question
        the server does not answer (stopped, stuck), so that it is not taken for a
        mount nobody serves."""
        try:
            first = self.identity if self.identity is not None else self.snapshot()
            ident = {k: first[k] for k in IDENTITY if k in first}
            old = os.umask(0o177)
            try:
                _identity_path(self.path).write_text(json.dumps(ident) + "\n")
            finally:
                os.umask(old)
        except Exception as exc:  # noqa: BLE001 - status is an aid: serving goes on
            log.debug("no status identity file: %s", exc)

    def snapshot(self) -> dict[str, Any]:
        # the serving thread may add a counter while this one copies: retry
        for _ in range(5):
            try:
                return self.figures()
            except RuntimeError:
                time.sleep(0.001)
        return {"error": "figures changed too fast to read"}

    def stop(self) -> None:
        self._stopping = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        for path in (self.path, _identity_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._thread is not None:
            self._thread.join(2)

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- client --------------------------------------------------------------------------------
def query(path: Path, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any] | None:
    """One server's figures; None (and the socket removed) when its server is gone."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionRefusedError, FileNotFoundError):
        pid = _pid_of(path)
        if pid is not None and not _alive(pid):
            _forget(path)
        return None
    except TimeoutError:
        return {**_identity(path), "pid": _pid_of(path),
                "error": f"no answer within {timeout:g} s: the server is there but does not "
                         "answer (stopped, or stuck); its mount waits, it does not fail"}
    finally:
        s.close()
    try:
        return json.loads(data)
    except ValueError:
        return {"error": "unreadable answer", "pid": _pid_of(path)}


def _identity_path(sock: Path) -> Path:
    return sock.with_suffix(".json")


def _identity(sock: Path) -> dict[str, Any]:
    try:
        ident = json.loads(_identity_path(sock).read_text())
    except (OSError, ValueError):
        return {}
    return {k: ident[k] for k in IDENTITY if isinstance(ident, dict) and k in ident}


def _pid_of(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def forget_dead() -> None:
    """Remove the status socket and identity file of every server that is gone
    (killed: it could not remove them itself): its pid is not running here and
    nothing listens on its socket (a server in another pid namespace that shares
    this directory still answers)."""
    with contextlib.suppress(OSError):
        for sock in sockets_dir().glob("*.sock"):
            pid = _pid_of(sock)
            if pid is not None and not _alive(pid) and not _listening(sock):
                _forget(sock)
        for ident in sockets_dir().glob("*.json"):  # its socket already gone
            pid = _pid_of(ident)
            if pid is not None and not ident.with_suffix(".sock").exists() \
                    and not _alive(pid):
                with contextlib.suppress(OSError):
                    ident.unlink()


def _forget(sock: Path) -> None:
    """A gone server's status socket and identity file."""
    for path in (sock, _identity_path(sock)):
        with contextlib.suppress(OSError):
            path.unlink()


def _listening(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(CLIENT_TIMEOUT)
    try:
        s.connect(str(sock))
    except OSError:
        return False
    finally:
        s.close()
    return True


def collect() -> list[dict[str, Any]]:
    d = sockets_dir()
    forget_dead()
    try:
        paths = sorted(d.glob("*.sock"))
    except OSError:
        return []
    if not paths:
        return []
    # side by side: a stuck server costs its CLIENT_TIMEOUT once, not once per server
    with concurrent.futures.ThreadPoolExecutor(min(len(paths), 16)) as pool:
        answers = list(pool.map(query, paths))
    # "detached" (unmounted lazily, served on for what still uses it) is the server's
    # own word: it knows its mount, also in a mount namespace of its own
    out = [m for m in answers if m is not None]
    return sorted(out, key=lambda m: str(m.get("mountpoint", "")))


def _mount_table() -> list[tuple[str, str, str]]:
    from ..frontends.fuse_dev import mount_table

    return mount_table()


def _ending_path(mountpoint: str) -> Path:
    digest = hashlib.sha256(mountpoint.encode(errors="surrogateescape")).hexdigest()[:16]
    return sockets_dir() / f"ended-{digest}.json"


def record_ending(mountpoint: str, source: str, why: str) -> None:
    """A server leaving its mount behind (the device failed: the mount answers
    ENOTCONN) says why, for `vfsdrv status` to show with the unserved mount."""
    try:
        _made(sockets_dir())
        _ending_path(mountpoint).write_text(json.dumps(
            {"mountpoint": mountpoint, "source": source, "why": why,
             "ended": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    except OSError as exc:
        log.debug("no record of why %s ended: %s", mountpoint, exc)


def forget_ending(mountpoint: str) -> None:
    """A new mount on `mountpoint`, or its unmount: an old record no longer says why."""
    with contextlib.suppress(OSError):
        _ending_path(mountpoint).unlink(missing_ok=True)


def _ending(mountpoint: str, source: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(_ending_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("mountpoint") != mountpoint \
            or rec.get("source") != source:
        return None
    return rec


#: how long `status` waits for a mount without a status socket to answer statfs
ANSWER_TIMEOUT = 1.0


def _answers(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> bool | None:
    """Whether the mount's FUSE server answers: True (statfs answered: a server of its
    own, whatever its state directory), False (ENOTCONN/ECONNABORTED: no server, or
    the mount point is not there), None (no answer within `timeout`: a server that
    hangs). statfs is never answered from the kernel's caches. The look runs in a
    daemon thread, so a hung server cannot hold `status` up."""
    result: list[bool] = []

    def look() -> None:
        try:
            os.statvfs(mountpoint)
            result.append(True)
        except OSError as exc:
            result.append(exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT,
                                            errno.ENOTDIR))

    t = threading.Thread(target=look, name="vfsdrv-status-look", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def unserved(live: list[dict[str, Any]],
             unlisted: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """vfsdrv mounts in the mount table that no running server answers for (its
    server died or was killed): they answer ENOTCONN until they are unmounted. Each
    says why its server ended when that server could say it ("why", "ended"); one
    whose server hangs says so ("answers": false). A mount served by a server this
    status cannot reach (another VFSDRV_STATE_DIR, a status socket it could not
    make) goes to `unlisted` instead. Records of mounts no longer there are removed."""
    from ..frontends.fuse_dev import FS_SUBTYPE

    served = {str(m.get("mountpoint")) for m in live}
    try:
        table = _mount_table()
    except OSError:
        return []
    out = []
    present = {mp for mp, _fstype, _source in table}
    for mp, fstype, source in table:
        if fstype != f"fuse.{FS_SUBTYPE}" or mp in served:
            continue
        entry: dict[str, Any] = {"mountpoint": mp, "source": source}
        answers = _answers(mp)
        if answers:
            if unlisted is not None:
                unlisted.append(entry)
            continue
        if answers is None:
            entry["answers"] = False
        rec = _ending(mp, source)
        if rec is not None:
            entry.update(why=rec.get("why"), ended=rec.get("ended"))
        out.append(entry)
    # a record whose mount point holds no mount any more is old news (one whose mount
    # is still served may be its server's last words, written on its way out)
    keep = {_ending_path(mp).name for mp in present}
    with contextlib.suppress(OSError):
        for path in sockets_dir().glob("ended-*.json"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
    return out


def _shown(value: object) -> str:
    """A path or source on one line: control characters (a newline in a mount point)
    as octal escapes, as the mount table writes them."""
    return "".join(c if c.isprintable() else f"\\{ord(c):03o}" for c in str(value))


def format_mount(m: dict[str, Any]) -> str:
    lines = [f"{_shown(m.get('mountpoint', '?'))}: {_shown(m.get('source', '?'))} "
             f"(pid {m.get('pid', '?')})"]
    if m.get("stopping_in") is not None:
        lines[0] += (f" stopping (asked by a signal): {'detached, ' if m.get('detached') else ''}"
                     f"served at most {m['stopping_in']:g} s more")
    elif m.get("detached"):
        lines[0] += " detached: unmounted lazily, served until its last user is done"
    if "error" in m:
        lines.append(f"  error: {m['error']}")
    for key in ("device", "transport", "frontend"):
        if key in m:
            lines.append(f"  {key}: {m[key]}")
    if m.get("features"):
        lines.append(f"  features: {', '.join(m['features'])}")
    for q in m.get("queues", []):
        figures = ", ".join(f"{k} {_word(v)}" for k, v in q.items() if k != "name")
        lines.append(f"  queue {q.get('name', '?')}: {figures}")
    labels = {"notifications": "notifications forwarded to the kernel"}
    for key in ("served", "in_flight", "errors", "notifications", "lock_waiters"):
        if key in m:
            lines.append(f"  {labels.get(key, key.replace('_', ' '))}: {m[key]}")
    if "request_timeout" in m:
        lines.append(f"  request timeout: {m['request_timeout']:g} s")
    if "uptime" in m:
        lines.append(f"  uptime: {m['uptime']:.0f} s")
    return "\n".join(lines)


def _word(value: object) -> str:
    """A figure as a person reads it (yes/no, not Python's True/False)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="running vfsdrv mounts: device, queues, counters",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true",
                   help='one JSON object {"mounts": [...], "unserved": [...], '
                   '"unlisted": [...]}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        from ..errors import VfsdrvError

        raise VfsdrvError("status needs root (the control sockets are root's)")
    mounts = collect()
    unlisted: list[dict[str, Any]] = []
    orphans = unserved(mounts, unlisted)
    if args.json:
        print(json.dumps({"mounts": mounts, "unserved": orphans, "unlisted": unlisted},
                         indent=2))
        return 0
    if not mounts and not orphans and not unlisted:
        print("no vfsdrv mounts are running")
    if mounts:
        print("\n".join(format_mount(m) for m in mounts))
    for m in unlisted:
        print(f"{_shown(m['mountpoint'])}: {_shown(m['source'])} (served, by a server whose "
              f"status socket is not in {_shown(str(sockets_dir()))}: started with another "
              "VFSDRV_STATE_DIR, or it could not make its socket; no figures)")
    for m in orphans:
        umount = f"vfsdrv umount {_shown(shlex.quote(m['mountpoint']))}"
        if m.get("answers") is False:
            print(f"{_shown(m['mountpoint'])}: {_shown(m['source'])} (no status socket, and "
                  f"its server does not answer within {ANSWER_TIMEOUT:g} s; {umount} "
                  "removes it)")
            continue
        why = f" ({_shown(m['why'])}, {m.get('ended')})" if m.get("why") else ""
        print(f"{_shown(m['mountpoint'])}: {_shown(m['source'])} (no server{why}: it "
              f"answers ENOTCONN until unmounted; {umount})")
    return 0
