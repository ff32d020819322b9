"""The reference device touches the 16-bit ring fields the driver reads or writes
concurrently (used idx, avail_event; used_event, avail flags) only with naturally
sized native accesses: a 2-byte memcpy or slice copy may be done byte by byte (as
aarch64's libc may), and a torn avail_event loses a kick."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest
from vfsdrv.refdev import device_queue
from vfsdrv.refdev.device_queue import DeviceQueue
from vfsdrv.refdev.guest_memory import GuestMemory, Region
from vfsdrv.virtio import ring_layout as rl

SIZE = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000


class _Recording:
    """The native helpers, with every access's offset inside the rings recorded."""

    def __init__(self, real, base: int) -> None:
        self._real = real
        self._base = base
        self.stores: list[tuple[int, int]] = []
        self.loads: list[int] = []

    def vfsdrv_store_release_u16(self, ptr, value: int) -> None:
        self.stores.append((int(device_queue.ffi.cast("uintptr_t", ptr)) - self._base, value))
        self._real.vfsdrv_store_release_u16(ptr, value)

    def vfsdrv_load_acquire_u16(self, ptr) -> int:
        self.loads.append(int(device_queue.ffi.cast("uintptr_t", ptr)) - self._base)
        return self._real.vfsdrv_load_acquire_u16(ptr)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest.fixture
def queue(monkeypatch) -> Iterator[tuple[DeviceQueue, memoryview, _Recording]]:
    mapping = mmap.mmap(-1, 0x4000)
    view = memoryview(mapping)
    memory = GuestMemory([Region(0, 0x4000, 0, mapping, view)])
    base = int(device_queue.ffi.cast("uintptr_t", device_queue.ffi.from_buffer(view)))
    recording = _Recording(device_queue.lib, base)
    monkeypatch.setattr(device_queue, "lib", recording)
    q = DeviceQueue(0, event_idx=True)
    q.set_size(SIZE)
    q.set_addresses(DESC, USED, AVAIL)
    q.start(memory)
    q.enabled = True
    yield q, view, recording
    q.stop()
    memory.close()


def test_avail_event_is_published_with_one_native_store(queue) -> None:
    q, view, rec = queue
    q.last_avail = 0x1234
    view[AVAIL + rl.AVAIL_IDX : AVAIL + rl.AVAIL_IDX + 2] = (0x1234).to_bytes(2, "little")
    assert not q.arm_kick()
    off = USED + rl.avail_event_offset(SIZE)
    assert (off, 0x1234) in rec.stores
    assert int.from_bytes(view[off : off + 2], "little") == 0x1234


def test_used_idx_store_and_suppression_loads_are_native(queue) -> None:
    q, view, rec = queue
    # one chain: a single writable descriptor
    rl.DESC.pack_into(view, DESC, 0x3000, 64, rl.VRING_DESC_F_WRITE, 0)
    view[AVAIL + rl.AVAIL_RING : AVAIL + rl.AVAIL_RING + 2] = (0).to_bytes(2, "little")
    view[AVAIL + rl.AVAIL_IDX : AVAIL + rl.AVAIL_IDX + 2] = (1).to_bytes(2, "little")
    q.call_fd = -1  # signal() must read used_event; the eventfd write is not reached
    chain = q.pop()
    assert chain is not None
    q.push(chain, 16)
    assert (USED + rl.USED_IDX, 1) in rec.stores
    q.signalled_used = 1  # used_event 0 lies behind: no interrupt, only the load matters
    q.signal()
    assert AVAIL + rl.used_event_offset(SIZE) in rec.loads
    q.event_idx = False
    view[AVAIL + rl.AVAIL_FLAGS] = rl.VRING_AVAIL_F_NO_INTERRUPT
    q.signal()
    assert AVAIL + rl.AVAIL_FLAGS in rec.loads
    q.call_fd = None
