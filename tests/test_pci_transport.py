"""The virtio-pci transport against an emulated PCI function (no VFIO).

The emulated function has a real config space with a capability list and a BAR
whose common-cfg range is served by `CommonCfgModel`, a model of the virtio
common configuration registers that also insists on natural-width accesses.
Covers every malformed-capability case, the common-cfg register protocol,
MSI-X vector programming with read-back, notifications, device config, the
virtio-fs tag helper, and DMA pools.
"""

from __future__ import annotations

import os
import select
import struct

import pytest
from vfsdrv.errors import CapabilityError, ConfigError, DeviceGoneError, TransportError
from vfsdrv.pci.emulated import ConfigSpace, EmulatedBar, EmulatedFunction
from vfsdrv.pci.errors import DeviceBusyError, PciError, WrongDeviceError
from vfsdrv.tools import pci_functions as pf
from vfsdrv.virtio import pci as vp
from vfsdrv.virtio.constants import Feature, Status
from vfsdrv.virtio.device import VirtioDevice
from vfsdrv.virtio.transport import QueueAddresses

VERSION_1 = 1 << 32
FIELD_WIDTH = {
    0x00: 4, 0x04: 4, 0x08: 4, 0x0C: 4, 0x10: 2, 0x12: 2, 0x14: 1, 0x15: 1, 0x16: 2,
    0x18: 2, 0x1A: 2, 0x1C: 2, 0x1E: 2, 0x20: 4, 0x24: 4, 0x28: 4, 0x2C: 4, 0x30: 4,
    0x34: 4, 0x38: 2, 0x3A: 2,
}
READ_ONLY = {0x04, 0x12, 0x15, 0x1E, 0x38}


