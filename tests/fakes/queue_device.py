"""What the in-process split (ring_device.py) and packed (packed_device.py) devices
share: the descriptor flags, the event formula, the device's memory, buffers.

Written out from the spec, not imported from the driver, so a layout bug in the
driver cannot hide behind itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vfsdrv.virtio.transport import QueueAddresses

U16 = struct.Struct("<H")

# descriptor flags, the same in both layouts (2.7.5, 2.8.3)
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 2.7.10.1 / Linux vring_need_event, in 16-bit arithmetic."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class DriverBug(AssertionError):
    """The driver wrote something a device must refuse."""


@dataclass(kw_only=True)
class Buffers:
    """The buffers of one chain; each layout's Chain adds where it came from."""

    readable: list[tuple[int, int]] = field(default_factory=list)  # (device addr, len)
    writable: list[tuple[int, int]] = field(default_factory=list)
    indirect: bool = False
    table: tuple[int, int] | None = None  # indirect table (addr, len)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class QueueDevice:
    """One virtqueue's device side; subclasses read and write their layout."""

    def __init__(
        self,
        mem: memoryview,
        size: int,
        addrs: QueueAddresses,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        to_offset: Callable[[int], int] = lambda addr: addr,
        auto_event: bool = True,
    ) -> None:
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.to_offset = to_offset
        #: with EVENT_IDX, ask for a kick at the next new buffer after each pop_all()
        self.auto_event = auto_event
        self.outstanding: dict[int, Buffers] = {}  # head/buffer id -> chain the device owns
        self.popped = 0
        self.interrupts = 0
        self._init_layout(addrs)

    def _init_layout(self, addrs: QueueAddresses) -> None:
        """The layout's offsets and positions (called by __init__)."""
        raise NotImplementedError

    # -- raw memory ------------------------------------------------------------------
    def _u16(self, off: int) -> int:
        return U16.unpack_from(self.mem, off)[0]

    def _put_u16(self, off: int, value: int) -> None:
        U16.pack_into(self.mem, off, value & 0xFFFF)

    def _check_range(self, addr: int, length: int, what: str) -> int:
        off = self.to_offset(addr)
        if off < 0 or off + length > len(self.mem):
            raise DriverBug(f"{what} {addr:#x}+{length} outside device memory")
        return off

    # -- buffers -----------------------------------------------------------------------
    def read(self, chain: Buffers) -> bytes:
        """The device-readable bytes of a chain, in order."""
        return b"".join(
            bytes(self.mem[self.to_offset(a) : self.to_offset(a) + n]) for a, n in chain.readable
        )

    def _scatter(self, key: int, chain: Buffers, data: bytes) -> None:
        """Scatter `data` over the writable buffers of the chain the device owns as
        `key`; then the device no longer owns it."""
        if self.outstanding.get(key) is not chain:
            raise AssertionError(f"test bug: chain {key} is not owned by the device")
        if len(data) > chain.writable_len:
            raise AssertionError(f"test bug: {len(data)} bytes do not fit {chain.writable_len}")
        pos = 0
        for addr, n in chain.writable:
            if pos == len(data):
                break
            k = min(n, len(data) - pos)
            off = self.to_offset(addr)
            self.mem[off : off + k] = data[pos : pos + k]
            pos += k
        del self.outstanding[key]
