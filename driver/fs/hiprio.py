"""The hiprio sender (driver/native/hiprio.c): FORGET, BATCH_FORGET and INTERRUPT on
the hiprio queue, from native code.

Once the relay's pumps run, the sender owns the hiprio queue: the pumps send FORGET
and BATCH_FORGET through it without the GIL, and the control thread sends its own
hiprio traffic (an INTERRUPT of a pending SETLKW, requests a full sender turned
back) through it too, so the ring has one owner. Requests travel in DMA buffers
of one page, taken from the device's pool here and handed to the sender; hiprio
requests get no reply, and the sender takes buffers back lazily from the used ring
(hiprio interrupts stay off).

The one rule for splitting a BATCH_FORGET too big for a buffer is the sender's
(`vfsdrv_hiprio_pieces`/`vfsdrv_hiprio_piece`); `split_hiprio` calls it.
"""

from __future__ import annotations

import errno

from .._native import ffi, lib
from ..errors import RingError
from ..virtio.kick import NativeKick
from ..virtio.memory import PAGE_SIZE, DmaBuffer, DmaPool
from ..virtio.transport import Transport
from ..virtio.virtqueue import Virtqueue

#: requests the sender can hold before the device gives buffers back
BUFFERS = 32
BUF_SIZE = PAGE_SIZE


def split_hiprio(data: bytes, limit: int) -> list[bytes]:
    """`data` as hiprio requests of at most `limit` bytes each: itself when it fits,
    else BATCH_FORGET pieces (the same header, unique included: none gets a reply).
    [] when it cannot be sent (too big and not a BATCH_FORGET)."""
    n = lib.vfsdrv_hiprio_pieces(data, len(data), limit)
    out = ffi.new("uint8_t[]", max(limit, 1))
    pieces = []
    for k in range(n):
        size = lib.vfsdrv_hiprio_piece(data, len(data), limit, k, out)
        pieces.append(bytes(ffi.buffer(out, size)))
    return pieces


class HiprioFull(Exception):  # noqa: N818 - a condition: the caller keeps the request
    """No buffer or ring room now; retry after the device used some."""


class HiprioSender:
    """The native sender on one hiprio `Virtqueue`, with its own DMA buffers."""

    def __init__(self, vq: Virtqueue, pool: DmaPool, transport: Transport, *,
                 buffers: int = BUFFERS) -> None:
        if not vq.idle:
            raise ValueError("the hiprio queue has requests in flight")
        self.vq = vq
        self._pool = pool
        self._bufs: list[DmaBuffer] = []
        self._kick: NativeKick | None = None
        self._h = ffi.NULL
        try:
            for _ in range(min(buffers, vq.size)):
                self._bufs.append(pool.alloc(BUF_SIZE, PAGE_SIZE))
            cbufs = ffi.new("struct vfsdrv_hiprio_buf[]", len(self._bufs))
            for i, buf in enumerate(self._bufs):
                cbufs[i].host = ffi.cast("uint8_t *", buf.address_of())
                cbufs[i].addr = buf.addr  # one page: device-contiguous
            self._kick = NativeKick(transport, vq.index)
            cfg = ffi.new("struct vfsdrv_hiprio_config *")
            self._kick.fill(cfg)
            cfg.buf_size = BUF_SIZE
            err = ffi.new("char[]", 200)
            self._h = lib.vfsdrv_hiprio_new(cfg, vq.native, cbufs, len(self._bufs), err, 200)
            if self._h == ffi.NULL:
                raise OSError(f"hiprio sender: {ffi.string(err).decode()}")
        except BaseException:
            self.close()
            raise
        self._err = ffi.new("char[]", lib.VFSDRV_ERROR_LEN)

    @property
    def native(self):
        """The `struct vfsdrv_hiprio *` (for the pumps)."""
        return self._h

    @property
    def limit(self) -> int:
        """The largest request one buffer carries."""
        return BUF_SIZE

    def send(self, data: bytes) -> None:
        """Queue one hiprio request (a BATCH_FORGET too big for a buffer is split,
        all pieces or none). HiprioFull: nothing queued; ValueError: it can never be
        sent; RingError: the sender is broken."""
        rc = lib.vfsdrv_hiprio_send(self._h, data, len(data))
        if rc == 0:
            return
        if rc == -errno.ENOSPC:
            raise HiprioFull()
        if rc == -errno.EMSGSIZE:
            raise ValueError(f"hiprio request of {len(data)} bytes cannot be sent")
        raise self._failed()

    def flush(self) -> None:
        """Publish what was queued; kick unless the device suppressed it."""
        if lib.vfsdrv_hiprio_flush(self._h) < 0:
            raise self._failed()

    def reclaim(self) -> int:
        n = lib.vfsdrv_hiprio_reclaim(self._h)
        if n < 0:
            raise self._failed()
        return n

    def _failed(self) -> RingError:
        return RingError(self.broken or "hiprio sender failed")

    @property
    def broken(self) -> str | None:
        """Why the sender stopped (a bad used entry, a failed kick), or None."""
        if self._h == ffi.NULL:
            return None
        if lib.vfsdrv_hiprio_error(self._h, self._err, lib.VFSDRV_ERROR_LEN):
            return ffi.string(self._err).decode(errors="replace")
        return None

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct vfsdrv_hiprio_stats *")
        lib.vfsdrv_hiprio_get_stats(self._h, s)
        return {name: int(getattr(s, name)) for name, _ in ffi.typeof(s[0]).fields}

    def close(self) -> None:
        """Free the native state and the buffers (after every pump using it has
        stopped; the device reset or the queue idle, so no buffer is still read)."""
        if self._h != ffi.NULL:
            lib.vfsdrv_hiprio_free(self._h)
            self._h = ffi.NULL
        if self._kick is not None:
            self._kick.close()
            self._kick = None
        for buf in self._bufs:
            self._pool.free(buf)
        self._bufs.clear()
