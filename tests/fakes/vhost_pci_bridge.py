"""An emulated virtio-pci function whose device model forwards to a vhost-user backend:
what QEMU's vhost-user-fs-pci does, in Python, for the tests.

No public device offers VIRTIO_FS_F_NOTIFICATION on PCI, so the driver's PCI transport
meets the reference device (`vfsdrv.refdev`) through this bridge:

    VirtioPciTransport --registers--> VhostPciFunction --vhost-user--> RefDevice
          (driver)          BAR4         (this model,              (device, its own
                                          QEMU's role)              session thread)

* The function is built by the PCI developer's builder (`make_function` in
  tests/test_pci_transport.py: config space with an MSI-X capability and the four
  virtio capabilities, BAR4 = common cfg 0x0000, ISR 0x1000, device cfg 0x2000,
  notify 0x3000 with multiplier 4). Its common cfg model is `BridgeCommonCfg`, a
  `CommonCfgModel` whose status, feature and queue writes become vhost-user messages.
* Guest memory: the bridge is a vhost-user frontend (`VhostUserTransport`) whose memfd
  is the function's DMA memory, so every device address the driver writes (ring
  parts, buffers) is a guest-physical address the backend translates with the
  SET_MEM_TABLE regions: one region with GPA == offset in the memfd, or (`regions`)
  up to 8 regions at scattered GPAs, so that buffers are not device-contiguous.
* Notify region: a write of a queue index at queue_notify_off * 4 signals that queue's
  kick eventfd (QEMU's ioeventfd); kicks written before DRIVER_OK stay pending in the
  eventfd until the backend gets it.
* MSI-X: the backend's call eventfd of a queue is the eventfd of the MSI-X vector the
  driver programmed for it (QEMU's irqfd), so the backend interrupts the driver
  directly. A queue without a vector (NO_VECTOR, polling) gets a bridge-owned eventfd
  that the ISR register reports (bit 0) and clears when read.
* Device config: reads of the device cfg region are forwarded as GET_CONFIG (one
  message per naturally sized access); beyond the backend's config they read all ones.
* Status: FEATURES_OK -> SET_FEATURES (driver features + VHOST_USER_F_PROTOCOL_FEATURES;
  a refusal clears FEATURES_OK); DRIVER_OK -> SET_MEM_TABLE once, then per enabled
  queue SET_VRING_NUM/ADDR/BASE/CALL/KICK, then SET_VRING_ENABLE (vhost_dev_start); a
  queue enabled after DRIVER_OK starts at once; with the STATUS protocol feature every
  status write is forwarded as SET_STATUS. Status 0 (reset) -> GET_VRING_BASE on every
  running ring (vhost_dev_stop), SET_STATUS 0, and the registers return to reset values.
  A failed start sets DEVICE_NEEDS_RESET.

IOMMU (`iommu=True`, QEMU's iommu_platform=on with a vIOMMU): VIRTIO_F_ACCESS_PLATFORM
is passed on from the backend (`vfsdrv refdev --access-platform`) and the function
reports an IOMMU (iommu_mode "type1"), so the driver asks for IOVA DMA memory. Each
block gets IOVAs at IOVA_BASE + its GPA (so scattered regions stay apart), told to
the backend with IOTLB_MSG UPDATEs when allocated, one per region (INVALIDATE when
freed); ring addresses go to the
backend as IOVAs, as QEMU sends them with an IOMMU. Without it ACCESS_PLATFORM is
not offered (QEMU's default).

`messages` records every vhost-user request the bridge sent, `kicks` the notify writes
per queue, `errors` every rule the driver broke at the register level.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

from test_pci_transport import CommonCfgModel, make_function
from vfsdrv._native import ffi
from vfsdrv.errors import TransportError, VfsdrvError
from vfsdrv.pci.emulated import EmulatedFunction
from vfsdrv.pci.errors import PciError
from vfsdrv.pci.function import DmaMemoryLike
from vfsdrv.virtio import pci as vp
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.constants import Feature, Status
from vfsdrv.virtio.vhost_user import (
    IOTLB_ACCESS_RW,
    IOTLB_INVALIDATE,
    IOTLB_MSG,
    IOTLB_UPDATE,
    VhostUserTransport,
)

log = logging.getLogger(__name__)

#: where the BAR4 regions are (tests/test_pci_transport.py standard_caps)
ISR_OFFSET, DEVICE_CFG_OFFSET, NOTIFY_OFFSET, REGION_SIZE = 0x1000, 0x2000, 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
#: first memfd offset handed out as DMA memory (GPA 0 is never a buffer)
DMA_BASE = 0x10_0000
#: lowest GPA of a scattered memory layout (regions > 1)
SCATTER_GPA = 0x1_0000_0000
QUEUE_MAX_SIZE = 1024
#: IOVA of memfd offset 0 with `iommu=True`: apart from every GPA and from the
#: vhost-user transport's own IOVA_BASE
IOVA_BASE = 0xFE_0000_0000


class BridgeFrontend(VhostUserTransport):
    """The bridge's vhost-user side: the handshake, SET_MEM_TABLE and GET_CONFIG come
    from `VhostUserTransport`; rings are started with fds chosen by the bridge."""

    def __init__(self, socket_path: str, memory_size: int, record: list[str],
                 regions: int = 1) -> None:
        self.record = record
        if regions < 1 or memory_size % (regions * 4096):
            raise ValueError("the memory must split into whole pages per region")
        chunk = memory_size // regions
        if regions == 1:
            self.layout = [(0, 0, memory_size)]  # (GPA, memfd offset, size): GPA == offset
        else:  # regions in reverse order with gaps: never adjacent in GPA space
            self.layout = [(SCATTER_GPA + (regions - 1 - i) * 2 * chunk, i * chunk, chunk)
                           for i in range(regions)]
        super().__init__(socket_path, memory_size=memory_size)

    def _send_memory_table(self) -> None:
        body = b"".join(vu.MEM_REGION.pack(gpa, size, self._va + off, off)
                        for gpa, off, size in self.layout)
        self._send(vu.Request.SET_MEM_TABLE, vu.MEM_TABLE_HEAD.pack(len(self.layout), 0) + body,
                   (self._memfd,) * len(self.layout))
        self._memory_sent = True

    def gpa(self, offset: int) -> tuple[int, int]:
        """(GPA of memfd `offset`, bytes GPA-contiguous from there)."""
        for gpa, off, size in self.layout:
            if off <= offset < off + size:
                return gpa + offset - off, off + size - offset
        raise PciError(f"memfd offset {offset:#x} outside the guest memory")

    def user_addr(self, gpa: int, length: int) -> int | None:
        """Our virtual address of GPA range [gpa, gpa+length) inside one region."""
        for base, off, size in self.layout:
            if base <= gpa and gpa + length <= base + size:
                return self._va + off + gpa - base
        return None

    def _send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        self.record.append(vu.Request(request).name)
        super()._send(request, payload, fds)

    def _call(self, request: int, payload: bytes = b"") -> bytes:
        self.record.append(vu.Request(request).name)
        return super()._call(request, payload)

    @property
    def memory(self) -> memoryview:
        return memoryview(self._mm)

    @property
    def memory_size(self) -> int:
        return self._memory_size

    def start_ring(self, index: int, size: int, desc: int, avail: int, used: int,
                   kick: int, call: int) -> None:
        """vhost_virtqueue_start: ring addresses (frontend virtual addresses)."""
        if not self._memory_sent:
            self._send_memory_table()
        self._send(vu.Request.SET_VRING_NUM, vu.VRING_STATE.pack(index, size))
        self._send(vu.Request.SET_VRING_ADDR,
                   vu.VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self._send(vu.Request.SET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
        self.set_call(index, call)
        self._send(vu.Request.SET_VRING_KICK, vu.U64.pack(index), (kick,))

    def set_call(self, index: int, fd: int) -> None:
        self._send(vu.Request.SET_VRING_CALL, vu.U64.pack(index), (fd,))

    def enable_ring(self, index: int) -> None:
        if self._features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self._send(vu.Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1))

    def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where it stopped."""
        data = self._call(vu.Request.GET_VRING_BASE, vu.VRING_STATE.pack(index, 0))
        if len(data) != vu.VRING_STATE.size:
            raise TransportError(f"{self.name}: GET_VRING_BASE reply of {len(data)} bytes")
        return vu.VRING_STATE.unpack(data)[1]

    @property
    def protocol_feature_bit(self) -> int:
        return self._features & vu.VHOST_USER_F_PROTOCOL_FEATURES

    def va(self, offset: int) -> int:
        """Our virtual address of memfd `offset` (what IOTLB updates map to)."""
        return self._va + offset

    def iotlb(self, iova: int, size: int, uaddr: int, kind: int) -> None:
        """An IOTLB_MSG to the backend (after the memory table, which it refers to)."""
        if not self._memory_sent:
            self._send_memory_table()
        self._send(vu.Request.IOTLB_MSG, IOTLB_MSG.pack(iova, size, uaddr, IOTLB_ACCESS_RW, kind))


