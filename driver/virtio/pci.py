"""The modern virtio-pci transport (virtio 1.2 4.1) over a `vfsdrv.pci` PCI function.

The device is untrusted: every vendor capability is checked (BAR index, bounds
within the BAR, 32/64-bit overflow, alignment, minimum length, notify
multiplier) before any register is touched, and each problem is reported as a
CapabilityError naming the capability and what is wrong with it. Registers are
reached only through natural-width accesses (`RegisterWindow`).

Interrupts: one MSI-X vector for configuration changes and one per queue while
vectors last, each read back after programming; a queue whose vector the device
refuses (NO_VECTOR), or that finds no vector left, runs by polling
(`interrupt_fd` returns None).

DMA: the pool is pinned memory from the PCI layer. Without
VIRTIO_F_ACCESS_PLATFORM the device bypasses any IOMMU, so buffers carry
physical addresses (identity-mapped in the IOMMU where there is one); with it,
one contiguous IOVA range is used.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from ..errors import (
    CapabilityError,
    ConfigError,
    DeviceGoneError,
    TransportError,
)
from ..pci import config as pcicfg
from ..pci.errors import WrongDeviceError
from ..pci.function import DmaMemoryLike, PciFunction, RegisterWindow
from ..pci.sysfs import Sysfs
from .constants import Feature
from .memory import Arena, DmaBuffer, DmaPool
from .transport import QueueAddresses, Transport

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_FIRST = 0x1040
VIRTIO_PCI_MODERN_LAST = 0x107F
VIRTIO_ID_FS = 26
VIRTIO_FS_PCI_DEVICE = VIRTIO_PCI_MODERN_FIRST + VIRTIO_ID_FS  # 0x105a

# cfg_type values
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG = 1, 2, 3, 4, 5
SHARED_MEMORY_CFG, VENDOR_CFG = 8, 9
CAP_NAMES = {
    COMMON_CFG: "common cfg",
    NOTIFY_CFG: "notify cfg",
    ISR_CFG: "ISR cfg",
    DEVICE_CFG: "device cfg",
    PCI_CFG: "PCI cfg access",
    SHARED_MEMORY_CFG: "shared memory",
    VENDOR_CFG: "vendor data",
}
CAP_SIZE, CAP64_SIZE, NOTIFY_CAP_SIZE = 16, 24, 20

# struct virtio_pci_common_cfg offsets
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
QUEUE_NOTIF_CONFIG_DATA = 0x38
QUEUE_RESET = 0x3A
COMMON_CFG_MIN = 0x38  # virtio 1.0 layout, through queue_device
COMMON_CFG_MAX = 0x40  # what we map (1.3 layout incl. admin queue fields)

log = logging.getLogger(__name__)

NO_VECTOR = 0xFFFF
#: largest device config we map (the kernel maps at most a page too)
DEVICE_CFG_MAX = 4096
DEFAULT_DMA_SIZE = 32 << 20
PAGE_SIZE = 4096

VIRTIO_FS_TAG_SIZE = 36
VIRTIO_FS_CONFIG_MIN = 40


@dataclass(frozen=True)
class CapRegion:
    cfg_type: int
    cap_offset: int  # in config space
    bar: int
    offset: int
    length: int
    id: int = 0

    @property
    def name(self) -> str:
        kind = CAP_NAMES.get(self.cfg_type, f"type {self.cfg_type}")
        return f"{kind} capability at {self.cap_offset:#x}"


@dataclass
class VirtioPciCaps:
    common: CapRegion
    notify: CapRegion
    notify_off_multiplier: int
    isr: CapRegion
    device: CapRegion | None
    shared_memory: dict[int, CapRegion] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # why some capabilities were skipped
    pci_cfg: int | None = None  # config-space offset of the first PCI cfg access capability


def _check_region(cap: CapRegion, bar_size: int, align: int, min_len: int) -> None:
    where = f"BAR{cap.bar}+{cap.offset:#x}, {cap.length:#x} bytes"
    if cap.offset % align:
        raise CapabilityError(
            f"{cap.name} ({where}): offset is not {align}-byte aligned"
        )
    if cap.length < min_len:
        raise CapabilityError(
            f"{cap.name} ({where}): length {cap.length} is below the minimum of {min_len}"
        )
    if cap.offset + cap.length > bar_size:
        raise CapabilityError(
            f"{cap.name} ({where}): region ends at {cap.offset + cap.length:#x} but BAR{cap.bar} "
            f"is only {bar_size:#x} bytes (BAR too small)"
        )


def parse_capabilities(fn: PciFunction) -> VirtioPciCaps:
    """Walk the vendor capabilities of a virtio PCI function and validate them."""
    cfg = fn.config_read(0, pcicfg.CONFIG_SPACE_SIZE)
    read = lambda off, n: cfg[off : off + n]  # noqa: E731
    try:
        caps = pcicfg.capabilities(read)
    except TransportError as e:
        raise CapabilityError(f"virtio PCI capabilities unreadable: {e}") from e
    first: dict[int, CapRegion] = {}
    notify_mult: int | None = None
    shm: dict[int, CapRegion] = {}
    ignored: list[str] = []
    errors: dict[int, CapabilityError] = {}
    pci_cfg: int | None = None
    for cap in caps:
        if cap.id != pcicfg.CAP_ID_VNDR:
            continue
        pos = cap.offset
        cap_len, cfg_type = cfg[pos + 2], cfg[pos + 3]
        name = f"{CAP_NAMES.get(cfg_type, f'type {cfg_type}')} capability at {pos:#x}"
        if cfg_type not in CAP_NAMES:
            ignored.append(f"{name}: reserved cfg_type, ignored")
            continue
        if cfg_type == PCI_CFG:
            if pci_cfg is None and cap_len >= NOTIFY_CAP_SIZE and pos + cap_len <= 256:
                pci_cfg = pos  # only for inspection while the kernel owns the BARs
            continue
        if cfg_type == VENDOR_CFG:
            continue  # not used by this driver
        if cap_len < CAP_SIZE:
            raise CapabilityError(
                f"{name}: cap_len {cap_len} is shorter than struct virtio_pci_cap ({CAP_SIZE})"
            )
        if pos + cap_len > pcicfg.CONFIG_SPACE_SIZE:
            raise CapabilityError(f"{name}: cap_len {cap_len} runs past the config space")
        bar, cap_id = cfg[pos + 4], cfg[pos + 5]
        offset, length = struct.unpack_from("<II", cfg, pos + 8)
        if bar > 5:
            ignored.append(f"{name}: names reserved BAR {bar}, ignored")
            continue
        bar_size = fn.bar_size(bar)
        if cfg_type == SHARED_MEMORY_CFG:
            if cap_len < CAP64_SIZE:
                raise CapabilityError(
                    f"{name}: cap_len {cap_len} is shorter than struct virtio_pci_cap64 "
                    f"({CAP64_SIZE})"
                )
            off_hi, len_hi = struct.unpack_from("<II", cfg, pos + 16)
            offset |= off_hi << 32
            length |= len_hi << 32
            if offset + length > 1 << 64:
                raise CapabilityError(f"{name}: offset + length overflows 64 bits")
            if cap_id in shm:
                raise CapabilityError(
                    f"{name}: shared memory id {cap_id} is used twice (first at "
                    f"{shm[cap_id].cap_offset:#x})"
                )
            region = CapRegion(cfg_type, pos, bar, offset, length, cap_id)
            if bar_size == 0:
                raise CapabilityError(f"{name}: BAR{bar} is not implemented")
            _check_region(region, bar_size, 1, 0)
            shm[cap_id] = region
            continue
        if offset + length > 1 << 32:
            raise CapabilityError(
                f"{name}: offset {offset:#x} + length {length:#x} overflows 32 bits"
            )
        region = CapRegion(cfg_type, pos, bar, offset, length, cap_id)
        try:
            if bar_size == 0:
                raise CapabilityError(f"{name}: BAR{bar} is not implemented (size 0)")
            if cfg_type == COMMON_CFG:
                _check_region(region, bar_size, 4, COMMON_CFG_MIN)
            elif cfg_type == NOTIFY_CFG:
                if cap_len < NOTIFY_CAP_SIZE:
                    raise CapabilityError(
                        f"{name}: cap_len {cap_len} is shorter than struct virtio_pci_notify_cap "
                        f"({NOTIFY_CAP_SIZE}): no notify_off_multiplier"
                    )
                _check_region(region, bar_size, 2, 2)
                (mult,) = struct.unpack_from("<I", cfg, pos + 16)
                if mult != 0 and (mult & (mult - 1) or mult < 2):
                    raise CapabilityError(
                        f"{name}: notify_off_multiplier {mult} is not 0 or an even power of 2"
                    )
            elif cfg_type == ISR_CFG:
                _check_region(region, bar_size, 1, 1)
            elif cfg_type == DEVICE_CFG:
                _check_region(region, bar_size, 4, 1)
        except CapabilityError as e:
            errors.setdefault(cfg_type, e)
            continue
        if cfg_type not in first:  # the first valid instance of each type
            first[cfg_type] = region
            if cfg_type == NOTIFY_CFG:
                notify_mult = struct.unpack_from("<I", cfg, pos + 16)[0]
    for required in (COMMON_CFG, NOTIFY_CFG, ISR_CFG):
        if required not in first:
            if required in errors:
                raise errors[required]
            extra = f" ({'; '.join(ignored)})" if ignored else ""
            raise CapabilityError(
                f"no {CAP_NAMES[required]} capability: not a modern (virtio 1.x) PCI device, "
                f"or a broken one{extra}"
            )
    if DEVICE_CFG not in first and DEVICE_CFG in errors:
        raise errors[DEVICE_CFG]
    assert notify_mult is not None
    return VirtioPciCaps(
        common=first[COMMON_CFG],
        notify=first[NOTIFY_CFG],
        notify_off_multiplier=notify_mult,
        isr=first[ISR_CFG],
        device=first.get(DEVICE_CFG),
        shared_memory=shm,
        ignored=ignored,
        pci_cfg=pci_cfg,
    )


def check_identity(fn: PciFunction, device_id: int | None = None) -> int:
    """Vendor/device ID check; returns the virtio device ID. `device_id` (a virtio
    device type such as 26) narrows the match."""
    vendor, dev = struct.unpack("<HH", fn.config_read(0, 4))
    if vendor == 0xFFFF:
        raise DeviceGoneError(f"{fn.name}: config space reads all ones (device gone?)")
    if vendor != VIRTIO_PCI_VENDOR or not VIRTIO_PCI_MODERN_FIRST <= dev <= VIRTIO_PCI_MODERN_LAST:
        kind = "a transitional/legacy virtio" if vendor == VIRTIO_PCI_VENDOR else "not a virtio"
        raise WrongDeviceError(
            f"{fn.name} is {vendor:04x}:{dev:04x}, {kind} device: a modern virtio function is "
            f"{VIRTIO_PCI_VENDOR:04x}:1040-107f"
            + (f" (virtio-fs: {VIRTIO_FS_PCI_DEVICE:04x})" if device_id == VIRTIO_ID_FS else "")
        )
    vid = dev - VIRTIO_PCI_MODERN_FIRST
    if device_id is not None and vid != device_id:
        raise WrongDeviceError(
            f"{fn.name} is virtio device type {vid} ({vendor:04x}:{dev:04x}), not type "
            f"{device_id}" + (" (virtio-fs, 1af4:105a)" if device_id == VIRTIO_ID_FS else "")
        )
    return vid


class _PagePool:
    """Hands out Arena buffers; small ones never straddle a 4 KiB page, so ring parts
    stay contiguous even when pages are not physically adjacent."""

    def __init__(self, arena: Arena, split_pages: bool) -> None:
        self.arena = arena
        self.split_pages = split_pages

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        if self.split_pages and 0 < size <= PAGE_SIZE:
            align = max(align, 1 << (size - 1).bit_length())
        return self.arena.alloc(size, align)

    def free(self, buf: DmaBuffer) -> None:
        self.arena.free(buf)


class VirtioPciTransport(Transport):
    status_is_register = True

    def __init__(
        self,
        fn: PciFunction,
        *,
        poll: bool = False,
        dma_size: int = DEFAULT_DMA_SIZE,
        device_id: int | None = None,
        close_function: bool = True,
    ) -> None:
        self.fn = fn
        self.name = f"virtio-pci:{fn.name}"
        self._closed = False
        self.virtio_id = check_identity(fn, device_id)
        self.caps = parse_capabilities(fn)
        c = self.caps
        self.common = fn.bar_window(
            c.common.bar, c.common.offset, min(c.common.length, COMMON_CFG_MAX), "common cfg"
        )
        self.notify_area = fn.bar_window(c.notify.bar, c.notify.offset, c.notify.length, "notify")
        self.isr = fn.bar_window(c.isr.bar, c.isr.offset, 1, "ISR")
        self.device_cfg: RegisterWindow | None = None
        if c.device is not None:
            self.device_cfg = fn.bar_window(
                c.device.bar, c.device.offset, min(c.device.length, DEVICE_CFG_MAX), "device cfg"
            )
        self.poll = poll
        self.dma_size = dma_size
        self.close_function = close_function
        self.features = 0
        self._dma: DmaMemoryLike | None = None
        self._pool: _PagePool | None = None
        self._vector_fds: list[int] = []
        self._queue_fd: dict[int, int | None] = {}
        self._notify: dict[int, tuple[int, int]] = {}  # queue -> (offset in notify area, data)
        self.config_vector: int | None = None
        self._msix_programmed = False
        self._gone: str | None = None
        self._lock = threading.RLock()  # queue_select and the queue fields go together

    # -- status --------------------------------------------------------------------------
    def get_status(self) -> int:
        return self.common.read8(DEVICE_STATUS)

    def set_status(self, status: int) -> None:
        self.common.write8(DEVICE_STATUS, status)

    def reset(self, timeout: float = 5.0) -> None:
        self.common.write8(DEVICE_STATUS, 0)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            status = self.common.read8(DEVICE_STATUS)
            if status == 0:
                break
            if status == 0xFF and self.common.read32(DEVICE_FEATURE_SELECT) == 0xFFFFFFFF:
                raise DeviceGoneError(f"{self.name}: registers read all ones (device gone)")
            if time.monotonic() > deadline:
                raise TransportError(
                    f"{self.name}: device status still {status:#x} {timeout:g}s after reset"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        # reset unmapped every vector and forgot the queues
        self._msix_programmed = False
        self._queue_fd.clear()
        self._notify.clear()
        self.features = 0

    # -- features -------------------------------------------------------------------------
    def device_features(self) -> int:
        bits = 0
        for sel in (0, 1):
            self.common.write32(DEVICE_FEATURE_SELECT, sel)
            bits |= self.common.read32(DEVICE_FEATURE) << (32 * sel)
        return bits

    def set_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common.write32(DRIVER_FEATURE_SELECT, sel)
            self.common.write32(DRIVER_FEATURE, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.features = features

    def transport_features(self, offered: int) -> int:
        """ACCESS_PLATFORM (the IOMMU is programmed either way) and NOTIF_CONFIG_DATA."""
        return offered & (Feature.ACCESS_PLATFORM | Feature.NOTIF_CONFIG_DATA)

    # -- device config ----------------------------------------------------------------------
    def config_generation(self) -> int:
        return self.common.read8(CONFIG_GENERATION)

    def read_config(self, offset: int, length: int) -> bytes:
        if self.device_cfg is None:
            raise ConfigError(f"{self.name}: the device has no device-specific configuration")
        if offset < 0 or offset + length > self.device_cfg.length:
            raise ConfigError(
                f"{self.name}: config read {offset}+{length} beyond the "
                f"{self.device_cfg.length}-byte device config"
            )
        return self.device_cfg.read_bytes(offset, length)

    # -- queues -----------------------------------------------------------------------------
    def num_queues(self) -> int:
        return self.common.read16(NUM_QUEUES)

    def _select(self, index: int) -> None:
        if not 0 <= index < self.num_queues():
            raise TransportError(
                f"{self.name}: queue {index} does not exist ({self.num_queues()} queues)"
            )
        self.common.write16(QUEUE_SELECT, index)

    def queue_max_size(self, index: int) -> int:
        if not 0 <= index < self.num_queues():
            return 0
        with self._lock:
            self.common.write16(QUEUE_SELECT, index)
            return self.common.read16(QUEUE_SIZE)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        with self._lock:
            self._setup_queue(index, size, addrs)

    def _setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        max_size = self.queue_max_size(index)
        if max_size == 0:
            raise TransportError(f"{self.name}: queue {index} is not available")
        if size <= 0 or size & (size - 1) or size > max_size:
            raise TransportError(
                f"{self.name}: queue {index} size {size} must be a power of 2 <= {max_size}"
            )
        self._select(index)
        if self.common.read16(QUEUE_ENABLE):
            raise TransportError(f"{self.name}: queue {index} is already enabled (reset first)")
        self.common.write16(QUEUE_SIZE, size)
        self.common.write64(QUEUE_DESC, addrs.desc)
        self.common.write64(QUEUE_DRIVER, addrs.avail)
        self.common.write64(QUEUE_DEVICE, addrs.used)
        self._queue_fd[index] = self._program_queue_vector(index)
        self._notify[index] = self._notify_location(index)

    def _notify_location(self, index: int) -> tuple[int, int]:
        width = 4 if self.features & Feature.NOTIFICATION_DATA else 2
        mult = self.caps.notify_off_multiplier
        if width == 4 and (mult % 4 or self.caps.notify.offset % 4):
            raise CapabilityError(
                f"{self.caps.notify.name}: with NOTIFICATION_DATA the offset "
                f"{self.caps.notify.offset:#x} and notify_off_multiplier {mult} must be "
                "multiples of 4"
            )
        off = self.common.read16(QUEUE_NOTIFY_OFF) * mult
        if off + width > self.notify_area.length:
            raise CapabilityError(
                f"{self.caps.notify.name}: queue {index} notify address {off:#x} (queue_notify_off"
                f" {off // mult if mult else 0} x multiplier {mult}) + {width} exceeds the notify "
                f"length {self.notify_area.length:#x}"
            )
        data = index
        if self.features & Feature.NOTIF_CONFIG_DATA:
            if self.common.length < QUEUE_NOTIF_CONFIG_DATA + 2:
                raise CapabilityError(
                    f"{self.caps.common.name}: too short ({self.common.length} bytes) for "
                    "queue_notif_config_data, but NOTIF_CONFIG_DATA was negotiated"
                )
            data = self.common.read16(QUEUE_NOTIF_CONFIG_DATA)
        return off, data

    def enable_queue(self, index: int) -> None:
        with self._lock:
            self._select(index)
            self.common.write16(QUEUE_ENABLE, 1)
            if self.common.read16(QUEUE_ENABLE) != 1:
                raise TransportError(f"{self.name}: queue {index} did not enable")

    def notify(self, index: int, data: int | None = None) -> None:
        try:
            off, value = self._notify[index]
        except KeyError:
            raise TransportError(
                f"{self.name}: notify on queue {index}, which is not set up"
            ) from None
        if self.features & Feature.NOTIFICATION_DATA:
            if data is None:
                raise TransportError(
                    f"{self.name}: NOTIFICATION_DATA was negotiated but notify() got no data"
                )
            self.notify_area.write32(off, (data & ~0xFFFF) | value)
        else:
            self.notify_area.write16(off, value)

    def native_kick(self, index: int) -> tuple[int, object, int, int] | None:
        """An MMIO store to the queue's notify address, when the notify area is
        mapped (not for pread/pwrite windows or NOTIFICATION_DATA)."""
        pointer = getattr(self.notify_area, "pointer", None)
        if pointer is None or index not in self._notify or (
                self.features & Feature.NOTIFICATION_DATA):
            return None
        off, value = self._notify[index]
        return (-1, pointer + off, value, 2)

    # -- interrupts --------------------------------------------------------------------------
    def _ensure_msix(self) -> None:
        if self._msix_programmed:
            return
        self._msix_programmed = True
        self.config_vector = None
        if self.poll:
            return
        if not self._vector_fds:
            avail = self.fn.msix_vectors()
            want = min(avail, self.num_queues() + 1)
            if want <= 0:
                log.info("%s: no MSI-X vectors: every queue is polled", self.name)
                return
            try:
                self._vector_fds = self.fn.enable_msix(want)
            except TransportError as e:
                log.warning("%s: MSI-X unavailable (%s): every queue is polled", self.name, e)
                return
            log.info("%s: %d MSI-X vectors (config + %d queues)", self.name, want, want - 1)
        self.common.write16(CONFIG_MSIX_VECTOR, 0)
        if self.common.read16(CONFIG_MSIX_VECTOR) == 0:
            self.config_vector = 0

    def _program_queue_vector(self, index: int) -> int | None:
        self._ensure_msix()
        vector = index + 1
        if self.poll or vector >= len(self._vector_fds):
            self.common.write16(QUEUE_MSIX_VECTOR, NO_VECTOR)
            return None
        self.common.write16(QUEUE_MSIX_VECTOR, vector)
        got = self.common.read16(QUEUE_MSIX_VECTOR)
        if got != vector:  # NO_VECTOR: the device could not map it; poll this queue
            self.common.write16(QUEUE_MSIX_VECTOR, NO_VECTOR)
            return None
        return self._vector_fds[vector]

    def interrupt_fd(self, index: int) -> int | None:
        return self._queue_fd.get(index)

    def config_fd(self) -> int | None:
        """eventfd of the configuration-change vector (None: no vector)."""
        return self._vector_fds[0] if self.config_vector == 0 and self._vector_fds else None

    def ack_interrupt(self, index: int) -> None:
        fd = self._queue_fd.get(index)
        if fd is not None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def read_isr(self) -> int:
        """Read (and so clear) the ISR status: bit 0 queue, bit 1 config change."""
        return self.isr.read8(0)

    def error_fd(self) -> int | None:
        return self.fn.request_fd()

    def check_alive(self) -> None:
        if self._gone is not None:
            raise DeviceGoneError(self._gone)
        fd = self.fn.request_fd()
        if fd is not None:
            try:
                if os.eventfd_read(fd):
                    self._gone = f"{self.name}: the host asked for the device back (unplug request)"
            except BlockingIOError:
                pass
        if self._gone is None and self.common.read8(DEVICE_STATUS) == 0xFF and (
            self.common.read32(DEVICE_FEATURE_SELECT) == 0xFFFFFFFF
        ):
            self._gone = f"{self.name}: registers read all ones (device gone)"
        if self._gone is not None:
            raise DeviceGoneError(self._gone)

    # -- memory -----------------------------------------------------------------------------
    @property
    def iova_mode(self) -> bool:
        return bool(self.features & Feature.ACCESS_PLATFORM) and self.fn.iommu_mode != "noiommu"

    def dma_pool(self) -> DmaPool:
        if self._closed:
            raise DeviceGoneError(f"{self.name}: transport is closed")
        if self._pool is None:
            self._dma = self.fn.alloc_dma(self.dma_size, iova=self.iova_mode)
            log.info(
                "%s: %d bytes of DMA memory, %s addresses (%s)", self.name, self.dma_size,
                "IOVA" if self.iova_mode else "physical", self.fn.iommu_mode,
            )
            first = self._dma.translate(0)[1]
            arena = Arena(self._dma.view, self._dma.translate, self._dma.pointer)
            self._pool = _PagePool(arena, split_pages=first < len(self._dma.view))
        return self._pool

    # -- shared memory -----------------------------------------------------------------------
    def shared_memory(self, shm_id: int) -> CapRegion | None:
        return self.caps.shared_memory.get(shm_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.common.write8(DEVICE_STATUS, 0)  # stop DMA before the memory goes
            deadline = time.monotonic() + 1.0
            while self.common.read8(DEVICE_STATUS) not in (0, 0xFF):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        except (TransportError, OSError):
            pass
        self.fn.disable_msix()
        self._vector_fds = []
        self._queue_fd.clear()
        if self._pool is not None:
            # buffers first: a view used after close then raises instead of faulting
            self._pool.arena.close()
            self._pool = None
        if self._dma is not None:
            self._dma.close()
            self._dma = None
        if self.close_function:
            self.fn.close()
        self._gone = f"{self.name}: transport is closed"


def open_pci(
    bdf: str,
    *,
    backend: str = "auto",
    bind: bool = True,
    poll: bool = False,
    dma_size: int = DEFAULT_DMA_SIZE,
    device_id: int | None = VIRTIO_ID_FS,
    allow_unpinned_4k: bool = False,
) -> VirtioPciTransport:
    """Open a virtio PCI function through VFIO (binding it to vfio-pci if asked) and
    return its transport. Whether the host may give the function away (a kernel
    mount of it) is the caller's to check: vfsdrv.tools.pci_functions.open_fs_function.
    `allow_unpinned_4k`: in no-IOMMU mode,
    accept DMA memory on 4 KiB pages when there are not enough huge pages (refused
    otherwise: such pages may move under the device)."""
    from ..pci.device import VfioPciDevice
    from ..pci.sysfs import normalize_bdf, require_root

    require_root()
    sysfs = Sysfs()
    bdf = normalize_bdf(bdf)
    dev = VfioPciDevice(bdf, backend=backend, sysfs=sysfs, bind=bind)
    dev.allow_unpinned_4k = allow_unpinned_4k
    try:
        return VirtioPciTransport(dev, poll=poll, dma_size=dma_size, device_id=device_id)
    except BaseException:
        dev.close()
        raise

