"""How native code (the relay's pumps, the hiprio sender) notifies a queue without
calling back into Python: an eventfd write (vhost-user) or an MMIO store (PCI), as
the transport says (`Transport.native_kick`). A transport with neither gets an
eventfd that a small thread turns into notify() calls."""

from __future__ import annotations

import os
import threading

from .._native import ffi
from .transport import Transport


class NativeKick:
    """The kick of queue `index`, in the shape of the native configs (kick_fd,
    notify_addr, notify_value, notify_width)."""

    def __init__(self, transport: Transport, index: int) -> None:
        self.fd = -1
        self.addr = ffi.NULL
        self.value = self.width = 0
        self._relay: threading.Thread | None = None
        self._stopping = False
        kick = transport.native_kick(index)
        if kick is not None:
            self.fd, ptr, self.value, self.width = kick
            if ptr is not None:
                self.addr = ffi.cast("uint8_t *", ptr)
            return
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

        def relay_kicks() -> None:
            while not self._stopping:
                try:
                    os.eventfd_read(self.fd)
                    if not self._stopping:
                        transport.notify(index)
                except OSError:
                    return

        self._relay = threading.Thread(target=relay_kicks, name=f"vfsdrv-kick-{index}",
                                       daemon=True)
        self._relay.start()

    def fill(self, cfg) -> None:
        """Set a native config's kick fields."""
        cfg.kick_fd = self.fd
        cfg.notify_addr = self.addr
        cfg.notify_value = self.value
        cfg.notify_width = self.width

    def close(self) -> None:
        """Stop the relay thread, if there is one (only after native code stopped
        kicking: the eventfd is closed)."""
        if self._relay is None:
            return
        self._stopping = True
        try:
            os.eventfd_write(self.fd, 1)  # wakes the thread, which sees _stopping
        except OSError:
            pass
        self._relay.join(2)
        os.close(self.fd)
        self._relay = None
        self.fd = -1
