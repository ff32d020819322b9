"""vhost-user backends that stall, for the deadline tests: a real Unix socket served
by a thread of the test process, speaking the wire protocol of
vfsdrv.virtio.vhost_user_proto.

  * "silent": accepts the connection and never reads nor answers anything;
  * "no-init": answers the whole handshake (features, protocol features with MQ and
    REPLY_ACK, queue count, acks) but never looks at its rings, so FUSE_INIT is never
    answered; and like a backend whose queue thread is stuck in a request, it never
    answers GET_VRING_BASE either (virtiofsd answers it only once the ring is stopped);
  * "slow": as "no-init", each answer `delay` seconds late (within any one message's
    deadline, but adding up);
  * "hangup": closes each connection as soon as it accepts it;
  * "wrong-reply": answers GET_FEATURES as if it were GET_PROTOCOL_FEATURES.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from vfsdrv.errors import TransportError
from vfsdrv.virtio import vhost_user_proto as vu

VERSION_1 = 1 << 32
PROTOCOL = vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK
NUM_QUEUES = 2


class StallingBackend:
    def __init__(self, path: str, mode: str, delay: float = 0.0) -> None:
        if mode not in ("silent", "no-init", "slow", "hangup", "wrong-reply"):
            raise ValueError(mode)
        self.path = path
        self.mode = mode
        self.delay = delay
        #: request codes received, in order (the no-init backend only)
        self.received: list[int] = []
        self._stop_r, self._stop_w = os.pipe()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name=f"stalling-{mode}", daemon=True)
        self._thread.start()

    # -- serving --------------------------------------------------------------------------
    def _run(self) -> None:
        watched: list = [self._listener, self._stop_r]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if self._stop_r in ready:
                return
            for s in ready:
                if s is self._listener:
                    conn, _ = self._listener.accept()
                    if self.mode == "hangup":
                        conn.close()
                        continue
                    self._conns.append(conn)
                    if self.mode != "silent":
                        watched.append(conn)  # the silent backend never reads
                    continue
                try:
                    self._serve_one(s)
                except (ConnectionError, TransportError):
                    watched.remove(s)

    def _serve_one(self, conn: socket.socket) -> None:
        request, flags, _payload, fds = vu.recv_message(conn)
        for fd in fds:
            os.close(fd)
        self.received.append(request)
        answer: bytes | None = None
        if request == vu.Request.GET_FEATURES:
            answer = vu.U64.pack(VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES)
        elif request == vu.Request.GET_PROTOCOL_FEATURES:
            answer = vu.U64.pack(PROTOCOL)
        elif request == vu.Request.GET_QUEUE_NUM:
            answer = vu.U64.pack(NUM_QUEUES)
        elif request == vu.Request.GET_VRING_BASE:
            return  # stuck: the ring never stops
        elif flags & vu.FLAG_NEED_REPLY:
            answer = vu.U64.pack(0)
        if self.mode == "wrong-reply" and request == vu.Request.GET_FEATURES:
            request = vu.Request.GET_PROTOCOL_FEATURES
        if answer is not None:
            if self.mode == "slow":
                time.sleep(self.delay)
            vu.send_message(conn, request, answer, flags=vu.VERSION | vu.FLAG_REPLY)

    def push(self, request: int) -> None:
        """An unrequested message to the frontend (the protocol has none on this socket)."""
        vu.send_message(self._conns[-1], request, vu.U64.pack(0),
                        flags=vu.VERSION | vu.FLAG_REPLY)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for s in (*self._conns, self._listener):
            s.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> StallingBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
