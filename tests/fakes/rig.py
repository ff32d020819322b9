"""A driver virtqueue and an in-process device on its other end, for the split
(tests/test_virtqueue.py) and packed (tests/test_packed_virtqueue.py) ring tests."""

from __future__ import annotations

from typing import Any

from vfsdrv.virtio.memory import Arena, DmaBuffer
from vfsdrv.virtio.virtqueue import Virtqueue

from .queue_device import QueueDevice
from .transport import identity_arena


class QueueRig:
    """A virtqueue, the device on the other end and a data buffer in the same arena."""

    def __init__(self, index: int, size: int, device: type[QueueDevice], *,
                 packed: bool = False, event_idx: bool = False, indirect: bool = False) -> None:
        self.arena: Arena = identity_arena(1 << 20)
        self.vq = Virtqueue(index, size, self.arena, event_idx=event_idx, indirect=indirect,
                            packed=packed)
        self.dev: Any = device(self.arena.view, size, self.vq.addresses, event_idx=event_idx,
                          indirect=indirect)
        self.data: DmaBuffer = self.arena.alloc(64 * 1024, 4096)
        self._slot = 0

    def seg(self, offset: int, length: int) -> tuple[int, int]:
        return (self.data.addr + offset, length)

    def add_simple(self, token: Any, n_read: int = 1, n_write: int = 1) -> int:
        """A chain of n_read 16-byte readable and n_write 32-byte writable segments,
        in the next of 256 places in the data buffer, so live chains never share bytes."""
        base = (self._slot % 256) * 256
        self._slot += 1
        readable = [self.seg(base + 16 * i, 16) for i in range(n_read)]
        writable = [self.seg(base + 128 + 32 * i, 32) for i in range(n_write)]
        return self.vq.add(readable, writable, token)

    def roundtrip(self) -> list[Any]:
        """Publish what was added; the chains the device takes (its layout's Chain)."""
        self.vq.publish()
        return self.dev.pop_all()
