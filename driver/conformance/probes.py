"""Checks below the file-system layer: rings driven directly through the virtio core
(`VirtioDevice` + `Virtqueue`), and PCI registers and capabilities.

The ring session negotiates a small feature set, sets up hiprio and the first request
queue, and sends FUSE_INIT laid out over unusual descriptors (made available before
DRIVER_OK, notified after it), then spurious notifications and a GETATTR. It watches
the used ring, the queue's interrupt, the device-readable bytes and the descriptor
table. Three things break a driver rule on purpose, to see the device ignore them:
VIRTQ_DESC_F_WRITE on an indirect descriptor (D19), avail->flags 1 with EVENT_IDX
(D24), and `features.refusal`'s feature bit the device did not offer (D6).
"""

from __future__ import annotations

import os
import select
import struct
import time

from ..errors import (
    DeviceGoneError,
    DeviceTimeoutError,
    FeatureNegotiationError,
    TransportError,
    VfsdrvError,
)
from ..fs import abi
from ..fs.abi import Opcode
from ..virtio import ring_layout as rl
from ..virtio.constants import Feature, Status
from ..virtio.device import VirtioDevice
from ..virtio.transport import Transport
from ..virtio.virtqueue import Virtqueue
from .model import FAIL, PASS, SKIP, Report

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
RAW_QUEUE_SIZE = 8
#: how long a device gets to show it does NOT do something (use a buffer, interrupt)
QUIET = 0.15