class SharedDma(DmaMemoryLike):
    """A piece of the bridge's memfd at `start`; device addresses are its GPAs."""

    def __init__(self, frontend: BridgeFrontend, start: int, size: int,
                 iova: bool = False) -> None:
        self.frontend, self.start, self.size, self.iova = frontend, start, size, iova
        self.view = frontend.memory[start : start + size]
        self.pointer = ffi.cast("char *", ffi.from_buffer(self.view))
        self.closed = False
        if iova:  # the vIOMMU maps the block: the backend hears of it at once
            for io, n, pos in self._pieces():
                frontend.iotlb(io, n, frontend.va(pos), IOTLB_UPDATE)

    def _pieces(self) -> list[tuple[int, int, int]]:
        """(IOVA, length, memfd offset) of the block, one per memory region it spans."""
        out, pos, end = [], self.start, self.start + self.size
        while pos < end:
            gpa, run = self.frontend.gpa(pos)
            n = min(run, end - pos)
            out.append((IOVA_BASE + gpa, n, pos))
            pos += n
        return out

    def translate(self, offset: int) -> tuple[int, int]:
        if not 0 <= offset < self.size:
            raise PciError(f"offset {offset:#x} outside the bridge's DMA block")
        gpa, run = self.frontend.gpa(self.start + offset)
        # IOVA = IOVA_BASE + GPA: as far apart as the regions, so no buffer the device
        # must find in one region runs across two
        return (IOVA_BASE if self.iova else 0) + gpa, min(run, self.size - offset)

    def close(self) -> None:
        if self.iova and not self.closed and not self.frontend._closed:
            try:
                for io, n, _ in self._pieces():
                    self.frontend.iotlb(io, n, 0, IOTLB_INVALIDATE)
            except (VfsdrvError, OSError) as exc:
                log.debug("IOTLB invalidate: %s", exc)
        self.closed = True


