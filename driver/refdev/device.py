"""The reference device: a listening vhost-user socket serving a host directory.

Every frontend that connects gets its own session (memory, queues, FUSE session);
all sessions share one lock table, so two mounts of the device see each other's
locks as two guests of one device would.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time

from ..errors import VfsdrvError
from ..fs.abi import DEFAULT_NOTIFY_LOCK_CODE
from .audit import Auditor, AuditReport
from .lock_table import LockTable
from .vhost_session import DeviceConfig, VhostUserSession

log = logging.getLogger(__name__)


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
    ) -> None:
        """`audit`: auditing mode (docs/audit.rst): offer the STATUS protocol feature
        and check every driver-normative statement observable here; see audit_report().
        `audit_probes`: deliberate departures to test the driver (audit.PROBES).
        `auditor`: record into this one (several devices, one report); implies audit."""
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
        )
        self.locks = LockTable(max_waiting_locks)
        if auditor is None and audit:
            auditor = Auditor(audit_probes)
        elif auditor is not None and audit_probes:
            auditor = auditor.with_probes(audit_probes)
        self.auditor = auditor
        self.sessions: list[VhostUserSession] = []
        self._mutex = threading.Lock()
        self._next_session = 1
        self._listener: socket.socket | None = None
        self._stop_fd = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RefDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen on the socket and accept frontends in a background thread."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a stale socket from an earlier run
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(8)
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
        self._thread.join(5)
        self._thread = None
        os.close(self._stop_fd)
        with self._mutex:
            sessions = list(self.sessions)
        for session in sessions:
            session.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

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
                    session = VhostUserSession(
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