def _irq_seen(fd: int | None, timeout: float) -> bool | None:
    """Did the queue's interrupt eventfd fire within `timeout`? Consumes it."""
    if fd is None:
        return None
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def _drain(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


def _wait_used(vq: Virtqueue, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not vq.has_used():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def ring_session(t: Transport, report: Report, timeout: float, *, event_idx: bool,
                 device_status: bool) -> None:
    """One raw session; `event_idx` picks VIRTIO_F_EVENT_IDX, else VERSION_1 alone."""
    inst = "EVENT_IDX" if event_idx else "VERSION_1 only"
    dev = VirtioDevice(t)
    ring = Feature.EVENT_IDX | Feature.INDIRECT_DESC if event_idx else 0
    try:
        dev.negotiate(0, ring_features=ring, reset_timeout=timeout)
    except (FeatureNegotiationError, TransportError) as exc:
        if isinstance(exc, DeviceGoneError | DeviceTimeoutError):
            raise  # not a refusal: the runner reports a device that went away
        # FEATURES_OK cleared, or (vhost-user REPLY_ACK) SET_FEATURES refused at once:
        # e.g. a device that runs packed rings only, and this subset is split
        # refusing is what D6 (MUST) asks of a device that does not take a subset;
        # not taking this one is D5, a SHOULD: a pass that names the deviation
        refused = f"the split-ring subset refused: {exc}"
        if not event_idx:
            report.add("features.subset", PASS, refused,
                       deviation="D5 (SHOULD): the device does not take the smallest valid "
                       "subset (VERSION_1 alone, split rings); a driver without what it "
                       "insists on (e.g. packed rings) cannot use it")
        why = "not reached: the device refused this feature subset"
        for cid in ("ring.framing", "ring.used_notify", "ring.used_flags", "ring.spurious_kick"):
            report.add(cid, SKIP, why, instance=inst)
        if event_idx:
            report.add("ring.indirect", SKIP, why)
        _reset_quietly(t, timeout)
        return
    pool = t.dma_pool()
    buf = pool.alloc(4 * 4096, 4096)
    try:
        _ring_session(t, dev, report, timeout, buf, inst, event_idx, device_status)
    except (VfsdrvError, OSError, ValueError) as exc:
        report.add("ring.framing", FAIL, f"{type(exc).__name__}: {exc}", instance=inst)
    finally:
        _reset_quietly(t, timeout)
        for vq in dev.queues.values():
            vq.close()
        dev.queues.clear()
        pool.free(buf)


def _reset_quietly(t: Transport, timeout: float) -> None:
    try:
        t.reset(timeout)
    except (VfsdrvError, OSError):
        pass  # the caller's own reset check reports it


def _ring_session(t: Transport, dev: VirtioDevice, report: Report, timeout: float, buf,
                  inst: str, event_idx: bool, device_status: bool) -> None:
    dev.setup_queue(0, RAW_QUEUE_SIZE)
    vq = dev.setup_queue(1, RAW_QUEUE_SIZE)
    fd = t.interrupt_fd(1)
    view = buf.view
    # FUSE_INIT: in header split 20 + 20 (+ body), reply in three writable pieces
    body = abi.pack("fuse_init_in", major=abi.KERNEL_VERSION, minor=abi.KERNEL_MINOR_VERSION,
                    max_readahead=65536, flags=0, flags2=0)
    in_len = IN_HEADER.size + len(body)
    request = IN_HEADER.pack(in_len, Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + body
    view[0:20] = request[:20]
    view[256 : 256 + in_len - 20] = request[20:]
    reply_pieces = [(4096, 8), (4096 + 512, 8), (8192, 256)]
    for off, ln in reply_pieces:
        view[off : off + ln] = b"\xa5" * ln
    readable = buf.segments(0, 20) + buf.segments(256, in_len - 20)
    writable = [seg for off, ln in reply_pieces for seg in buf.segments(off, ln)]
    head = vq.add(readable, writable, "init")
    indirect = False
    if dev.has(Feature.INDIRECT_DESC):
        # D19: WRITE on the descriptor that refers to an indirect table must be ignored
        off = rl.DESC_SIZE * head + 12
        flags = int.from_bytes(vq.desc.view[off : off + 2], "little")
        if flags & rl.VRING_DESC_F_INDIRECT:
            vq.desc.view[off : off + 2] = (flags | rl.VRING_DESC_F_WRITE).to_bytes(2, "little")
            indirect = True
    if not event_idx:
        # D21: without EVENT_IDX used_event means nothing; one far away must not
        # keep the device from notifying
        off = rl.used_event_offset(vq.size)
        vq.avail.view[off : off + 2] = (0x8000).to_bytes(2, "little")
    vq.publish()  # available, not notified: no notification before DRIVER_OK
    desc_before = bytes(vq.desc.view[: rl.DESC_SIZE * vq.size])
    readable_before = bytes(view[0:20]) + bytes(view[256 : 256 + in_len - 20])
    early = None
    if device_status and not event_idx:
        time.sleep(QUIET)
        early = vq.has_used()
    _drain(fd)
    dev.driver_ok()
    t.notify(vq.index)
    irq = _irq_seen(fd, timeout)
    # no interrupt within the timeout: the answer either is there already or is not coming
    answered = _wait_used(vq, QUIET if irq is False else timeout)
    if early is not None:
        if early:
            report.add("ring.before_driver_ok", FAIL, "the device used FUSE_INIT before "
                       "DRIVER_OK was set")
        elif answered:
            report.add("ring.before_driver_ok", PASS, f"not used during {QUIET * 1000:.0f} ms "
                       "before DRIVER_OK; answered after DRIVER_OK and a notification")
    if not answered:
        report.add("ring.framing", FAIL, f"FUSE_INIT over 2 readable + 3 writable descriptors "
                   f"not used within {timeout:g} s", instance=inst)
        if not event_idx:
            report.add("features.subset", FAIL, "FEATURES_OK kept for VIRTIO_F_VERSION_1 alone, "
                       "but FUSE_INIT was not answered")
        elif indirect:
            report.add("ring.indirect", FAIL, "FUSE_INIT through an indirect table whose "
                       f"descriptor also has VIRTQ_DESC_F_WRITE: not used within {timeout:g} s")
        return
    (token, length), *rest = vq.get_used()
    reply = b"".join(bytes(view[off : off + ln]) for off, ln in reply_pieces)
    out_len, error, unique = OUT_HEADER.unpack_from(reply, 0)
    problems = []
    if rest:
        problems.append(f"{len(rest)} more used entries than chains made available")
    if unique != 2:
        problems.append(f"reply unique {unique} (sent 2)")
    if not 16 <= out_len <= length:
        problems.append(f"out.len {out_len} not covered by used len {length}")
    elif length > out_len and reply[out_len:length] == b"\xa5" * (length - out_len):
        # D28: used len counts bytes written; these still hold what the driver put there
        problems.append(f"used len {length} but bytes {out_len}..{length} of the reply were "
                        "never written (the device MUST write at least len bytes)")
    if error == 0 and out_len >= 24 and struct.unpack_from("<I", reply, 16)[0] != 7:
        problems.append(f"FUSE major {struct.unpack_from('<I', reply, 16)[0]}")
    if error != 0:
        problems.append(f"FUSE_INIT error {error}")
    # the reply landed where this driver put the writable buffers, framed: what D5 (the
    # subset works) and D19 (the indirect table followed) can tell; the FUSE content
    # (major, error) is fuse.init's and ring.framing's to judge
    landed = unique == 2 and 16 <= out_len <= length and not rest
    readable_after = bytes(view[0:20]) + bytes(view[256 : 256 + in_len - 20])
    if readable_after != readable_before:
        problems.append("the device wrote into a device-readable buffer")
    if bytes(vq.desc.view[: rl.DESC_SIZE * vq.size]) != desc_before:
        problems.append("the device wrote into the descriptor table")
    what = (f"FUSE_INIT as {len(readable)} readable + {len(writable)} writable descriptors: "
            f"used len {length}, out.len {out_len}")
    if problems:
        report.add("ring.framing", FAIL, f"{what}: {'; '.join(problems)}", instance=inst)
    else:
        report.add("ring.framing", PASS, f"{what}; readable bytes and descriptor table "
                   "unchanged", instance=inst)
    if event_idx:
        if indirect:
            report.add("ring.indirect", PASS if landed else FAIL,
                       "FUSE_INIT through an indirect table whose descriptor also has "
                       "VIRTQ_DESC_F_WRITE: "
                       f"{'its reply in our buffers' if landed else 'no reply where we put it'}")
        elif not dev.has(Feature.INDIRECT_DESC):
            report.add("ring.indirect", SKIP, "VIRTIO_F_INDIRECT_DESC not offered")
        else:
            report.add("ring.indirect", SKIP, "the driver's ring chained FUSE_INIT directly")
    if not event_idx:
        report.add("features.subset", PASS if landed else FAIL,
                   f"FEATURES_OK kept for VIRTIO_F_VERSION_1 alone; FUSE_INIT "
                   f"{'answered' if landed else 'not answered where the reply belongs'}")
    flags = int.from_bytes(vq.used.view[rl.USED_FLAGS : rl.USED_FLAGS + 2], "little")
    allowed = (0,) if event_idx else (0, rl.VRING_USED_F_NO_NOTIFY)
    report.add("ring.used_flags", PASS if flags in allowed else FAIL,
               f"used->flags {flags:#x} ({'with' if event_idx else 'without'} EVENT_IDX)",
               instance=inst)

    # spurious notifications, then a GETATTR (with interrupts suppressed without EVENT_IDX)
    for _ in range(3):
        t.notify(vq.index)
    if not event_idx:
        vq.disable_interrupts()  # avail->flags = 1
    else:
        vq.enable_interrupts()  # used_event = last used: the next use must notify
        # D24: with EVENT_IDX the device ignores the low bit of avail->flags (a driver
        # must leave it 0: set here on purpose, the notification must still come)
        vq.avail.view[rl.AVAIL_FLAGS : rl.AVAIL_FLAGS + 2] = b"\x01\x00"
    _drain(fd)
    getattr_in = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    req = IN_HEADER.pack(IN_HEADER.size + len(getattr_in), Opcode.GETATTR, 4, 1, 0, 0, 0, 0, 0)
    req += getattr_in
    view[0 : len(req)] = req
    cap = 16 + abi.sizeof("fuse_attr_out")
    vq.add(buf.segments(0, len(req)), buf.segments(8192, cap), "getattr")
    if vq.publish():
        t.notify(vq.index)
    irq2 = _irq_seen(fd, QUIET if not event_idx else timeout)
    if not _wait_used(vq, timeout):
        report.add("ring.spurious_kick", FAIL, f"after 3 spurious notifications GETATTR was "
                   f"not used within {timeout:g} s", instance=inst)
        return
    vq.get_used()
    out_len, error, unique = OUT_HEADER.unpack_from(view, 8192)
    ok = unique == 4 and error == 0 and out_len == cap
    report.add("ring.spurious_kick", PASS if ok else FAIL,
               f"3 notifications with nothing new, then GETATTR: out.len {out_len}, error "
               f"{error}, unique {unique}", instance=inst)
    if irq is None:
        report.add("ring.used_notify", SKIP, "the queue has no interrupt (polled)",
                   instance=inst)
    elif not irq:
        asked = "used_event 0" if event_idx else "avail->flags 0, used_event 0x8000"
        report.add("ring.used_notify", FAIL, "FUSE_INIT used without a used-buffer "
                   f"notification ({asked})", instance=inst)
    elif event_idx:
        report.add("ring.used_notify", PASS if irq2 else FAIL,
                   f"notified for FUSE_INIT (used_event 0) and "
                   f"{'for' if irq2 else 'NOT for'} GETATTR (used_event 1, avail->flags 1)",
                   instance=inst)
    else:
        report.add("ring.used_notify", PASS,
                   "notified for FUSE_INIT (avail->flags 0, used_event 0x8000 ignored)"
                   + ("; also for GETATTR with avail->flags 1" if irq2 else
                      "; not for GETATTR with avail->flags 1"), instance=inst,
                   deviation="SHOULD NOT notify while avail->flags is 1 (D23)" if irq2 else None)


def feature_refusal(t: Transport, report: Report, timeout: float, has_status: bool) -> None:
    """Write VERSION_1 plus a device-type bit the device did not offer, then FEATURES_OK."""
    if not has_status:
        report.add("features.refusal", SKIP, "the device keeps no status register "
                   "(vhost-user without the STATUS protocol feature)")
        return
    try:
        t.reset(timeout)
        offered = t.device_features()
        bogus = next((1 << b for b in range(1, 24) if not offered & (1 << b)), 0)
        if not bogus:
            report.add("features.refusal", SKIP, "every device-type bit is offered")
            return
        t.set_status(Status.ACKNOWLEDGE)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        bit = bogus.bit_length() - 1
        try:
            t.set_driver_features((offered & Feature.VERSION_1) | bogus)
        except (FeatureNegotiationError, TransportError) as exc:
            if isinstance(exc, DeviceGoneError | DeviceTimeoutError):
                raise  # not a refusal
            # vhost-user REPLY_ACK: the backend said no at once
            report.add("features.refusal", PASS, f"bit {bit} (not offered) written: the "
                       f"feature set was refused ({exc})")
            return
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        status = t.get_status()
        echoed = None
        common = getattr(t, "common", None)
        if common is not None:
            common.write32(8, 0)  # driver_feature_select
            echoed = common.read32(12) & bogus
        if not status & Status.FEATURES_OK:
            report.add("features.refusal", PASS, f"bit {bit} (not offered) "
                       f"written: FEATURES_OK cleared (status {status:#x})")
        elif echoed == 0:
            report.add("features.refusal", PASS, f"bit {bit} (not offered) "
                       "written: ignored (driver_feature reads it as 0), FEATURES_OK kept")
        elif echoed:
            # "The device MAY present invalid bits written by the driver": not a failure,
            # but the spec's note expects a device that mirrors them to refuse FEATURES_OK
            report.add("features.refusal", PASS, f"bit {bit} (not offered) written: FEATURES_OK "
                       "kept, driver_feature presents the bit", deviation="a device that "
                       "mirrors invalid driver_feature bits is expected to refuse FEATURES_OK "
                       "(note under §4.1 common configuration layout); QEMU's virtio-pci masks "
                       "them instead")
        else:
            report.add("features.refusal", PASS, f"bit {bit} (not offered) "
                       "written: FEATURES_OK kept", deviation="cannot tell whether the device "
                       "ignored the bit (no driver_feature register on this transport)")
    except (VfsdrvError, OSError) as exc:
        report.add("features.refusal", FAIL, f"{type(exc).__name__}: {exc}")
    finally:
        _reset_quietly(t, timeout)


# -- PCI registers and the capability list -----------------------------------------------------

DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0, 4, 8, 12
CONFIG_MSIX_VECTOR, NUM_QUEUES, QUEUE_SELECT, QUEUE_SIZE = 16, 18, 22, 24
QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 26, 28, 30
NO_VECTOR = 0xFFFF


def pci_registers(t: Transport, report: Report, timeout: float) -> None:
    """Common cfg right after a reset (the transport is a VirtioPciTransport)."""
    c = t.common  # type: ignore[attr-defined]
    problems, seen = [], []
    try:
        t.reset(timeout)
        for sel in (2, 3):
            c.write32(DEVICE_FEATURE_SELECT, sel)
            v = c.read32(DEVICE_FEATURE)
            if v:
                problems.append(f"device_feature {v:#x} for select {sel}")
        c.write32(DEVICE_FEATURE_SELECT, 0)
        cfg_vec = c.read16(CONFIG_MSIX_VECTOR)
        if cfg_vec != NO_VECTOR:
            problems.append(f"config_msix_vector {cfg_vec:#x} after reset")
        n = c.read16(NUM_QUEUES)
        mult = t.caps.notify_off_multiplier  # type: ignore[attr-defined]
        notify_len = t.notify_area.length  # type: ignore[attr-defined]
        for q in range(n):
            c.write16(QUEUE_SELECT, q)
            if c.read16(QUEUE_ENABLE):
                problems.append(f"queue {q}: queue_enable 1 after reset")
            vec = c.read16(QUEUE_MSIX_VECTOR)
            if vec != NO_VECTOR:
                problems.append(f"queue {q}: queue_msix_vector {vec:#x} after reset")
            off = c.read16(QUEUE_NOTIFY_OFF) * mult
            if off + 2 > notify_len:
                problems.append(f"queue {q}: notify offset {off:#x} + 2 beyond the notify "
                                f"length {notify_len:#x}")
        c.write16(QUEUE_SELECT, n)
        if c.read16(QUEUE_SIZE):
            problems.append(f"queue_size {c.read16(QUEUE_SIZE)} for queue {n} (past the last)")
        seen.append(f"{n} queues: enable 0, vectors NO_VECTOR, notify addresses in range")
        # driver_feature echoes a valid subset (written in the negotiation window)
        offered = t.device_features()
        want = offered & (Feature.VERSION_1 | Feature.EVENT_IDX)
        t.set_status(Status.ACKNOWLEDGE)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        t.set_driver_features(want)
        got = 0
        for sel in (0, 1):
            c.write32(DRIVER_FEATURE_SELECT, sel)
            got |= c.read32(DRIVER_FEATURE) << (32 * sel)
        if got & want != want:
            problems.append(f"driver_feature reads {got:#x} after {want:#x} was written")
        t.reset(timeout)
        t.read_isr()  # type: ignore[attr-defined]
        isr = t.read_isr()  # type: ignore[attr-defined]
        if isr:
            problems.append(f"ISR {isr:#x} on a second read (not cleared by the first)")
        seen.append("device_feature 0 past bit 63, driver_feature echoed, ISR cleared on read")
    except (VfsdrvError, OSError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    report.add("pci.registers", FAIL if problems else PASS,
               "; ".join(problems) if problems else "; ".join(seen))


def pci_cap_list(fn, report: Report, offered: int | None = None) -> None:
    """Walk the standard and extended capability lists in config space."""
    problems, seen = [], []
    try:
        cfg = fn.config_read(0, 256)
        try:
            ext = fn.config_read(256, 4096 - 256)
        except (VfsdrvError, OSError):
            ext = b""
        pos, hops, pci_cfg, msix = cfg[0x34] & 0xFC, 0, 0, None
        while pos and hops < 48:
            cap_id, nxt = cfg[pos], cfg[pos + 1] & 0xFC
            if cap_id == 0x09 and pos + 4 <= len(cfg):  # vendor-specific: a virtio cap
                cap_len, cfg_type = cfg[pos + 2], cfg[pos + 3]
                if cfg_type == 5:
                    pci_cfg += 1
                elif cfg_type == 9:
                    vendor = struct.unpack_from("<H", cfg, pos + 4)[0]
                    if vendor == 0x1AF4:
                        problems.append("vendor data capability with vendor_id 0x1AF4")
                    if cap_len % 4:
                        problems.append(f"vendor data capability of {cap_len} bytes")
            elif cap_id == 0x11:  # MSI-X
                msix = (struct.unpack_from("<H", cfg, pos + 2)[0] & 0x7FF) + 1
            pos, hops = nxt, hops + 1
        sriov, epos = False, 0x100
        while ext and 0x100 <= epos < 4096 and hops < 96:
            header = struct.unpack_from("<I", ext, epos - 0x100)[0]
            if header in (0, 0xFFFFFFFF):
                break
            sriov = sriov or header & 0xFFFF == 0x10
            epos, hops = (header >> 20) & 0xFFC, hops + 1
        if not pci_cfg:
            problems.append("no VIRTIO_PCI_CAP_PCI_CFG capability")
        seen.append(f"{pci_cfg} PCI_CFG capability(ies)")
        if msix is not None:
            seen.append(f"MSI-X table of {msix} vectors")
        if offered is not None and offered & Feature.SR_IOV and not sriov:
            problems.append("VIRTIO_F_SR_IOV offered without an SR-IOV capability")
    except (VfsdrvError, OSError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
        msix = None
    deviation = None
    if msix is not None and not 2 <= msix <= 0x800:
        deviation = f"SHOULD have 2..0x800 MSI-X vectors (D72), has {msix}"
    report.add("pci.cap_list", FAIL if problems else PASS,
               "; ".join(problems) if problems else ", ".join(seen), deviation=deviation)