class CommonCfgModel:
    """virtio_pci_common_cfg semantics (virtio 1.2 4.1.4.3), as a device would."""

    def __init__(self, num_queues: int = 3, max_size: int = 256,
                 features: int = VERSION_1 | Feature.ACCESS_PLATFORM,
                 msix_table: int = 8, reset_delay: int = 0,
                 refuse_vectors: frozenset[int] = frozenset(),
                 notify_off: dict[int, int] | None = None,
                 notif_config_data: dict[int, int] | None = None) -> None:
        self.num_queues, self.max_size, self.features = num_queues, max_size, features
        self.msix_table, self.reset_delay = msix_table, reset_delay
        self.refuse_vectors = refuse_vectors
        self.notify_off = notify_off or {i: i for i in range(num_queues)}
        self.notif_config_data = notif_config_data or {i: 0x100 + i for i in range(num_queues)}
        self.gone = False
        self.generation = 0
        self._reset()
        self.width_errors: list[str] = []

    def _reset(self) -> None:
        self.status = 0
        self.dfselect = self.gfselect = 0
        self.driver_features = 0
        self.select = 0
        self.config_vector = vp.NO_VECTOR
        self.q = {i: {"size": self.max_size, "vector": vp.NO_VECTOR, "enable": 0, "desc": 0,
                      "driver": 0, "device": 0} for i in range(self.num_queues)}
        self._pending_reset = 0

    def _check(self, off: int, width: int) -> None:
        base = off & ~3 if FIELD_WIDTH.get(off) is None and off & ~3 in FIELD_WIDTH else off
        if FIELD_WIDTH.get(base) != width:
            self.width_errors.append(f"{width}-byte access at {off:#x}")

    def _queue(self) -> dict[str, int] | None:
        return self.q.get(self.select)

    def read(self, off: int, width: int) -> int:
        if self.gone:
            return (1 << (8 * width)) - 1
        self._check(off, width)
        q = self._queue()
        if off == 0x00:
            return self.dfselect
        if off == 0x04:
            return (self.features >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if off == 0x08:
            return self.gfselect
        if off == 0x0C:
            return (self.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF
        if off == 0x10:
            return self.config_vector
        if off == 0x12:
            return self.num_queues
        if off == 0x14:
            if self._pending_reset:
                self._pending_reset -= 1
                return self.status or 1
            return self.status
        if off == 0x15:
            return self.generation
        if off == 0x16:
            return self.select
        if q is None:
            return 0
        if off == 0x18:
            return q["size"]
        if off == 0x1A:
            return q["vector"]
        if off == 0x1C:
            return q["enable"]
        if off == 0x1E:
            return self.notify_off[self.select]
        if off == 0x38:
            return self.notif_config_data[self.select]
        for base, name in ((0x20, "desc"), (0x28, "driver"), (0x30, "device")):
            if off == base:
                return q[name] & 0xFFFFFFFF
            if off == base + 4:
                return q[name] >> 32
        return 0

    def write(self, off: int, width: int, value: int) -> None:
        self._check(off, width)
        if off in READ_ONLY:
            self.width_errors.append(f"write to read-only field {off:#x}")
            return
        q = self._queue()
        if off == 0x00:
            self.dfselect = value
        elif off == 0x08:
            self.gfselect = value
        elif off == 0x0C:
            shift = 32 * self.gfselect
            keep = self.driver_features & ~(0xFFFFFFFF << shift)
            self.driver_features = keep | (value << shift)
        elif off == 0x10:
            self.config_vector = value if value < self.msix_table else vp.NO_VECTOR
        elif off == 0x14:
            if value == 0:
                self._reset()
                self._pending_reset = self.reset_delay
            else:
                if value & Status.FEATURES_OK and self.driver_features & ~self.features:
                    value &= ~Status.FEATURES_OK
                self.status = value
        elif off == 0x16:
            self.select = value
        elif q is None:
            return
        elif off == 0x18:
            q["size"] = value
        elif off == 0x1A:
            ok = value < self.msix_table and value not in self.refuse_vectors
            q["vector"] = value if ok else vp.NO_VECTOR
        elif off == 0x1C:
            q["enable"] = value
        else:
            for base, name in ((0x20, "desc"), (0x28, "driver"), (0x30, "device")):
                if off == base:
                    q[name] = (q[name] & ~0xFFFFFFFF) | value
                elif off == base + 4:
                    q[name] = (q[name] & 0xFFFFFFFF) | (value << 32)


def vcap(cfg_type: int, bar: int, offset: int, length: int, *, cap_len: int = 16,
         cap_id: int = 0, extra: bytes = b"") -> bytes:
    """Body of a virtio vendor capability (after cap_vndr and cap_next)."""
    head = bytes([cap_len, cfg_type, bar, cap_id, 0, 0])
    return head + struct.pack("<II", offset, length) + extra


def standard_caps(mult: int = 4) -> list[bytes]:
    return [
        vcap(vp.COMMON_CFG, 4, 0x0000, 0x1000),
        vcap(vp.ISR_CFG, 4, 0x1000, 0x1000),
        vcap(vp.DEVICE_CFG, 4, 0x2000, 0x1000),
        vcap(vp.NOTIFY_CFG, 4, 0x3000, 0x1000, cap_len=20, extra=struct.pack("<I", mult)),
    ]


def make_function(caps: list[bytes] | None = None, *, model: CommonCfgModel | None = None,
                  device: int = 0x105A, vendor: int = 0x1AF4, bar_size: int = 0x4000,
                  msix: int = 8, tag: bytes = b"myfs", iommu_mode: str = "noiommu",
                  scatter: bool = False) -> tuple[EmulatedFunction, CommonCfgModel, EmulatedBar]:
    cs = ConfigSpace(vendor, device)
    if msix:
        cs.add_msix(msix, table_bar=1, table_offset=0, pba_bar=1, pba_offset=0x800)
    for body in caps if caps is not None else standard_caps():
        cs.add_capability(0x09, body)
    model = model or CommonCfgModel()
    bar4 = EmulatedBar(bar_size, "BAR4")
    bar4.attach(0, 0x40, model)
    raw_tag = tag.ljust(36, b"\0") if len(tag) <= 36 else tag[:36]
    bar4.mem[0x2000:0x2028] = raw_tag + struct.pack("<I", 1)
    fn = EmulatedFunction(cs, {1: EmulatedBar(0x1000, "BAR1"), 4: bar4}, msix_vectors=msix,
                          iommu_mode=iommu_mode, scatter_dma=scatter)
    return fn, model, bar4


# -- capability parsing ---------------------------------------------------------------------


def test_standard_layout_parses() -> None:
    fn, _, _ = make_function()
    caps = vp.parse_capabilities(fn)
    assert (caps.common.bar, caps.common.offset, caps.common.length) == (4, 0, 0x1000)
    assert (caps.isr.offset, caps.device.offset, caps.notify.offset) == (0x1000, 0x2000, 0x3000)
    assert caps.notify_off_multiplier == 4
    assert caps.shared_memory == {}


BAD_CAPS = [
    # (description, capability list, expected words in the error)
    ("cap_len shorter than virtio_pci_cap",
     [vcap(vp.COMMON_CFG, 4, 0, 0x1000, cap_len=12)] + standard_caps()[1:],
     ["common cfg capability at", "cap_len 12"]),
    ("common cfg offset misaligned",
     [vcap(vp.COMMON_CFG, 4, 0x2, 0x100)] + standard_caps()[1:],
     ["common cfg", "not 4-byte aligned"]),
    ("common cfg too short",
     [vcap(vp.COMMON_CFG, 4, 0, 0x20)] + standard_caps()[1:],
     ["common cfg", "length 32", "minimum of 56"]),
    ("common cfg beyond the BAR",
     [vcap(vp.COMMON_CFG, 4, 0x3F00, 0x1000)] + standard_caps()[1:],
     ["common cfg", "BAR4 is only 0x4000", "BAR too small"]),
    ("offset + length wraps 32 bits",
     [vcap(vp.COMMON_CFG, 4, 0xFFFFF000, 0x2000)] + standard_caps()[1:],
     ["common cfg", "overflows 32 bits"]),
    ("BAR not implemented",
     [vcap(vp.COMMON_CFG, 2, 0, 0x100)] + standard_caps()[1:],
     ["common cfg", "BAR2 is not implemented"]),
    ("reserved BAR only",
     [vcap(vp.COMMON_CFG, 7, 0, 0x100)] + standard_caps()[1:],
     ["no common cfg capability", "reserved BAR 7"]),
    ("notify misaligned",
     standard_caps()[:3] + [vcap(vp.NOTIFY_CFG, 4, 0x3001, 0x100, cap_len=20,
                                 extra=struct.pack("<I", 4))],
     ["notify cfg", "not 2-byte aligned"]),
    ("notify cap without multiplier",
     standard_caps()[:3] + [vcap(vp.NOTIFY_CFG, 4, 0x3000, 0x100)],
     ["notify cfg", "cap_len 16", "notify_off_multiplier"]),
    ("notify multiplier not a power of two",
     standard_caps(mult=6), ["notify_off_multiplier 6"]),
    ("notify multiplier 1",
     standard_caps(mult=1), ["notify_off_multiplier 1"]),
    ("ISR of length 0",
     [standard_caps()[0], vcap(vp.ISR_CFG, 4, 0x1000, 0)] + standard_caps()[2:],
     ["ISR cfg", "length 0", "minimum of 1"]),
    ("ISR missing",
     [standard_caps()[0]] + standard_caps()[2:], ["no ISR cfg capability"]),
    ("device cfg misaligned",
     standard_caps()[:2] + [vcap(vp.DEVICE_CFG, 4, 0x2002, 0x100)] + standard_caps()[3:],
     ["device cfg", "not 4-byte aligned"]),
    ("cap_len runs past config space", None, ["runs past the config space"]),
    ("shared memory cap too short",
     standard_caps() + [vcap(vp.SHARED_MEMORY_CFG, 4, 0, 0x100)],
     ["shared memory", "virtio_pci_cap64"]),
    ("shared memory beyond its BAR (64-bit length)",
     standard_caps() + [vcap(vp.SHARED_MEMORY_CFG, 4, 0, 0, cap_len=24,
                             extra=struct.pack("<II", 0, 1))],
     ["shared memory", "BAR4 is only"]),
    ("shared memory 64-bit overflow",
     standard_caps() + [vcap(vp.SHARED_MEMORY_CFG, 4, 0xFFFFFFFF, 0xFFFFFFFF, cap_len=24,
                             extra=struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF))],
     ["overflows 64 bits"]),
    ("shared memory id twice",
     standard_caps() + [vcap(vp.SHARED_MEMORY_CFG, 4, 0, 0x100, cap_len=24, extra=bytes(8)),
                        vcap(vp.SHARED_MEMORY_CFG, 4, 0x100, 0x100, cap_len=24, extra=bytes(8))],
     ["shared memory id 0 is used twice"]),
]


@pytest.mark.parametrize("desc,caps,words", BAD_CAPS, ids=[c[0] for c in BAD_CAPS])
def test_malformed_capability(desc: str, caps: list[bytes] | None, words: list[str]) -> None:
    if caps is None:  # a capability whose cap_len claims more than fits in config space
        fn, _, _ = make_function([])
        cs = ConfigSpace(0x1AF4, 0x105A)
        for body in standard_caps():
            cs.add_capability(0x09, body)
        cs.add_capability(0x09, vcap(vp.COMMON_CFG, 4, 0, 0x100, cap_len=200), at=0xE0)
        fn.config[:] = cs.data
    else:
        fn, _, _ = make_function(caps)
    with pytest.raises(CapabilityError) as err:
        vp.parse_capabilities(fn)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    # the transport refuses the function for the same reason, before touching registers
    with pytest.raises(CapabilityError):
        vp.VirtioPciTransport(fn)


def test_capability_list_loop_is_an_error() -> None:
    fn, _, _ = make_function()
    last = fn.config[0x34]
    while fn.config[last + 1]:
        last = fn.config[last + 1]
    fn.config[last + 1] = fn.config[0x34]  # back to the first: a loop
    with pytest.raises(CapabilityError, match="loop"):
        vp.parse_capabilities(fn)


def test_capability_pointer_into_header_is_an_error() -> None:
    fn, _, _ = make_function()
    fn.config[0x34] = 0x10
    with pytest.raises(CapabilityError, match="outside 0x40"):
        vp.parse_capabilities(fn)


def test_first_valid_instance_wins_and_reserved_types_are_ignored() -> None:
    caps = [vcap(6, 4, 0, 0x100),  # reserved cfg_type: ignored
            vcap(vp.COMMON_CFG, 9, 0, 0x100),  # reserved BAR: ignored
            vcap(vp.COMMON_CFG, 4, 0x800, 0x40)] + standard_caps()
    fn, _, _ = make_function(caps)
    parsed = vp.parse_capabilities(fn)
    assert parsed.common.offset == 0x800
    assert any("reserved cfg_type" in i for i in parsed.ignored)
    assert any("reserved BAR 9" in i for i in parsed.ignored)


def test_larger_cap_len_is_accepted() -> None:
    caps = standard_caps()
    caps[0] = vcap(vp.COMMON_CFG, 4, 0, 0x1000, cap_len=32, extra=bytes(16))
    fn, _, _ = make_function(caps)
    assert vp.parse_capabilities(fn).common.length == 0x1000


def test_shared_memory_region_64bit() -> None:
    caps = standard_caps() + [vcap(vp.SHARED_MEMORY_CFG, 2, 0, 0x10_0000, cap_len=24,
                                   extra=struct.pack("<II", 1, 0))]
    fn, _, _ = make_function(caps)
    fn.bars[2] = EmulatedBar(0x2_0000_0000 // 4096, "BAR2")  # object only needs .length
    fn.bars[2].length = 0x2_0000_0000
    shm = vp.parse_capabilities(fn).shared_memory[0]
    assert (shm.bar, shm.offset, shm.length) == (2, 0x1_0000_0000, 0x10_0000)


@pytest.mark.parametrize("vendor,device,word", [
    (0x8086, 0x100E, "not a virtio device"),
    (0x1AF4, 0x1009, "transitional/legacy"),
    (0x1AF4, 0x1041, "virtio device type 1"),
])
def test_not_a_virtio_fs_function(vendor: int, device: int, word: str) -> None:
    fn, _, _ = make_function(vendor=vendor, device=device)
    with pytest.raises(WrongDeviceError, match=word):
        vp.VirtioPciTransport(fn, device_id=vp.VIRTIO_ID_FS)


def test_notify_offset_beyond_notify_region() -> None:
    model = CommonCfgModel(notify_off={0: 0, 1: 1, 2: 0x400})  # 0x400 * 4 = 0x1000: past the end
    fn, _, _ = make_function(model=model)
    t = vp.VirtioPciTransport(fn, poll=True)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    with pytest.raises(CapabilityError, match="queue 2 notify address 0x1000"):
        t.setup_queue(2, 8, QueueAddresses(0x1000, 0x2000, 0x3000))


# -- common cfg register protocol -------------------------------------------------------------


def test_register_protocol_through_the_virtio_core() -> None:
    fn, model, bar = make_function()
    t = vp.VirtioPciTransport(fn)
    dev = VirtioDevice(t)
    accepted = dev.negotiate(0)
    assert accepted & Feature.VERSION_1 and accepted & Feature.ACCESS_PLATFORM
    assert model.driver_features == accepted
    assert model.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
    vq = dev.setup_queue(1, 64)
    q = model.q[1]
    assert (q["size"], q["enable"]) == (64, 1)
    a = vq.addresses
    assert (q["desc"], q["driver"], q["device"]) == (a.desc, a.avail, a.used)
    dev.driver_ok()
    assert model.status & Status.DRIVER_OK
    assert model.width_errors == []
    # 64-bit queue addresses go out as two 32-bit stores, low half first
    writes = [(o, w) for op, o, w, _ in bar.log if op == "w" and 0x20 <= o < 0x38]
    assert writes == [(0x20, 4), (0x24, 4), (0x28, 4), (0x2C, 4), (0x30, 4), (0x34, 4)]
    # ACCESS_PLATFORM negotiated but no IOMMU: physical addresses (identity), not an IOVA block
    assert not t.iova_mode and 0x4000_0000 <= a.desc < 0x8000_0000
    dev.close()
    assert model.status == 0 and fn.closed


def test_reset_waits_for_status_zero() -> None:
    fn, model, bar = make_function(model=CommonCfgModel(reset_delay=5))
    t = vp.VirtioPciTransport(fn)
    t.set_status(Status.ACKNOWLEDGE)
    bar.log.clear()
    t.reset()
    status_reads = [e for e in bar.log if e[0] == "r" and e[1] == vp.DEVICE_STATUS]
    assert len(status_reads) == 6 and status_reads[-1][3] == 0


def test_reset_timeout() -> None:
    fn, _, _ = make_function(model=CommonCfgModel(reset_delay=10**9))
    t = vp.VirtioPciTransport(fn)
    with pytest.raises(TransportError, match="still 0x1 0.05s after reset"):
        t.reset(0.05)


def test_device_gone_reads_all_ones() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    model.gone = True
    with pytest.raises(DeviceGoneError):
        t.reset()
    with pytest.raises(DeviceGoneError):
        t.check_alive()


def test_features_rejected_by_device() -> None:
    fn, model, _ = make_function(model=CommonCfgModel(features=VERSION_1))
    t = vp.VirtioPciTransport(fn)
    t.reset()
    t.set_driver_features(VERSION_1 | 1 << 5)  # a bit the device does not offer
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert not t.get_status() & Status.FEATURES_OK


def test_queue_size_and_enable_rules() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn, poll=True)
    addrs = QueueAddresses(0x1000, 0x2000, 0x3000)
    assert t.queue_max_size(0) == 256 and t.queue_max_size(3) == 0 and t.num_queues() == 3
    with pytest.raises(TransportError, match="power of 2"):
        t.setup_queue(0, 48, addrs)
    with pytest.raises(TransportError, match="power of 2 <= 256"):
        t.setup_queue(0, 512, addrs)
    with pytest.raises(TransportError, match="not available"):
        t.setup_queue(5, 8, addrs)
    t.setup_queue(0, 8, addrs)
    t.enable_queue(0)
    with pytest.raises(TransportError, match="already enabled"):
        t.setup_queue(0, 8, addrs)
    assert model.q[0]["enable"] == 1 and model.width_errors == []


# -- MSI-X ------------------------------------------------------------------------------------


def test_msix_vector_per_queue_with_readback() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    for i in range(3):
        t.setup_queue(i, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert len(fn.msix_fds) == 4  # config + 3 queues
    assert model.config_vector == 0 and t.config_fd() == fn.msix_fds[0]
    assert [model.q[i]["vector"] for i in range(3)] == [1, 2, 3]
    assert [t.interrupt_fd(i) for i in range(3)] == fn.msix_fds[1:4]
    # an interrupt on vector 2 makes queue 1's eventfd readable; ack clears it
    fn.fire(2)
    ready = select.select([t.interrupt_fd(1), t.interrupt_fd(0)], [], [], 0)[0]
    assert ready == [t.interrupt_fd(1)]
    t.ack_interrupt(1)
    assert select.select([t.interrupt_fd(1)], [], [], 0)[0] == []


def test_msix_refused_vector_falls_back_to_polling() -> None:
    fn, model, _ = make_function(model=CommonCfgModel(refuse_vectors=frozenset({2})))
    t = vp.VirtioPciTransport(fn)
    for i in range(3):
        t.setup_queue(i, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert t.interrupt_fd(0) is not None and t.interrupt_fd(2) is not None
    assert t.interrupt_fd(1) is None  # device answered NO_VECTOR
    assert model.q[1]["vector"] == vp.NO_VECTOR


def test_fewer_vectors_than_queues() -> None:
    fn, model, _ = make_function(msix=2, model=CommonCfgModel(msix_table=2))
    t = vp.VirtioPciTransport(fn)
    for i in range(3):
        t.setup_queue(i, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert t.interrupt_fd(0) is not None
    assert t.interrupt_fd(1) is None and t.interrupt_fd(2) is None
    assert [model.q[i]["vector"] for i in range(3)] == [1, vp.NO_VECTOR, vp.NO_VECTOR]


def test_poll_mode_enables_no_interrupts() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn, poll=True)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert fn.msix_fds == [] and t.interrupt_fd(1) is None
    assert model.q[1]["vector"] == vp.NO_VECTOR and model.config_vector == vp.NO_VECTOR


def test_no_msix_capability_means_polling() -> None:
    fn, _, _ = make_function(msix=0)
    t = vp.VirtioPciTransport(fn)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert t.interrupt_fd(1) is None


def test_reset_forgets_vectors_and_reprograms() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    t.reset()
    assert t.interrupt_fd(1) is None and model.config_vector == vp.NO_VECTOR
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert model.config_vector == 0 and model.q[1]["vector"] == 2


# -- notifications ----------------------------------------------------------------------------


def test_notify_writes_queue_index_at_notify_offset() -> None:
    fn, model, bar = make_function()
    t = vp.VirtioPciTransport(fn, poll=True)
    t.setup_queue(2, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    bar.log.clear()
    t.notify(2)
    assert bar.log == [("w", 0x3000 + 2 * 4, 2, 2)]
    with pytest.raises(TransportError, match="not set up"):
        t.notify(1)


def test_notify_with_notif_config_data() -> None:
    model = CommonCfgModel(features=VERSION_1 | Feature.NOTIF_CONFIG_DATA)
    fn, _, bar = make_function(model=model)
    t = vp.VirtioPciTransport(fn, poll=True)
    assert t.transport_features(model.features) == Feature.NOTIF_CONFIG_DATA
    t.set_driver_features(VERSION_1 | Feature.NOTIF_CONFIG_DATA)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    bar.log.clear()
    t.notify(1)
    assert bar.log == [("w", 0x3004, 2, 0x101)]


def test_notify_with_notification_data_is_32_bit() -> None:
    fn, _, bar = make_function()
    t = vp.VirtioPciTransport(fn, poll=True)
    t.set_driver_features(VERSION_1 | Feature.NOTIFICATION_DATA)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    bar.log.clear()
    t.notify(1, (7 << 16) | 1)
    assert bar.log == [("w", 0x3004, 4, (7 << 16) | 1)]
    with pytest.raises(TransportError, match="no data"):
        t.notify(1)


def test_notification_data_needs_4_byte_multiplier() -> None:
    fn, _, _ = make_function(standard_caps(mult=2))
    t = vp.VirtioPciTransport(fn, poll=True)
    t.set_driver_features(VERSION_1 | Feature.NOTIFICATION_DATA)
    with pytest.raises(CapabilityError, match="multiples of 4"):
        t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))


# -- device config and the virtio-fs tag -------------------------------------------------------


def test_read_config_uses_natural_widths() -> None:
    fn, _, bar = make_function(tag=b"hello")
    t = vp.VirtioPciTransport(fn)
    bar.log.clear()
    raw = t.read_config(0, 40)
    assert raw[:5] == b"hello" and struct.unpack_from("<I", raw, 36)[0] == 1
    assert {w for _, _, w, _ in bar.log} == {4}
    bar.log.clear()
    assert t.read_config(1, 3) == b"ell"
    assert [(o, w) for _, o, w, _ in bar.log] == [(0x2001, 1), (0x2002, 2)]
    with pytest.raises(ConfigError, match="beyond"):
        t.read_config(0xFFE, 4)


def test_config_generation() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    model.generation = 7
    assert t.config_generation() == 7


@pytest.mark.parametrize("raw,tag", [
    (b"myfs", "myfs"),
    ("t\u00e4g-\u6f22".encode(), "t\u00e4g-\u6f22"),
    (b"x" * 36, "x" * 36),
])
def test_virtiofs_tag(raw: bytes, tag: str) -> None:
    fn, _, _ = make_function(tag=raw)
    assert pf.read_virtiofs_tag(fn) == tag


@pytest.mark.parametrize("raw,word", [
    (b"\xff\xfeab", "not valid UTF-8"),
    (b"ab\0cd", "after its NUL padding"),
    (b"", "empty"),
])
def test_bad_virtiofs_tag(raw: bytes, word: str) -> None:
    fn, _, _ = make_function(tag=raw)
    with pytest.raises(ConfigError, match=word):
        pf.read_virtiofs_tag(fn)


def test_tag_needs_device_cfg() -> None:
    caps = standard_caps()
    fn, _, _ = make_function([caps[0], caps[1], caps[3]])
    with pytest.raises(CapabilityError, match="without a device cfg"):
        pf.read_virtiofs_tag(fn)
    caps[2] = vcap(vp.DEVICE_CFG, 4, 0x2000, 16)
    fn, _, _ = make_function(caps)
    with pytest.raises(CapabilityError, match="below the 40-byte"):
        pf.read_virtiofs_tag(fn)


def test_tag_read_retries_on_generation_change() -> None:
    fn, model, bar = make_function()
    real_read = model.read
    flips = iter([1, 2, 2, 2])

    def read(off: int, width: int) -> int:
        if off == vp.CONFIG_GENERATION:
            return next(flips, 2)
        return real_read(off, width)

    model.read = read  # type: ignore[method-assign]
    assert pf.read_virtiofs_tag(fn) == "myfs"


def test_mounted_virtiofs_is_refused(tmp_path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\nmyfs /mnt/my\\040share virtiofs rw 0 0\n"
                      "other /x virtiofs rw 0 0\n")
    assert pf.mounted_virtiofs("myfs", str(mounts)) == ["/mnt/my share"]
    with pytest.raises(DeviceBusyError, match="umount /mnt/my share"):
        pf.check_not_mounted("0000:00:03.0", "myfs", str(mounts))
    pf.check_not_mounted("0000:00:03.0", "nope", str(mounts))


# -- DMA pool ---------------------------------------------------------------------------------


def test_dma_pool_physical_and_iova_modes() -> None:
    fn, _, _ = make_function(iommu_mode="type1")
    t = vp.VirtioPciTransport(fn, dma_size=1 << 20)
    t.set_driver_features(VERSION_1)
    buf = t.dma_pool().alloc(4096)
    assert buf.addr < 0x8_0000_0000  # physical addresses: no ACCESS_PLATFORM
    fn2, _, _ = make_function(iommu_mode="type1")
    t2 = vp.VirtioPciTransport(fn2, dma_size=1 << 20)
    t2.set_driver_features(VERSION_1 | Feature.ACCESS_PLATFORM)
    assert t2.dma_pool().alloc(4096).addr >= 0x8_0000_0000  # the IOVA block
    fn3, _, _ = make_function(iommu_mode="noiommu")
    t3 = vp.VirtioPciTransport(fn3, dma_size=1 << 20)
    t3.set_driver_features(VERSION_1 | Feature.ACCESS_PLATFORM)
    assert not t3.iova_mode  # no IOMMU: ACCESS_PLATFORM still means physical addresses
    t.close()
    assert fn.dma[0].closed


def test_dma_pool_small_buffers_never_straddle_scattered_pages() -> None:
    fn, _, _ = make_function(scatter=True)
    t = vp.VirtioPciTransport(fn, dma_size=256 << 10)
    pool = t.dma_pool()
    pool.alloc(100)
    for size in (4096, 2048, 1030, 4096, 518, 2054):
        buf = pool.alloc(size, 64)
        assert len(buf.segments(0, size)) == 1, size
    big = pool.alloc(3 * 4096 + 100, 4096)
    segs = big.segments(0, big.size)
    assert len(segs) == 4 and sum(n for _, n in segs) == big.size


def test_full_queue_bring_up_on_scattered_pages() -> None:
    fn, model, _ = make_function(scatter=True)
    dev = VirtioDevice(vp.VirtioPciTransport(fn, dma_size=1 << 20))
    dev.negotiate(0)
    for i in range(3):
        dev.setup_queue(i, 256)
    dev.driver_ok()
    assert all(model.q[i]["enable"] for i in range(3))
    dev.close()


def test_close_is_safe_when_device_is_gone() -> None:
    fn, model, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    t.setup_queue(0, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    model.gone = True
    t.close()
    assert fn.closed and fn.msix_fds == []


def test_emulated_function_errors() -> None:
    fn, _, _ = make_function()
    with pytest.raises(PciError):
        fn.enable_msix(99)
    with pytest.raises(PciError):
        fn.bar_window(3, 0, 4, "x")
    assert os.path.exists("/proc/self")


def test_unplug_request_is_latched() -> None:
    fn, _, _ = make_function()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    fn.request_fd = lambda: efd  # type: ignore[method-assign]
    t = vp.VirtioPciTransport(fn)
    assert t.error_fd() == efd
    t.check_alive()
    os.eventfd_write(efd, 1)  # vfio-pci signals the request IRQ
    with pytest.raises(DeviceGoneError, match="unplug request"):
        t.check_alive()
    with pytest.raises(DeviceGoneError, match="unplug request"):  # stays gone
        t.check_alive()
    os.close(efd)


def test_msix_enable_failure_means_polling() -> None:
    fn, model, _ = make_function()

    def broken(count: int) -> list[int]:
        raise PciError("VFIO_DEVICE_SET_IRQS failed")

    fn.enable_msix = broken  # type: ignore[method-assign]
    t = vp.VirtioPciTransport(fn)
    t.setup_queue(1, 8, QueueAddresses(0x1000, 0x2000, 0x3000))
    assert t.interrupt_fd(1) is None and model.q[1]["vector"] == vp.NO_VECTOR
