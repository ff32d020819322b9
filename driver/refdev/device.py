"""The reference device: a listening vhost-user socket serving a host directory.

Every frontend that connects gets its own session (memory, queues, FUSE session);
all sessions share one lock table, so two mounts of the device see each other's
locks as two guests of one device would.
"""

from __future__ import annotations

import fcntl
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable

from ..errors import VfsdrvError
from ..fs.abi import DEFAULT_NOTIFY_LOCK_CODE
from .audit import Auditor, AuditReport
from .iotlb import IotlbSession
from .lock_table import LockTable
from .vhost_session import DeviceConfig, VhostUserSession

log = logging.getLogger(__name__)

#: Builds a frontend's session; called with VhostUserSession's arguments (socket,
#: config, session id, lock table, on_exit, auditor).
SessionFactory = Callable[
    [socket.socket, DeviceConfig, int, LockTable, Callable[[VhostUserSession], None],
     Auditor | None],
    VhostUserSession,
]


class SocketError(VfsdrvError):
    """The socket cannot be ours: another live device serves it, the path is not a
    socket, or it cannot be bound (missing directory, too long, no permission)."""


def _claim(socket_path: str) -> int:
    """Lock `<socket>.lock` for this device's life (as virtiofsd locks its pid file):
    a second device on the same path fails here instead of taking the socket over.
    Returns the locked descriptor; SocketError if another device holds it."""
    directory = os.path.dirname(os.path.abspath(socket_path))
    if not os.path.isdir(directory):
        raise SocketError(f"directory {directory!r} of socket {socket_path!r} does not exist")
    lock_path = socket_path + ".lock"
    for _ in range(10):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise SocketError(f"cannot create the lock {lock_path!r}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SocketError(
                f"socket {socket_path!r} is served by another device (pid {holder}, "
                f"lock {lock_path!r})"
            ) from None
        # the previous owner may have removed the file between our open and our lock
        try:
            same = os.path.samestat(os.stat(lock_path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise SocketError(f"cannot take the lock {lock_path!r}: it keeps being replaced")


def _remove_stale_socket(socket_path: str) -> None:
    """Remove a socket left by a device that died (we hold the lock, so no live
    device owns it); anything that is not a socket is the user's and stays."""
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{socket_path!r} exists and is not a socket: not replacing it")
    os.unlink(socket_path)


class RefDevice:
    def __init__(
        self,
        socket_path: str,
        source_dir: str,
        tag: str = "refdev",
        request_queues: int = 1,
        notify_buf_size: int = 64,
        max_waiting_locks: int = 64,
        notification: bool = True,
        notify_lock_code: int = DEFAULT_NOTIFY_LOCK_CODE,
        audit: bool = False,
        audit_probes: frozenset[str] | set[str] = frozenset(),
        auditor: Auditor | None = None,
        ring: str | None = None,
        access_platform: bool = False,
        session_factory: SessionFactory | None = None,
    ) -> None:
        """`audit`: auditing mode (docs/audit.rst): offer the STATUS protocol feature
        and check every driver-normative statement observable here; see audit_report().
        `audit_probes`: deliberate departures to test the driver (audit.PROBES).
        `auditor`: record into this one (several devices, one report); implies audit.
        `access_platform`: offer VIRTIO_F_ACCESS_PLATFORM; a driver that accepts it
        passes IOVAs, translated through the IOTLB its frontend fills (refdev/iotlb.py).
        `session_factory`: builds each frontend's session (a test device's own session
        class); default VhostUserSession, IotlbSession with access_platform."""
        if not os.path.isdir(source_dir):
            raise ValueError(f"source {source_dir!r} is not a directory")
        if max_waiting_locks < 0:
            raise ValueError("max_waiting_locks must be >= 0")
        self.socket_path = socket_path
        self.config = DeviceConfig(
            source=os.path.abspath(source_dir),
            tag=tag,
            request_queues=request_queues,
            notify_buf_size=notify_buf_size,
            notification=notification,
            notify_lock_code=notify_lock_code,
            ring=ring,
        )
        self.locks = LockTable(max_waiting_locks)
        audit = audit or bool(audit_probes)  # a probe is a departure of auditing mode
        if access_platform and (audit or auditor is not None):
            # the auditor reads rings by guest-physical address
            raise ValueError("auditing mode does not combine with access_platform")
        if ring == "packed" and (audit or auditor is not None):
            # auditing mode offers split rings only: no driver could use the device
            raise ValueError("auditing mode offers split rings only: it does not combine "
                             "with ring='packed' (--ring packed)")
        self.access_platform = access_platform
        if session_factory is None:
            session_factory = IotlbSession if access_platform else VhostUserSession
        self._session_factory = session_factory
        if auditor is None and audit:
            auditor = Auditor(audit_probes)
        elif auditor is not None and audit_probes:
            auditor = auditor.with_probes(audit_probes)
        self.auditor = auditor
        self.sessions: list[VhostUserSession] = []
        self._mutex = threading.Lock()
        self._next_session = 1
        self._listener: socket.socket | None = None
        self._lock_fd = -1
        self._stop_fd = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RefDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen on the socket and accept frontends in a background thread.

        SocketError if another device serves the path, the path is not a socket
        or its directory is missing."""
        lock_fd = _claim(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(self.socket_path)
            listener.bind(self.socket_path)
            listener.listen(8)
        except BaseException as exc:
            listener.close()
            self._release_claim(lock_fd)
            if isinstance(exc, OSError):
                raise SocketError(f"cannot listen on {self.socket_path!r}: {exc}") from exc
            raise
        self._lock_fd = lock_fd
        self._listener = listener
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._accept_loop, name="refdev-accept")
        self._thread.daemon = True
        self._thread.start()
        log.info("refdev: serving %s on %s", self.config.source, self.socket_path)

    def serve_forever(self) -> None:
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(1)
        finally:
            self.stop()

    def stop(self) -> None:
        """Close the listener and every session; locks and waiters go with them."""
        if self._thread is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.ident is not None:  # a Ctrl-C in start() may come before its start
            self._thread.join(5)
        self._thread = None
        os.close(self._stop_fd)
        with self._mutex:
            sessions = list(self.sessions)
        log.info("stopping: %d session(s); waiting locks fail", len(sessions))
        # before any session goes: its locks going must not grant another session's
        # waiters a lock that then exists nowhere
        self.locks.shut_down()
        for session in sessions:
            session.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._release_claim(self._lock_fd)
        self._lock_fd = -1

    def _release_claim(self, fd: int) -> None:
        if fd < 0:
            return
        # unlink while still holding the lock: a device waiting to take it re-checks
        # the path after locking (see _claim) and starts over on a fresh file
        try:
            os.unlink(self.socket_path + ".lock")
        except FileNotFoundError:
            pass
        os.close(fd)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._stop_fd, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._stop_fd in ready:
                    break
                conn, _ = self._listener.accept()
                with self._mutex:
                    session = self._session_factory(
                        conn, self.config, self._next_session, self.locks, self._forget,
                        self.auditor,
                    )
                    self._next_session += 1
                    self.sessions.append(session)
                log.info("refdev: frontend connected (session %d)", session.id)
                session.start()
        self._listener.close()
        self._listener = None

    def audit_report(self) -> AuditReport:
        """What the auditor saw so far, from every frontend (auditing mode only)."""
        if self.auditor is None:
            raise VfsdrvError("the device is not in auditing mode (RefDevice(..., audit=True))")
        return self.auditor.report()

    def wait_sessions_closed(self, timeout: float = 5.0) -> bool:
        """Wait until every frontend's session has ended; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._mutex:
                if not self.sessions:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _forget(self, session: VhostUserSession) -> None:
        with self._mutex:
            if session in self.sessions:
                self.sessions.remove(session)
