"""A fake virtio Transport that models a device's status register and records
everything the driver does, for tests of the status state machine
(`vfsdrv.virtio.device`, virtio 1.2 3.1.1).

Every call lands in `events` as a tuple, e.g. ("status", 0x3), ("features", bits),
("get_status", value), so a test can check the order of the whole conversation.
The device side is modelled where the spec gives it a say:
  * reset() sets status to 0; `set_status` never clears bits on its own, but records
    in `violations` any write that clears a bit the driver had set since the reset;
  * a device may refuse the driver's features (`accept_features` returns False):
    it then leaves FEATURES_OK clear, as 3.1.1 step 6 describes;
  * the config generation can change during a read (`generation_bumps` reads race
    with a config change, or `generation_always_changes`);
  * any method named in `fail_on` raises TransportError.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

from vfsdrv.errors import TransportError
from vfsdrv.virtio.constants import Feature, Status
from vfsdrv.virtio.memory import Arena
from vfsdrv.virtio.transport import QueueAddresses, Transport

DEFAULT_FEATURES = Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX


def identity_arena(size: int = 1 << 20) -> Arena:
    """An arena over anonymous memory whose device addresses equal its offsets."""
    view = memoryview(mmap.mmap(-1, size))
    return Arena(view, lambda off: (off, size - off))


class FakeTransport(Transport):
    name = "fake"

    def __init__(
        self,
        *,
        features: int = DEFAULT_FEATURES,
        config: bytes = b"",
        queue_max: dict[int, int] | None = None,
        accept_features: Callable[[int], bool] = lambda features: True,
        transport_bits: int = 0,
        arena: Arena | None = None,
    ) -> None:
        self.offered = int(features)
        self.config = bytearray(config)
        self.queue_max = dict(queue_max if queue_max is not None else {0: 256})
        self.accept_features = accept_features
        self.transport_bits = transport_bits
        self.arena = arena if arena is not None else identity_arena()
        self.status = 0x7F  # garbage until the first reset: the driver must reset first
        self.driver_features: int | None = None
        self.generation = 0
        self.generation_bumps = 0  # the next N config reads race with a config change
        self.generation_always_changes = False
        self.fail_on: set[str] = set()
        self.events: list[tuple[Any, ...]] = []
        self.violations: list[str] = []
        self._set_since_reset = 0
        self.queues: dict[int, tuple[int, QueueAddresses]] = {}
        self.enabled: set[int] = set()
        self.started = False
        self.closed = False

    def _call(self, what: str, *args: Any) -> None:
        self.events.append((what, *args))
        if what in self.fail_on:
            raise TransportError(f"fake: {what} failed")

    # -- what tests look at --------------------------------------------------------------
    def status_writes(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "status"]

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    # -- status and reset ----------------------------------------------------------------
    def get_status(self) -> int:
        self._call("get_status", self.status)
        return self.status

    def set_status(self, status: int) -> None:
        self._call("status", int(status))
        if status == 0:
            self.violations.append("status 0 written with set_status instead of reset()")
        cleared = self._set_since_reset & ~status
        if cleared:
            self.violations.append(f"status write {status:#x} clears bits {cleared:#x}")
        self._set_since_reset |= status
        new = status
        if status & Status.FEATURES_OK and not self.status & Status.FEATURES_OK:
            # the device checks the features when FEATURES_OK is first written
            if self.driver_features is None or not self.accept_features(self.driver_features):
                new &= ~Status.FEATURES_OK
        elif not self.status & Status.FEATURES_OK:
            new &= ~Status.FEATURES_OK  # once refused, it stays clear
        self.status = int(new)

    def reset(self, timeout: float = 5.0) -> None:
        self._call("reset")
        self.status = 0
        self._set_since_reset = 0
        self.driver_features = None
        self.queues.clear()
        self.enabled.clear()
        self.started = False

    # -- features ------------------------------------------------------------------------
    def device_features(self) -> int:
        self._call("device_features")
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self._call("features", int(features))
        self.driver_features = int(features)

    def transport_features(self, offered: int) -> int:
        return self.transport_bits

    # -- config --------------------------------------------------------------------------
    def config_generation(self) -> int:
        self._call("config_generation", self.generation)
        return self.generation

    def read_config(self, offset: int, length: int) -> bytes:
        self._call("read_config", offset, length)
        data = bytes(self.config[offset : offset + length])
        if self.generation_always_changes or self.generation_bumps > 0:
            # the device changes its config while the driver reads it: the driver got a
            # torn copy (first half old); the generation moves on
            self.generation_bumps -= 1
            self.generation = (self.generation + 1) & 0xFF
            for i in range(len(self.config)):
                self.config[i] = (self.config[i] + 1) & 0xFF
            half = len(data) // 2
            data = data[:half] + bytes(self.config[offset + half : offset + length])
        return data

    # -- queues --------------------------------------------------------------------------
    def num_queues(self) -> int:
        return len(self.queue_max)

    def queue_max_size(self, index: int) -> int:
        self._call("queue_max_size", index)
        return self.queue_max.get(index, 0)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        self._call("setup_queue", index, size, addrs)
        self.queues[index] = (size, addrs)

    def enable_queue(self, index: int) -> None:
        self._call("enable_queue", index)
        self.enabled.add(index)

    def notify(self, index: int, data: int | None = None) -> None:
        self._call("notify", index)

    def interrupt_fd(self, index: int) -> int | None:
        return None

    def dma_pool(self) -> Arena:
        return self.arena

    def start(self) -> None:
        self._call("start")
        self.started = True

    def close(self) -> None:
        self._call("close")
        self.closed = True
