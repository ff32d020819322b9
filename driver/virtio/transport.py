"""The one small interface between the virtio core and a transport.

A transport moves the generic virtio operations (status, features, config space,
queue setup, notifications, interrupts) over one bus: modern virtio-pci over VFIO
(`vfsdrv.virtio.pci`), or vhost-user over a unix socket (`vfsdrv.virtio.vhost_user`).
The core (`vfsdrv.virtio.device`) drives the status state machine through it; the
virtio-fs device never sees which transport it runs on. Modelled on SPDK's
`virtio_dev_ops`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .memory import DmaPool


@dataclass(frozen=True)
class QueueAddresses:
    """Device addresses of the three parts of a split virtqueue."""

    desc: int
    avail: int
    used: int


class Transport(ABC):
    """What the virtio core needs from a bus. All methods are synchronous."""

    #: short human name used in logs and errors, e.g. "vhost-user:/run/fs.sock"
    name: str = "transport"
    #: get_status() is a register read (cheap enough to poll when the bus has no
    #: configuration-change interrupt), not a message to a backend
    status_is_register: bool = False
    #: set by a frontend whose native thread may still use the memory (a pump that
    #: did not stop): close() then leaves the DMA memory mapped, never pulled away
    #: under a running thread
    keep_memory_mapped: bool = False
    #: how long the device may take over one setup exchange, FUSE_INIT included
    #: (`vfsdrv mount --timeout`); None: each caller's own default
    timeout: float | None = None

    # -- status and reset -------------------------------------------------------
    @abstractmethod
    def get_status(self) -> int: ...

    @abstractmethod
    def set_status(self, status: int) -> None: ...

    @abstractmethod
    def reset(self, timeout: float = 5.0) -> None:
        """Reset the device and wait until it reads back status 0."""

    # -- features ----------------------------------------------------------------
    @abstractmethod
    def device_features(self) -> int: ...

    @abstractmethod
    def set_driver_features(self, features: int) -> None: ...

    # -- device configuration space ---------------------------------------------
    @abstractmethod
    def config_generation(self) -> int: ...

    @abstractmethod
    def read_config(self, offset: int, length: int) -> bytes:
        """Raw read of device config; the core wraps it in the generation retry."""

    # -- virtqueues --------------------------------------------------------------
    @abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device exposes (0 if the bus cannot tell)."""

    @abstractmethod
    def queue_max_size(self, index: int) -> int:
        """Largest size the device accepts for queue `index`; 0 = no such queue."""

    @abstractmethod
    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Tell the device where queue `index` lives and how big it is (not enabled yet)."""

    @abstractmethod
    def enable_queue(self, index: int) -> None: ...

    @abstractmethod
    def notify(self, index: int, data: int | None = None) -> None:
        """Available-buffer notification ("kick"). `data` is the NOTIFICATION_DATA value."""

    @abstractmethod
    def interrupt_fd(self, index: int) -> int | None:
        """An eventfd that becomes readable when queue `index` has used buffers,
        or None when the queue runs without interrupts (polling)."""

    def native_kick(self, index: int) -> tuple[int, object, int, int] | None:
        """How native code notifies queue `index` without calling back into Python:
        (eventfd to write, -1 if none; MMIO pointer or None; value; width in bytes).
        None: only notify() can (the native pump then relays its kicks)."""
        return None

    def ack_interrupt(self, index: int) -> None:  # noqa: B027 - optional hook
        """Clear the interrupt for queue `index` (read the eventfd)."""

    def config_fd(self) -> int | None:
        """An eventfd signalled on a configuration change (e.g. DEVICE_NEEDS_RESET),
        or None if the bus has no such interrupt."""
        return None

    def error_fd(self) -> int | None:
        """A file descriptor that becomes readable when the device goes away
        (socket closed, unplug request). None if the bus has no such signal."""
        return None

    def check_alive(self) -> None:  # noqa: B027 - optional hook
        """Raise DeviceGoneError if the device is known to be gone."""

    # -- memory ------------------------------------------------------------------
    @abstractmethod
    def dma_pool(self) -> DmaPool:
        """Memory the device can reach, with each buffer's device address."""

    def transport_features(self, offered: int) -> int:
        """Transport-level feature bits the driver should accept out of `offered`
        (e.g. ACCESS_PLATFORM on PCI, PROTOCOL_FEATURES on vhost-user)."""
        return 0

    def start(self) -> None:  # noqa: B027 - optional hook
        """Called after DRIVER_OK is written (vhost-user starts the rings here)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the device (best effort) and release every resource."""