class BridgeCommonCfg(CommonCfgModel):
    """virtio_pci_common_cfg (the PCI developer's model) with the device behind it."""

    def __init__(self, bridge: VhostPciFunction, **kw) -> None:
        self.bridge = bridge
        super().__init__(**kw)

    def read(self, off: int, width: int) -> int:
        if off == vp.DEVICE_STATUS and width == 1 and not self.gone:
            return self.bridge.status_read()
        return super().read(off, width)

    def write(self, off: int, width: int, value: int) -> None:
        if off == vp.DEVICE_STATUS:
            self.bridge.status_write(value)
            return
        super().write(off, width, value)
        if off == vp.QUEUE_ENABLE and value == 1:
            self.bridge.queue_enabled(self.select)


class _Region:
    """A BAR4 range served by two callables."""

    def __init__(self, read: Callable[[int, int], int],
                 write: Callable[[int, int, int], None]) -> None:
        self._read, self._write = read, write

    def read(self, off: int, width: int) -> int:
        return self._read(off, width)

    def write(self, off: int, width: int, value: int) -> None:
        self._write(off, width, value)


class VhostPciFunction(EmulatedFunction):
    """A virtio-fs PCI function (1af4:105a) backed by a vhost-user device."""

    def __init__(self, socket_path: str, *, memory_size: int = 64 << 20,
                 queue_max_size: int = QUEUE_MAX_SIZE, msix_vectors: int | None = None,
                 refuse_vectors: frozenset[int] = frozenset(), regions: int = 1,
                 iommu: bool = False) -> None:
        """`msix_vectors`: size of the MSI-X table (default: config + one per queue;
        QEMU's vhost-user-fs-pci has num_request_queues + 2); `refuse_vectors`: vectors
        a queue_msix_vector write gets NO_VECTOR for (an interrupt routing failure);
        `regions` > 1: the memfd goes to the backend as that many memory regions whose
        GPAs are out of order and apart, so DMA memory is not device-contiguous (as
        pinned pages are in VFIO no-IOMMU mode) and buffers split into segments.
        `iommu`: behind a vIOMMU, ACCESS_PLATFORM passed on (see the module docstring)."""
        self.messages: list[str] = []
        self.kicks: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self.vring_bases: dict[int, int] = {}  # what GET_VRING_BASE said at the last stop
        self.config_reads = 0
        self._mutex = threading.RLock()  # one vhost-user conversation at a time
        self.backend = BridgeFrontend(socket_path, memory_size, self.messages, regions)
        try:
            nq = self.backend.num_queues()
            if nq <= 0 or not self.backend.has_config_space:
                raise TransportError("the backend must offer MQ and CONFIG (the refdev does)")
            # split rings only, as QEMU's vhost-user-fs-pci without packed=on;
            # ACCESS_PLATFORM only behind an IOMMU (iommu_platform=on)
            offered = self.backend.device_features() & ~(
                vu.VHOST_USER_F_PROTOCOL_FEATURES | Feature.RING_PACKED
                | (0 if iommu else Feature.ACCESS_PLATFORM))
            vectors = nq + 1 if msix_vectors is None else msix_vectors
            self.common = BridgeCommonCfg(
                self, num_queues=nq, max_size=queue_max_size, features=offered,
                msix_table=vectors, refuse_vectors=refuse_vectors,
            )
            fn, _, bar4 = make_function(model=self.common, msix=vectors, tag=b"not-the-tag")
        except BaseException:
            self.backend.close()
            raise
        super().__init__(fn.config, fn.bars, msix_vectors=vectors,
                         iommu_mode="type1" if iommu else "noiommu")
        self.iommu = iommu
        self.name = f"vhost-pci-bridge:{socket_path}"
        self.bar4 = bar4
        bar4.attach(ISR_OFFSET, REGION_SIZE, _Region(self._isr_read, self._ignore))
        bar4.attach(DEVICE_CFG_OFFSET, REGION_SIZE, _Region(self._config_read, self._config_write))
        bar4.attach(NOTIFY_OFFSET, REGION_SIZE, _Region(self._notify_read, self._notify_write))
        self.config_len = 44  # struct virtio_fs_config with notify_buf_size
        self._kick = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq)]
        self._intx = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq)]
        self._vector: dict[int, int] = {}  # running queue -> the vector programmed for it
        self._dma_next = DMA_BASE
        self._config_isr = False
        self.num_queues = nq

    # -- status, features, queues -----------------------------------------------------
    @property
    def running(self) -> list[int]:
        return sorted(self._vector)

    def status_read(self) -> int:
        """With the STATUS protocol feature the backend keeps the status: GET_STATUS
        (plus DEVICE_NEEDS_RESET, which only the bridge sets); else the register."""
        m = self.common
        with self._mutex:
            if self.backend.has_status and not self.closed:
                try:
                    backend = self.backend.get_status()
                except (VfsdrvError, OSError) as exc:
                    self.errors.append(f"backend: GET_STATUS: {exc}")
                else:
                    m.status = backend | (m.status & Status.DEVICE_NEEDS_RESET)
            return CommonCfgModel.read(m, vp.DEVICE_STATUS, 1)

    def status_write(self, value: int) -> None:
        m = self.common
        with self._mutex:
            if value == 0:
                self._stop()
                CommonCfgModel.write(m, vp.DEVICE_STATUS, 1, 0)  # registers to reset values
                for fd in self._kick + self._intx:
                    _drain(fd)
                return
            old = m.status
            CommonCfgModel.write(m, vp.DEVICE_STATUS, 1, value)  # clears FEATURES_OK if unoffered
            new = m.status
            if old & ~new & 0xFF:
                self.errors.append(f"status {old:#x} -> {new:#x} clears bits without a reset")
            try:
                if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
                    self.backend.set_driver_features(
                        m.driver_features | self.backend.protocol_feature_bit
                    )
                if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
                    if not new & Status.FEATURES_OK:
                        self.errors.append("DRIVER_OK without FEATURES_OK")
                    self._start()
            except (VfsdrvError, OSError) as exc:
                log.error("%s: backend refused (%s)", self.name, exc)
                self.errors.append(f"backend: {exc}")
                if new & Status.DRIVER_OK:
                    m.status |= Status.DEVICE_NEEDS_RESET
                else:
                    m.status &= ~Status.FEATURES_OK
            if self.backend.has_status:
                try:
                    self.backend.set_status(m.status)
                except (VfsdrvError, OSError) as exc:
                    self.errors.append(f"backend: SET_STATUS: {exc}")

    def _start(self) -> None:
        """vhost_dev_start: every enabled queue goes to the backend, then the enables."""
        m = self.common
        started = []
        for index in range(self.num_queues):
            if m.q[index]["enable"]:
                self._start_ring(index)
                started.append(index)
        for index in started:
            self.backend.enable_ring(index)

    def queue_enabled(self, index: int) -> None:
        with self._mutex:
            if not self.common.status & Status.DRIVER_OK or index in self._vector:
                return
            try:
                self._start_ring(index)
                self.backend.enable_ring(index)
            except (VfsdrvError, OSError) as exc:
                self.errors.append(f"backend: {exc}")
                self.common.status |= Status.DEVICE_NEEDS_RESET

    def _start_ring(self, index: int) -> None:
        q = self.common.q[index]
        size = q["size"]
        if size <= 0 or size & (size - 1) or size > self.common.max_size:
            raise TransportError(f"queue {index}: size {size} is not a power of 2 <= max")
        va = {}
        iova = bool(self.common.driver_features & Feature.ACCESS_PLATFORM)
        for part, length in (("desc", 16 * size), ("driver", 6 + 2 * size),
                             ("device", 6 + 8 * size)):
            # with ACCESS_PLATFORM the backend gets the IOVAs (its IOTLB translates)
            va[part] = q[part] if iova else self.backend.user_addr(q[part], length)
            if va[part] is None:
                raise TransportError(
                    f"queue {index}: {part} at {q[part]:#x}+{length:#x} is not inside one "
                    "region of guest memory"
                )
        self._vector[index] = q["vector"]
        self.backend.start_ring(index, size, va["desc"], va["driver"], va["device"],
                                self._kick[index], self._call_fd(index))
        self.messages.append(f"queue {index} call {self.route(index)}")

    def route(self, index: int) -> str:
        """Where the backend's calls of a running queue go: 'msix N' or 'isr'."""
        v = self._vector[index]
        return f"msix {v}" if v < len(self.msix_fds) else "isr"

    def _call_fd(self, index: int) -> int:
        v = self._vector[index]
        return self.msix_fds[v] if v < len(self.msix_fds) else self._intx[index]

    def _reroute(self) -> None:
        if self.closed:
            return
        for index in self.running:
            self.backend.set_call(index, self._call_fd(index))

    def _stop(self) -> None:
        """vhost_dev_stop."""
        for index in self.running:
            try:
                self.vring_bases[index] = self.backend.stop_ring(index)
            except (VfsdrvError, OSError) as exc:
                self.errors.append(f"backend: GET_VRING_BASE({index}): {exc}")
        self._vector.clear()
        if self.backend.has_status:
            try:
                self.backend.set_status(0)
            except (VfsdrvError, OSError) as exc:
                self.errors.append(f"backend: SET_STATUS 0: {exc}")

    def device_error(self) -> None:
        """The device breaks as QEMU's virtio_error() has it: the rings stop, status
        gets DEVICE_NEEDS_RESET, and a configuration change is signalled (config
        vector, or ISR bit 1 without one) as virtio 1.2 2.1.2 requires after DRIVER_OK."""
        with self._mutex:
            self._stop()
            self.common.status |= Status.DEVICE_NEEDS_RESET
            self._config_isr = True
            if self.common.config_vector < len(self.msix_fds):
                self.fire(self.common.config_vector)

    # -- MSI-X: re-route the backend's calls when vectors change (irqfd) ---------------
    def enable_msix(self, count: int) -> list[int]:
        fds = super().enable_msix(count)
        with self._mutex:
            self._reroute()
        return fds

    def disable_msix(self) -> None:
        had = bool(self.msix_fds)
        super().disable_msix()
        if had and getattr(self, "_vector", None):
            with self._mutex:
                self._reroute()  # the vectors' eventfds are gone: back to the ISR

    # -- ISR, device config, notify ----------------------------------------------------
    def _isr_read(self, off: int, width: int) -> int:
        if off != 0:
            return 0
        pending = 2 if self._config_isr else 0
        self._config_isr = False
        for index in self.running:
            if self.route(index) == "isr" and _drain(self._intx[index]):
                pending |= 1
        return pending  # reading clears it

    def _ignore(self, off: int, width: int, value: int) -> None:
        self.errors.append(f"write to read-only register at BAR4+{off:#x}")

    def _config_read(self, off: int, width: int) -> int:
        if off + width > self.config_len:
            return (1 << (8 * width)) - 1  # as QEMU: outside the config reads all ones
        with self._mutex:
            self.config_reads += 1
            data = self.backend.read_config(off, width)
        return int.from_bytes(data, "little")

    def _config_write(self, off: int, width: int, value: int) -> None:
        self.errors.append(f"driver wrote the virtio-fs config at {off:#x} (it is read-only)")

    def _notify_read(self, off: int, width: int) -> int:
        return 0

    def _notify_write(self, off: int, width: int, value: int) -> None:
        index, rest = divmod(off, NOTIFY_MULTIPLIER)
        if rest or width != 2 or not 0 <= index < self.num_queues:
            self.errors.append(f"notify write of {width} bytes at {off:#x}")
            return
        if value != index:
            self.errors.append(f"notify of queue {index} carries {value}")
            return
        self.kicks[index] += 1
        os.eventfd_write(self._kick[index], 1)

    # -- memory and teardown ---------------------------------------------------------
    def alloc_dma(self, size: int, iova: bool) -> SharedDma:
        if iova and not self.iommu:
            raise PciError("the bridge has no IOMMU (ACCESS_PLATFORM is not offered)")
        size = (size + 4095) & ~4095
        if all(d.closed for d in self.dma):
            self._dma_next = DMA_BASE  # every earlier block was given back
        if self._dma_next + size > self.backend.memory_size:
            raise PciError(f"{size} bytes of DMA memory do not fit in the bridge's memfd")
        with self._mutex:
            dma = SharedDma(self.backend, self._dma_next, size, iova)
        self._dma_next += size
        self.dma.append(dma)  # type: ignore[arg-type]
        return dma

    def close(self) -> None:
        if self.closed:
            return
        with self._mutex:
            self._stop()
            super().close()
            self.backend.close()
            for fd in self._kick + self._intx:
                os.close(fd)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
