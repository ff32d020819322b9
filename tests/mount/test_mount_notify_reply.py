"""Issue 10 item 8: a device's FUSE_NOTIFY_RETRIEVE makes the kernel send
FUSE_NOTIFY_REPLY, a request that expects no reply. The relay forwards it to the
device and drops the device's answer; it never writes a reply for it to the kernel
(which has no request of that unique waiting).

The reference device runs in this process, with one notification rewritten into a
RETRIEVE of the root's pages; the mount is a real `vfsdrv mount -d`."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

from mount_helpers import inprocess_refdev_mount
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev import fuse_server, vhost_session
from vfsdrv.refdev.fuse_server import FuseServer

NOTIFY_UNIQUE = 4242
MAGIC = 0x5E7E1E7E  # a "lock" notification this test turns into a RETRIEVE


def test_notify_reply_is_forwarded_and_never_answered(tmp_path: Path, monkeypatch) -> None:
    seen: list[int] = []
    opened: list[int] = []  # nodeids the kernel opened
    real_handle = FuseServer.handle

    def handle(self: FuseServer, request: bytes, reply_room: int):
        opcode, unique = struct.unpack_from("<IQ", request, 4)[0], \
            struct.unpack_from("<Q", request, 8)[0]
        if opcode == Opcode.NOTIFY_REPLY:
            seen.append(unique)
        elif opcode == Opcode.OPEN:
            opened.append(struct.unpack_from("<Q", request, 16)[0])
        return real_handle(self, request, reply_room)

    real_message = vhost_session.VhostUserSession._lock_message

    def message(self, unique: int, error: int) -> bytes:
        if unique != MAGIC:
            return real_message(self, unique, error)
        # the first page of the file read below, which the kernel has cached
        body = struct.pack("<QQQII", NOTIFY_UNIQUE, opened[-1], 0, 4096, 0)
        return struct.pack("<IiQ", 16 + len(body), 5, 0) + body  # FUSE_NOTIFY_RETRIEVE

    monkeypatch.setattr(fuse_server.FuseServer, "handle", handle)
    monkeypatch.setattr(vhost_session.VhostUserSession, "_lock_message", message)
    with inprocess_refdev_mount(tmp_path, "-d", verbose=True) as (mnt, log, dev):
        assert (mnt / "f").read_text() == "x"
        sessions = list(dev.sessions)
        assert sessions, "no session to send the notification through"
        for s in sessions:
            s._post_lock_notification(MAGIC, 0)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [NOTIFY_UNIQUE], log.read_text()[-3000:]
        assert (mnt / "f").read_text() == "x"  # the mount serves on
        time.sleep(0.3)
        text = log.read_text()
        assert re.search(rf"unique {NOTIFY_UNIQUE} NOTIFY_REPLY", text), text[-2000:]
        assert not re.search(rf"unique {NOTIFY_UNIQUE} NOTIFY_REPLY.*->", text), \
            "the relay answered a request that expects no reply"
        assert "bad reply" not in text and "refused notification" not in text
