"""The virtio device core: the status state machine, feature negotiation and
virtqueue set-up, over any Transport (virtio 1.2 3.1, "Device Initialization").

    reset (wait for 0) -> ACKNOWLEDGE -> DRIVER -> features -> FEATURES_OK ->
    re-read FEATURES_OK -> device-specific set-up (queues, config) -> DRIVER_OK

Any failure on the way sets FAILED (best effort) and raises; status bits are only
ever added, never cleared, until the next reset.
"""

from __future__ import annotations

import logging

from ..errors import DeviceError, FeatureNegotiationError, TransportError
from . import ring_layout as rl
from .constants import DEVICE_FEATURE_MASK, Feature, Status, feature_names
from .transport import Transport
from .virtqueue import Virtqueue

log = logging.getLogger(__name__)

#: ring features this core implements; ORDER_PLATFORM because vfsdrv._native's
#: barriers are the hardware-suitable ones (dmb osh on aarch64, mfence on x86-64);
#: RING_PACKED (native/packed.c) is preferred whenever offered. IN_ORDER is accepted
#: with RING_PACKED only: the packed core takes a used entry for a batch (it completes
#: every older buffer); the split core completes each used entry by itself.
CORE_FEATURES = (
    Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.ORDER_PLATFORM
    | Feature.RING_PACKED | Feature.IN_ORDER
)

#: the `ring` choices: None takes packed when offered, else split
RING_LAYOUTS = ("split", "packed")

CONFIG_RETRIES = 100


class VirtioDevice:
    def __init__(self, transport: Transport, *, ring: str | None = None) -> None:
        if ring not in (None, *RING_LAYOUTS):
            raise ValueError(f"ring must be one of {RING_LAYOUTS} or None, not {ring!r}")
        self.transport = transport
        #: "split" or "packed" forces that layout; None: packed whenever offered
        self.ring = ring
        self.status = 0
        self.offered = 0
        self.features = 0
        self.queues: dict[int, Virtqueue] = {}

    # -- status -----------------------------------------------------------------
    def _add_status(self, bit: int) -> None:
        self.status |= bit
        self.transport.set_status(self.status)

    def fail(self) -> None:
        """Set FAILED (best effort: the device may already be gone)."""
        try:
            # DEVICE_NEEDS_RESET is the device's bit: written back, never cleared (2.1.1)
            self.status |= self.transport.get_status() & Status.DEVICE_NEEDS_RESET
            self._add_status(Status.FAILED)
        except Exception as exc:  # noqa: BLE001 - we are already failing
            log.debug("could not set FAILED on %s: %s", self.transport.name, exc)

    def needs_reset(self) -> bool:
        return bool(self.transport.get_status() & Status.DEVICE_NEEDS_RESET)

    # -- initialization -------------------------------------------------------------
    def negotiate(
        self, device_features: int = 0, *, ring_features: int = CORE_FEATURES,
        reset_timeout: float = 5.0,
    ) -> int:
        """Steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read).

        `device_features` are the device-type bits (0-23) the caller understands
        and wants; `ring_features` the subset of CORE_FEATURES to offer to accept.
        Returns the negotiated feature set."""
        t = self.transport
        t.reset(reset_timeout)
        self.status = 0
        self._add_status(Status.ACKNOWLEDGE)
        self._add_status(Status.DRIVER)
        try:
            self.offered = t.device_features()
            if not self.offered & Feature.VERSION_1:
                raise DeviceError(
                    f"{t.name}: device does not offer VIRTIO_F_VERSION_1; legacy devices "
                    "are not supported"
                )
            if self.ring == "packed" and not self.offered & Feature.RING_PACKED:
                raise DeviceError(
                    f"{t.name}: packed virtqueues asked for, but the device does not offer "
                    "VIRTIO_F_RING_PACKED"
                )
            # Accept only what we understand and the device offered (checklist 5, 7).
            wanted = (device_features & DEVICE_FEATURE_MASK) | (
                ring_features & CORE_FEATURES
            ) | Feature.VERSION_1
            if self.ring == "split":
                wanted &= ~Feature.RING_PACKED
            elif self.ring == "packed":
                wanted |= Feature.RING_PACKED
            accept = self.offered & wanted
            if not accept & Feature.RING_PACKED:
                accept &= ~Feature.IN_ORDER
            accept |= t.transport_features(self.offered) & self.offered
            log.info(
                "%s: offered %s; accepting %s", t.name, feature_names(self.offered),
                feature_names(accept),
            )
            t.set_driver_features(accept)
            self._add_status(Status.FEATURES_OK)
            if not t.get_status() & Status.FEATURES_OK:
                raise FeatureNegotiationError(
                    f"{t.name}: device cleared FEATURES_OK: it does not accept the feature set "
                    f"{accept:#x} ({feature_names(accept)})"
                )
        except Exception:
            self.fail()
            raise
        self.features = accept
        return accept

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    def read_config(self, offset: int, length: int) -> bytes:
        """Device config read made consistent with the generation counter."""
        t = self.transport
        for _ in range(CONFIG_RETRIES):
            before = t.config_generation()
            data = t.read_config(offset, length)
            if t.config_generation() == before:
                if len(data) != length:
                    raise DeviceError(
                        f"{t.name}: config read of {length} bytes at {offset} returned {len(data)}"
                    )
                return data
        raise DeviceError(f"{t.name}: config generation never settled ({CONFIG_RETRIES} tries)")

    def setup_queue(self, index: int, max_size: int = 256) -> Virtqueue:
        """Step 7 for one queue: size, memory, addresses, enable."""
        t = self.transport
        vq = None
        try:
            device_max = t.queue_max_size(index)
            if device_max == 0:
                raise DeviceError(f"{t.name}: queue {index} does not exist (size 0)")
            if device_max > rl.MAX_QUEUE_SIZE:
                raise DeviceError(f"{t.name}: queue {index} reports size {device_max} > 32768")
            size = min(device_max, max_size)
            packed = self.has(Feature.RING_PACKED)
            if not packed:
                size = 1 << (size.bit_length() - 1)  # split rings need a power of two
            vq = Virtqueue(
                index, size, t.dma_pool(),
                event_idx=self.has(Feature.EVENT_IDX),
                indirect=self.has(Feature.INDIRECT_DESC),
                packed=packed,
                in_order=self.has(Feature.IN_ORDER),
            )
            t.setup_queue(index, size, vq.addresses)
            t.enable_queue(index)
        except Exception:
            if vq is not None:
                vq.close()  # give the ring memory back
            self.fail()
            raise
        self.queues[index] = vq
        log.debug("%s: queue %d size %d (%s) ready", t.name, index, size,
                  "packed" if vq.packed else "split")
        return vq

    def driver_ok(self) -> None:
        """Step 8: the device is live."""
        try:
            self._add_status(Status.DRIVER_OK)
            self.transport.start()
        except Exception:
            self.fail()
            raise

    def kick(self, vq: Virtqueue) -> None:
        """Publish and notify the device when it wants to be notified."""
        if vq.publish():
            self.transport.notify(vq.index)

    def close(self) -> None:
        """Reset the device (stopping DMA), then release queues and the transport."""
        t = self.transport
        try:
            t.reset(1.0)
        except (TransportError, OSError) as exc:
            log.debug("reset of %s on close failed: %s", t.name, exc)
        for vq in self.queues.values():
            try:
                vq.close()
            except Exception as exc:  # noqa: BLE001 - releasing memory must go on
                log.debug("releasing queue %d: %s", vq.index, exc)
        self.queues.clear()
        t.close()
