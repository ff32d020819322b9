"""Run the conformance checks against one device.

Order: PCI identity and capabilities (PCI only, no VFIO needed: config space
through sysfs), reset, PCI registers and capability list, offered features, device
config, queue layout and sizes; two ring sessions through the virtio core alone
(probes.py); FEATURES_OK with a bit never offered; then the live session through
the driver (`VirtioFs`): FEATURES_OK, bring-up, FUSE_INIT, one request on each
request queue, a FORGET on hiprio, many requests in flight per queue, the FUSE
checks in a scratch directory (fuse_checks.py), the notification queue, locks,
a reset with requests in flight and a new session; finally reset again. A check
whose precondition failed is skipped with the reason ("not reached: ..."). Only
the scratch directory `.vfsdrv-check-PID` is written (and removed); with
`read_only` nothing is."""

from __future__ import annotations

import errno
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeviceTimeoutError, FeatureNegotiationError, VfsdrvError
from ..fs import abi
from ..fs.abi import Opcode
from ..fs.client import FuseClient
from ..fs.config import (
    CONFIG_SIZE,
    CONFIG_SIZE_NO_NOTIFY,
    MAX_NOTIFY_BUF_SIZE,
    MAX_REQUEST_QUEUES,
    MIN_NOTIFY_BUF_SIZE,
    TAG_SIZE,
    VIRTIO_FS_F_NOTIFICATION,
    decode_tag,
)
from ..fs.device import HIPRIO_QUEUE, NOTIFY_QUEUE, Pending, VirtioFs, _QueueState
from ..pci.function import PciFunction
from ..virtio.constants import DEVICE_FEATURE_MASK, Feature, Status, feature_names
from ..virtio.device import VirtioDevice
from ..virtio.ring_layout import MAX_QUEUE_SIZE
from ..virtio.transport import Transport
from . import fuse_checks, interrupt, probes
from .model import FAIL, PASS, SKIP, Report

log = logging.getLogger(__name__)

FS_FEATURE_NAMES = {0: "VIRTIO_FS_F_NOTIFICATION"}  # the transport's bits: feature_names
INDEX1_DEVIATION = (
    "request queues start at index 1 without VIRTIO_FS_F_NOTIFICATION; the spec numbers them "
    "from 2 (queue 1 is the notification queue). QEMU's vhost-user-fs, virtiofsd, crosvm and "
    "the Linux driver all use index 1 (acknowledged upstream, July 2024); this driver does too"
)


@dataclass
class CheckOptions:
    timeout: float = 5.0  # seconds per request and per reset
    queue_size: int = 64
    notification: bool = True  # negotiate VIRTIO_FS_F_NOTIFICATION when offered
    #: the device config was supplied by the user (vhost-user backend without config space)
    config_supplied: bool = False
    #: create nothing in the export (no scratch directory: the checks that need one skip)
    read_only: bool = False
    #: virtqueue layout forced: "split" or "packed" (None: packed when offered)
    ring: str | None = None
    #: notify code of FUSE_NOTIFY_LOCK the device uses
    notify_lock_code: int = abi.DEFAULT_NOTIFY_LOCK_CODE


#: the longest a checker's session sleeps without looking at the used rings
LOOK_EVERY = 0.05


class _ProbeFs(VirtioFs):
    """VirtioFs that sends each request on a queue the checker chooses."""

    target: _QueueState | None = None
    regular_files: list[bytes] = []  # noqa: RUF012 - set per instance by the FORGET check
    #: how long each FUSE request may take (check --timeout), for every client
    request_timeout: float = 60.0

    _probing = False  # on_no_reply's GETATTR is on its way

    def acquire(self, large: bool = False, timeout: float | None = 30.0):
        # a device that keeps every request buffer costs --timeout, not 30 s, per wait
        limit = self.request_timeout
        try:
            return super().acquire(large, limit if timeout is None else min(timeout, limit))
        except DeviceTimeoutError as exc:
            # every buffer held for --timeout: the device stopped answering, and the
            # checks after this one are not reached (not each charged --timeout more)
            self.give_up(DeviceTimeoutError(f"the device stopped answering: {exc}"))
            raise

    def on_no_reply(self, pending: Pending) -> None:
        """A request went unanswered for --timeout: one GETATTR of the root tells a
        device that stopped answering (the session ends: the later checks are not
        reached, instead of each waiting --timeout) from one that kept that request."""
        if self._probing or self._broken is not None:
            return
        self._probing = True
        try:
            self.call(Opcode.GETATTR, 1, abi.pack("fuse_getattr_in", getattr_flags=0, fh=0),
                      timeout=self.request_timeout)
        except TimeoutError:
            self.give_up(DeviceTimeoutError(
                f"the device stopped answering: no reply to {abi.opcode_name(pending.opcode)} "
                f"(unique {pending.unique}), nor to a GETATTR of the root after it, within "
                f"{self.request_timeout:g} s each"))
        except (VfsdrvError, OSError):
            pass  # an answer, even an error: the device is alive
        finally:
            self._probing = False

    def client(self) -> FuseClient:
        """A FuseClient whose requests wait --timeout, not the library's 60 s."""
        c = FuseClient(self)
        c.timeout = self.request_timeout
        return c

    def wait(self, timeout: float | None) -> int:
        # look at the rings at least every LOOK_EVERY seconds: a device that answers
        # without its used-buffer notification (ring.used_notify judges that) then costs
        # the run milliseconds per request, not --timeout
        return super().wait(LOOK_EVERY if timeout is None else min(timeout, LOOK_EVERY))

    def _pick_request_queue(self) -> _QueueState:
        if self.target is not None:
            return self.target
        return super()._pick_request_queue()



def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- PCI: identity and capabilities ------------------------------------------------------------


def check_pci_function(report: Report, fn: PciFunction,
                       options: CheckOptions | None = None) -> bool:
    """Identity, capability layout, device cfg size. Returns False if the function is not
    usable as a virtio-fs device (the other checks are then pointless)."""
    from ..virtio import pci as vpci

    # a PCI function, whether or not it turns out usable (the coverage's reasons)
    set_context(report, options or CheckOptions(), pci=True, device_status=True)

    vendor, dev = struct.unpack("<HH", fn.config_read(0, 4))
    ident = f"{vendor:04x}:{dev:04x}"
    if (vendor, dev) == (vpci.VIRTIO_PCI_VENDOR, vpci.VIRTIO_FS_PCI_DEVICE):
        revision = fn.config_read(8, 1)[0]
        subsys = struct.unpack("<H", fn.config_read(0x2E, 2))[0]
        shoulds = []
        if revision < 1:
            shoulds.append(f"revision {revision} (SHOULD be 1 or higher, D45)")
        if subsys < 0x40:
            shoulds.append(f"subsystem device ID {subsys:#x} (SHOULD be 0x40 or higher, D46)")
        report.add("pci.identity", PASS, f"{ident} rev {revision} subsystem device {subsys:#x}",
                   deviation="; ".join(shoulds) or None)
    else:
        report.add("pci.identity", FAIL, f"{ident} (expected 1af4:105a)")
        return False
    try:
        caps = vpci.parse_capabilities(fn)
    except VfsdrvError as exc:
        report.add("pci.capabilities", FAIL, str(exc))
        return False
    parts = []
    for name, region in (("common", caps.common), ("notify", caps.notify), ("isr", caps.isr),
                         ("device", caps.device)):
        if region is not None:
            parts.append(f"{name} BAR{region.bar}+{region.offset:#x}/{region.length:#x}")
    parts.append(f"notify_off_multiplier {caps.notify_off_multiplier}")
    if caps.shared_memory:
        parts.append("shm ids " + ",".join(str(i) for i in sorted(caps.shared_memory)))
    if caps.ignored:
        parts.append("ignored: " + "; ".join(caps.ignored))
    report.add("pci.capabilities", PASS, ", ".join(parts))
    if caps.device is None:
        report.add("pci.device_cfg", FAIL, "no device cfg capability: the tag cannot be read")
        return False
    length = caps.device.length
    if length < CONFIG_SIZE_NO_NOTIFY:
        report.add("pci.device_cfg", FAIL, f"device cfg is {length} bytes (< 40)")
        return False
    note = "" if length >= CONFIG_SIZE else " (no room for notify_buf_size)"
    report.add("pci.device_cfg", PASS, f"{length} bytes{note}")
    return True


# -- the transport-level checks and the live session -------------------------------------------


def _time_reset(t: Transport, timeout: float) -> float:
    start = time.monotonic()
    t.reset(timeout)
    return time.monotonic() - start


def _is_vhost_user(t: Transport) -> bool:
    """vhost-user keeps device status in the frontend: there is no register to reset."""
    from ..virtio.vhost_user import VhostUserTransport

    return isinstance(t, VhostUserTransport)


def set_context(report: Report, opt: CheckOptions, *, pci: bool, device_status: bool) -> None:
    """What the set-up makes observable, for the coverage's reasons (CONDITIONS)."""
    report.context.update(pci=pci, device_status=device_status,
                          config_space=not opt.config_supplied, writable=not opt.read_only)


def run_checks(transport: Transport, report: Report, options: CheckOptions | None = None) -> Report:
    """Every transport-independent check, then the live session. Closes nothing: the
    caller owns the transport (but the device is reset at the end)."""
    opt = options or CheckOptions()
    t = transport
    vhost = _is_vhost_user(t)

    has_status = not vhost or bool(getattr(t, "has_status", False))
    pci = hasattr(t, "common") and hasattr(t, "caps")
    set_context(report, opt, pci=pci, device_status=has_status)

    # reset ---------------------------------------------------------------------------------
    reset_note = ""
    if vhost:
        reset_ok = True
        reset_note = "vhost-user: no device status register (reset = rings stopped)"
        if has_status:
            try:
                took = _time_reset(t, opt.timeout)
                reset_note = f"vhost-user STATUS: status 0 after {_fmt_ms(took)}"
            except VfsdrvError as exc:
                report.add("reset", FAIL, str(exc))
                reset_ok = False
    else:
        try:
            first_reset = _time_reset(t, opt.timeout)
            reset_ok = True
            reset_note = f"status 0 after {_fmt_ms(first_reset)}"
        except VfsdrvError as exc:
            report.add("reset", FAIL, str(exc))
            reset_ok = False
    if pci and reset_ok:
        probes.pci_registers(t, report, opt.timeout)
    fn = getattr(t, "fn", None)
    if pci and fn is not None and not any(c.id == "pci.cap_list" for c in report.checks):
        probes.pci_cap_list(fn, report, t.device_features())

    # features ------------------------------------------------------------------------------
    offered = t.device_features()
    names = feature_names(offered, FS_FEATURE_NAMES)
    report.context["event_idx"] = bool(offered & Feature.EVENT_IDX)
    # the indirect probe runs in the EVENT_IDX ring session
    report.context["indirect"] = bool(offered & Feature.INDIRECT_DESC
                                      and offered & Feature.EVENT_IDX)
    if offered & Feature.VERSION_1:
        report.add("features.version_1", PASS, f"offered: {names}")
    else:
        report.add("features.version_1", FAIL, f"VERSION_1 not offered (offered: {names})")
    notif_offered = bool(offered & VIRTIO_FS_F_NOTIFICATION)
    report.add("features.offered", *_judge_offered(offered, pci))
    # config --------------------------------------------------------------------------------
    dev = VirtioDevice(t)
    cfg_len = CONFIG_SIZE if notif_offered else CONFIG_SIZE_NO_NOTIFY
    raw: bytes | None = None
    try:
        raw = dev.read_config(0, cfg_len)
    except VfsdrvError as exc:
        report.add("config.tag", FAIL, f"config unreadable: {exc}")
    nrq = 0
    if raw is not None:
        if opt.config_supplied:
            why = "supplied by --tag/--request-queues: the backend has no config space"
            report.add("config.tag", SKIP, why)
            nrq = struct.unpack_from("<I", raw, TAG_SIZE)[0]
            report.add("config.num_request_queues", SKIP, f"{nrq} ({why})")
        else:
            tag_raw = raw[:TAG_SIZE]
            try:
                tag = decode_tag(tag_raw)
                pad = TAG_SIZE - len(tag.encode())
                report.add("config.tag", PASS, f"{tag!r} ({len(tag.encode())} bytes, {pad} NUL)")
            except VfsdrvError as exc:
                report.add("config.tag", FAIL, str(exc))
            nrq = struct.unpack_from("<I", raw, TAG_SIZE)[0]
            if 1 <= nrq <= MAX_REQUEST_QUEUES:
                report.add("config.num_request_queues", PASS, str(nrq))
            elif nrq == 0:
                report.add("config.num_request_queues", FAIL, "0")
            else:
                report.add("config.num_request_queues", FAIL,
                           f"{nrq} (more than {MAX_REQUEST_QUEUES}: taken as broken)")
                nrq = 0  # broken: nothing below may size anything by it
    if notif_offered and raw is not None:
        nbs = struct.unpack_from("<I", raw, TAG_SIZE + 4)[0]
        if MIN_NOTIFY_BUF_SIZE <= nbs <= MAX_NOTIFY_BUF_SIZE:
            report.add("config.notify_buf_size", PASS, f"{nbs} bytes (>= {MIN_NOTIFY_BUF_SIZE})")
        else:
            report.add("config.notify_buf_size", FAIL,
                       f"{nbs} bytes (needs {MIN_NOTIFY_BUF_SIZE}..{MAX_NOTIFY_BUF_SIZE})")
    elif raw is not None:
        report.add("config.notify_buf_size", SKIP, "VIRTIO_FS_F_NOTIFICATION not offered")

    # queue layout and sizes ------------------------------------------------------------------
    use_notify = notif_offered and opt.notification
    # the device's count, bounded by what any virtio-fs device can have: only those
    # queues are probed (a count of 2^64 - 1 must not make a probe loop of it)
    num = min(t.num_queues(), 2 + MAX_REQUEST_QUEUES)
    first_req = 2 if use_notify else 1
    sizes = {i: t.queue_max_size(i) for i in range(max(num, first_req + max(nrq, 1)))}
    spec_layout = False
    if nrq >= 1:
        want = first_req + nrq
        desc = (f"{num} queues: hiprio 0, "
                + ("notification 1, " if use_notify else "")
                + f"request {first_req}..{want - 1}")
        if not use_notify and notif_offered:
            desc += " (notification offered, not used: --no-notification)"
        if not use_notify and sizes.get(1, 0) == 0 and sizes.get(2, 0) > 0 and num >= 2 + nrq:
            spec_layout = True
            report.add("queues.layout", PASS,
                       f"{num} queues: queue 1 absent, request queues from 2 (the spec's layout; "
                       "this driver uses index 1, so the live checks are skipped)")
        elif num and num < want:
            report.add("queues.layout", FAIL,
                       f"{num} queues, but {want} needed for num_request_queues {nrq}")
        elif not notif_offered:
            report.add("queues.layout", PASS, desc, deviation=INDEX1_DEVIATION)
        else:
            report.add("queues.layout", PASS, desc)
        bad = {i: s for i, s in sizes.items() if i < want and not 1 <= s <= MAX_QUEUE_SIZE}
        shown = ", ".join(f"{i}:{s}" for i, s in sorted(sizes.items()) if i < want)
        if spec_layout:
            bad.pop(1, None)
        if bad:
            report.add("queues.sizes", FAIL, f"max sizes {shown}; out of range: "
                       + ", ".join(f"queue {i} = {s}" for i, s in bad.items()))
        else:
            odd = [i for i, s in sizes.items() if i < want and s & (s - 1)]
            if odd:
                report.add("queues.sizes", FAIL, f"max sizes {shown}; not a power of 2 (split "
                           f"rings): queues {odd} (the driver rounds down)")
            else:
                report.add("queues.sizes", PASS, f"max sizes {shown}")
    else:
        report.add("queues.layout", SKIP, "not reached: no valid num_request_queues")
        report.add("queues.sizes", SKIP, "not reached: no valid num_request_queues")

    # the live session -------------------------------------------------------------------------
    live = ["features.features_ok", "features.subset", "features.refusal", "bringup",
            "fuse.init", "queues.request", "queues.inflight", "hiprio.forget", "hiprio.storm",
            "fuse.opcodes", "fuse.errors", "notify.queue", "notify.lock", "notify.load",
            "reset.live"]
    # --ring packed against a device without packed rings: the user's choice, not the
    # device's fault, but nothing live is checked: the run is incomplete (exit status 1)
    no_packed = opt.ring == "packed" and not offered & Feature.RING_PACKED
    if (not (offered & Feature.VERSION_1) or nrq < 1 or spec_layout or not reset_ok
            or no_packed):
        why = ("not reached: " + ("VERSION_1 not offered" if not offered & Feature.VERSION_1
               else "the device did not reset" if not reset_ok
               else "--ring packed, and the device does not offer VIRTIO_F_RING_PACKED"
               if no_packed
               else "the spec's queue layout (request queues from 2)" if spec_layout
               else "no usable num_request_queues"))
        for cid in live:
            report.add(cid, SKIP, why)
        if no_packed and offered & Feature.VERSION_1 and reset_ok:
            report.incomplete = ("--ring packed, but the device does not offer "
                                 "VIRTIO_F_RING_PACKED: no live check ran (leave --ring out, "
                                 "or give --ring split)")
        if reset_ok:
            _final_reset(t, report, opt, reset_note)
        return report
    # rings through the virtio core alone, then FEATURES_OK with a bit never offered
    cid = "ring.framing"
    try:
        probes.ring_session(t, report, opt.timeout, event_idx=False, device_status=has_status)
        if offered & Feature.EVENT_IDX:
            probes.ring_session(t, report, opt.timeout, event_idx=True,
                                device_status=has_status)
        cid = "features.refusal"
        probes.feature_refusal(t, report, opt.timeout, has_status)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        # the device went away or stopped answering: what was checked stays reported
        report.add(cid, FAIL, f"{type(exc).__name__}: {exc}",
                   instance="(the check stopped here)")
        done = {c.id.split("[")[0] for c in report.checks}
        for other in live:
            if other not in done:
                report.add(other, SKIP, f"not reached: the device failed during {cid}")
        return report
    _live_session(t, report, opt, use_notify, nrq, reset_note)
    return report


#: feature bits of a virtio-fs device over a transport (anything else is not offered by a
#: conformant device: D7); 24 and 27 are legacy-only, 41+ are not defined for 1.3 devices
_DEFINED = (VIRTIO_FS_F_NOTIFICATION | sum(1 << b for b in (28, 29, 32, 33, 34, 35, 36, 37, 38,
                                                             39, 40)))
_VHOST_USER_OWN = (1 << 24) | (1 << 26) | (1 << 27) | (1 << 30)


def _judge_offered(offered: int, pci: bool) -> tuple[str, str]:
    """features.offered: (result, observed)."""
    problems = []
    undefined = offered & DEVICE_FEATURE_MASK & ~VIRTIO_FS_F_NOTIFICATION
    if undefined:
        problems.append(f"virtio-fs bits {feature_names(undefined)} are undefined (only bit 0 "
                        "is)")
    foreign = offered & ~_DEFINED & ~DEVICE_FEATURE_MASK
    if not pci:
        # a vhost-user backend lists what its rings support, incl. vhost-user's own bits
        # (LOG_ALL 26, PROTOCOL_FEATURES 30) and legacy ones; the frontend's device model
        # filters those before a driver sees them
        foreign &= ~_VHOST_USER_OWN
        if offered & Feature.SR_IOV:
            problems.append("VIRTIO_F_SR_IOV offered by a device that is not PCI")
    if foreign:
        problems.append(f"reserved or legacy-only bits offered: {feature_names(foreign)}")
    if offered & ~((1 << 32) - 1) & ~Feature.VERSION_1 and not offered & Feature.VERSION_1:
        problems.append("1.0+ ring/transport bits offered without VIRTIO_F_VERSION_1 (they "
                        "require it)")
    notif = "offered" if offered & VIRTIO_FS_F_NOTIFICATION else "not offered"
    desc = f"{offered:#x}: VIRTIO_FS_F_NOTIFICATION {notif}"
    return (FAIL, f"{desc}; {'; '.join(problems)}") if problems else (PASS, desc)


def _live_session(t: Transport, report: Report, opt: CheckOptions, use_notify: bool, nrq: int,
                  reset_note: str) -> None:
    fs = _new_fs(t, opt, use_notify)
    skipped: list[str] = []

    def skip_rest(why: str, ids: list[str]) -> None:
        for cid in ids:
            if cid not in skipped:
                report.add(cid, SKIP, f"not reached: {why}")
                skipped.append(cid)

    rest = ["bringup", *_SESSION_CHECKS, "reset.live"]
    try:
        fs.start()
    except FeatureNegotiationError as exc:
        # refusing FEATURES_OK is what a device MUST do with features it does not take
        # (D6); not taking a valid subset is D5, a SHOULD: a deviation, and with no
        # session nothing live is checked, so the run is incomplete (exit status 1)
        ring = f" (--ring {opt.ring})" if opt.ring else ""
        report.add("features.features_ok", PASS, f"refused the driver's features{ring}: {exc}",
                   deviation="D5 (SHOULD): the device does not take this valid subset of "
                   "what it offers")
        report.incomplete = (f"the device did not accept the driver's features{ring}: no "
                             "live check ran" + (" (leave --ring out, or give the other "
                                                 "layout)" if opt.ring else ""))
        skip_rest("the device did not accept the driver's features", rest)
        _final_reset(t, report, opt, reset_note)
        return
    except (VfsdrvError, OSError) as exc:
        feats = fs.dev.features
        if feats:
            report.add("features.features_ok", PASS,
                       f"kept for {feature_names(feats, FS_FEATURE_NAMES)}")
        else:
            report.add("features.features_ok", FAIL, f"negotiation failed: {exc}")
        report.add("bringup", FAIL, f"{type(exc).__name__}: {exc}")
        skip_rest("bring-up failed", rest[1:])
        _final_reset(t, report, opt, reset_note)
        return
    report.negotiated = [n for n in feature_names(fs.dev.features, FS_FEATURE_NAMES).split(", ")
                         if n != "none"]
    report.ring_layout = "packed" if fs.dev.features & Feature.RING_PACKED else "split"
    report.context["notification"] = fs.notification
    try:
        status = t.get_status()
        feats = feature_names(fs.dev.features, FS_FEATURE_NAMES)
        report.add("features.features_ok", PASS, f"kept (status {status:#x}) for {feats}")
        want = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
        qdesc = (f"{len(fs.request_queues)} request queue(s) of size "
                 f"{fs.request_queues[0].vq.size}" if fs.request_queues else "no request queue")
        if status & Status.DEVICE_NEEDS_RESET:
            report.add("bringup", FAIL, f"DEVICE_NEEDS_RESET set after DRIVER_OK (status "
                       f"{status:#x})")
        elif status & want != want or status & Status.FAILED:
            report.add("bringup", FAIL, f"status reads {status:#x} after DRIVER_OK "
                       f"(expected {int(want):#x})")
        else:
            report.add("bringup", PASS, f"status {status:#x}, {qdesc}")
        if _session_checks(fs, report, opt, use_notify):
            fs = _reset_live(t, fs, report, opt, use_notify)
        else:
            report.add("reset.live", SKIP, "not reached: FUSE_INIT failed")
    finally:
        # reset (timed: a check of its own) before the rings go; the caller closes `t`
        _final_reset(t, report, opt, reset_note, after_session=True)
        for vq in fs.dev.queues.values():
            try:
                vq.close()
            except Exception as exc:  # noqa: BLE001 - releasing memory must go on
                log.debug("releasing queue %d: %s", vq.index, exc)
        fs.dev.queues.clear()


_SESSION_CHECKS = ["fuse.init", "queues.request", "queues.inflight", "hiprio.forget",
                   "hiprio.storm", "fuse.opcodes", "fuse.errors", "notify.queue", "notify.lock",
                   "notify.load"]


def _new_fs(t: Transport, opt: CheckOptions, use_notify: bool) -> _ProbeFs:
    # slots for IN_FLIGHT requests per queue plus a FORGET storm; few notification
    # buffers, so that notify.load needs them replenished
    fs = _ProbeFs(t, queue_size=opt.queue_size, notification=use_notify, small_slots=32,
                  large_slots=2, max_io=64 << 10, notify_buffers=8,
                  notify_lock_code=opt.notify_lock_code)
    fs.dev.ring = opt.ring
    fs.request_timeout = opt.timeout
    return fs


def _reset_live(t: Transport, fs: _ProbeFs, report: Report, opt: CheckOptions,
                use_notify: bool) -> _ProbeFs:
    """Reset with GETATTRs in flight on every request queue; then nothing may move in the
    used rings nor interrupt; then the same features again and a new session. Returns the
    session whose queues the caller releases (the old one's are released here)."""
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    if isinstance(fs.broken, DeviceTimeoutError):  # on_no_reply ended the session
        report.add("reset.live", SKIP, f"not reached: {fs.broken}")
        return fs
    try:
        for qs in fs.request_queues:
            fs.target = qs
            for _ in range(4):
                fs.call_async(Opcode.GETATTR, 1, body)
        fs.target = None
        took = _time_reset(t, opt.timeout)
    except (VfsdrvError, OSError) as exc:
        report.add("reset.live", FAIL, f"reset with requests in flight: {exc}")
        return fs
    vqs = list(fs.dev.queues.values())
    fds = [t.interrupt_fd(vq.index) for vq in vqs]
    for fd in fds:
        probes._drain(fd)
    before = [vq.used_idx() for vq in vqs]
    time.sleep(probes.QUIET)
    moved = [vq.index for vq, b in zip(vqs, before, strict=True) if vq.used_idx() != b]
    irqs = [vq.index for vq, fd in zip(vqs, fds, strict=True) if probes._irq_seen(fd, 0)]
    for vq in vqs:
        vq.close()
    fs.dev.queues.clear()
    desc = f"reset with {4 * len(fs.request_queues)} GETATTRs in flight took {_fmt_ms(took)}"
    if moved or irqs:
        report.add("reset.live", FAIL, f"{desc}; afterwards used idx moved on queues {moved}, "
                   f"interrupts on queues {irqs}")
        return fs
    again = _new_fs(t, opt, use_notify)
    try:
        again.start()
    except FeatureNegotiationError as exc:
        report.add("reset.live", FAIL, f"{desc}; re-negotiating the same features: {exc}")
        return again
    except (VfsdrvError, OSError) as exc:
        report.add("reset.live", FAIL, f"{desc}; bring-up after it: {exc}")
        return again
    try:
        again.init(timeout=opt.timeout)
        again.call(Opcode.GETATTR, 1, body, timeout=opt.timeout)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("reset.live", FAIL, f"{desc}; new session: {type(exc).__name__}: {exc}")
        return again
    same = again.dev.features == fs.dev.features
    report.add("reset.live", PASS if same else FAIL,
               f"{desc}; then {probes.QUIET * 1000:.0f} ms without used entries or interrupts; "
               f"the same features {'accepted' if same else 'NOT negotiated'} again, FUSE_INIT "
               "and GETATTR answered")
    return again


def _final_reset(t: Transport, report: Report, opt: CheckOptions, reset_note: str, *,
                 after_session: bool = False) -> None:
    if _is_vhost_user(t) and not getattr(t, "has_status", False):
        report.add("reset", SKIP, reset_note)
        return
    try:
        took = _time_reset(t, opt.timeout)
    except VfsdrvError as exc:
        report.add("reset", FAIL, f"{reset_note}; after the session: {exc}")
        return
    when = "after the session" if after_session else "again"
    report.add("reset", PASS, f"{reset_note}; {when}: status 0 after {_fmt_ms(took)}")


def _session_checks(fs: _ProbeFs, report: Report, opt: CheckOptions, use_notify: bool) -> bool:
    """Everything in one FUSE session; False when FUSE_INIT failed."""
    # FUSE_INIT ------------------------------------------------------------------------------
    fs.target = fs.request_queues[0]  # FUSE_INIT on the first request queue, as Linux does
    try:
        out = fs.init(timeout=opt.timeout)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("fuse.init", FAIL, f"{type(exc).__name__}: {exc}")
        for cid in _SESSION_CHECKS[1:]:
            if cid != "notify.queue":
                report.add(cid, SKIP, "not reached: FUSE_INIT failed")
        _notify_check(fs, report, use_notify)
        return False
    finally:
        fs.target = None
    problems = []
    if out.max_write < 4096:
        problems.append(f"max_write {out.max_write} < 4096")
    desc = (f"FUSE {out.major}.{out.minor}, max_write {out.max_write}, max_readahead "
            f"{out.max_readahead}, flags {fs.init_flags:#x}")
    if problems:
        report.add("fuse.init", FAIL, f"{desc}: {'; '.join(problems)}")
    else:
        report.add("fuse.init", PASS, desc)

    # every request queue answers ------------------------------------------------------------
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    for qs in fs.request_queues:
        fs.target = qs
        start = time.monotonic()
        try:
            reply = fs.call(Opcode.GETATTR, 1, body, timeout=opt.timeout)
            took = time.monotonic() - start
            if len(reply) < abi.sizeof("fuse_attr_out"):
                report.add("queues.request", FAIL, f"GETATTR reply of {len(reply)} bytes",
                           instance=str(qs.vq.index))
            else:
                attr = abi.unpack("fuse_attr_out", reply).attr
                report.add("queues.request", PASS,
                           f"GETATTR of the root answered in {_fmt_ms(took)} (mode "
                           f"{attr.mode:#o})", instance=str(qs.vq.index))
        except (VfsdrvError, OSError, TimeoutError) as exc:
            report.add("queues.request", FAIL, f"{type(exc).__name__}: {exc}",
                       instance=str(qs.vq.index))
        finally:
            fs.target = None

    # hiprio takes FORGET, then the checks that need no scratch directory ------------------
    broken: str | None = None
    for cid, step in (("hiprio.forget", lambda: _forget_check(fs, report, opt)),
                      ("queues.inflight",
                       lambda: fuse_checks.inflight_checks(fs, report, opt.timeout))):
        broken = _run_step(fs, report, cid, step)
        if broken is not None:
            break
    if broken is not None:
        done = {c.id.split("[")[0] for c in report.checks}
        for cid in _SESSION_CHECKS:
            if cid not in done:
                report.add(cid, SKIP, f"not reached: the session broke during {broken}")
        return True
    with interrupt.deferred():  # Ctrl-C from here on: between requests, then clean up
        scratch = None
        if not opt.read_only:
            scratch = fuse_checks.Scratch(fs.client())
            try:
                scratch.create()
            except (VfsdrvError, OSError, TimeoutError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.EROFS:
                    # a read-only export is not the device's fault: the checks that
                    # write skip, as with --read-only
                    report.add("fuse.opcodes", SKIP, "the export is read-only (EROFS for "
                               "the scratch directory; --read-only says so up front)",
                               instance="MKDIR")
                else:
                    report.add("fuse.opcodes", FAIL,
                               f"cannot create the scratch directory: {exc}", instance="MKDIR")
                    if fs._broken is None and not isinstance(exc, FileExistsError):
                        scratch.discard()
                scratch = None
        try:
            if scratch is None:
                why = "--read-only" if opt.read_only else "no scratch directory (see MKDIR)"
                report.add("fuse.opcodes", SKIP, f"{why}: the opcodes that write were not "
                           "sent")
            steps = [("fuse.opcodes", lambda: fuse_checks.opcode_checks(fs, report, scratch)
                      if scratch is not None else None),
                     ("fuse.errors", lambda: fuse_checks.error_checks(fs, report, scratch)),
                     ("hiprio.storm",
                      lambda: fuse_checks.storm_check(fs, report, opt.timeout, scratch)),
                     ("notify.queue", lambda: _notify_check(fs, report, use_notify)),
                     ("notify.lock", lambda: _lock_check(fs, report, opt, use_notify, scratch)),
                     ("notify.load", lambda: fuse_checks.notify_load_check(
                         fs, report, opt.timeout, scratch, opt.read_only))]
            # a check that catches the device's errors itself still leaves the session
            # broken (VirtioFs._broken): the later checks are then not reached
            broken = "the scratch directory's creation" if fs._broken is not None else None
            notified = (0, 0)
            for cid, step in steps:
                interrupt.checkpoint()
                if broken is not None:
                    report.add(cid, SKIP, f"not reached: the session broke during {broken}")
                    continue
                broken = _run_step(fs, report, cid, step)
                if cid == "notify.queue":  # what later notifications are judged against
                    notified = _bad_notifications(fs)
            if use_notify and broken is None:
                _late_notifications(fs, report, notified)
        finally:
            if scratch is not None:
                scratch.remove()
        interrupt.checkpoint()
    return True


def _run_step(fs: _ProbeFs, report: Report, cid: str, step: Callable[[], object]
              ) -> str | None:
    """One check of the live session; `cid` when the session broke in it, else None.
    What a check did not expect fails that check and the report stays (a ValueError:
    the driver refused a request the device's own answers made impossible, such as
    a write beyond a max_write under 4096); a broken ring or a device gone ends the
    session's other checks."""
    try:
        step()
    except (VfsdrvError, OSError, TimeoutError, ValueError) as exc:
        report.add(cid, FAIL, f"{type(exc).__name__}: {exc}",
                   instance="(the check stopped here)")
        if isinstance(exc, fuse_checks.SESSION_BROKEN):
            return cid
    return cid if fs._broken is not None else None


def _forget_check(fs: _ProbeFs, report: Report, opt: CheckOptions) -> None:
    """LOOKUP an entry of the root (found by READDIR) and FORGET it on hiprio; with an empty
    root, FORGET the root with nlookup 0 (a no-op for the device's lookup counts)."""
    client = fs.client()
    nodeid, nlookup, what = 1, 0, "root, nlookup 0 (empty export)"
    try:
        entries = [e for e in client.readdir_all(1) if e.name not in (b".", b"..")]
        names = [e.name for e in entries]
        fs.regular_files = [e.name for e in entries if e.type == 8]  # DT_REG
        if names:
            entry = client.lookup(1, names[0])
            nodeid, nlookup, what = entry.nodeid, 1, f"{names[0]!r} after LOOKUP, nlookup 1"
    except (VfsdrvError, OSError, TimeoutError) as exc:
        log.debug("readdir/lookup before FORGET: %s", exc)
    assert fs.hiprio is not None
    used_before = fs.hiprio.vq.num_free
    # FORGET has no reply: it is done when the device has used the buffer (hiprio idle)
    fs.call_async(Opcode.FORGET, nodeid, abi.pack("fuse_forget_in", nlookup=nlookup))
    deadline = time.monotonic() + opt.timeout
    while not fs.hiprio.vq.idle and time.monotonic() < deadline:
        fs.wait(0.05)
    if not fs.hiprio.vq.idle:
        report.add("hiprio.forget", FAIL,
                   f"FORGET ({what}) not used within {opt.timeout:g} s (hiprio free "
                   f"descriptors {used_before} before)")
        return
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    try:
        fs.call(Opcode.GETATTR, 1, body, timeout=opt.timeout)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("hiprio.forget", FAIL, f"FORGET ({what}) used, but then GETATTR failed: "
                   f"{exc}")
        return
    report.add("hiprio.forget", PASS, f"FORGET ({what}) used; GETATTR still answered")


def _notify_check(fs: _ProbeFs, report: Report, use_notify: bool) -> None:
    if not use_notify:
        report.add("notify.queue", SKIP, "VIRTIO_FS_F_NOTIFICATION not negotiated")
        return
    vq = fs.notify_vq
    if vq is None or fs.config is None:
        report.add("notify.queue", FAIL, "negotiated, but no notification queue was set up")
        return
    try:
        fs.process()
    except VfsdrvError as exc:
        report.add("notify.queue", FAIL, f"{exc}")
        return
    bad, undefined = _bad_notifications(fs)
    got = sum(v for k, v in fs.stats.items() if k.startswith("notify_")) + fs.stats.get(
        "lock_notifications", 0)
    desc = (f"queue {NOTIFY_QUEUE} size {vq.size}, {min(fs.notify_buffers, vq.size)} buffers of "
            f"{fs.config.notify_buf_size} bytes posted, {got} notification(s) received")
    if bad or undefined:
        report.add("notify.queue", FAIL, f"{desc}: {_notify_faults(bad, undefined)}")
    else:
        report.add("notify.queue", PASS, desc)


def _bad_notifications(fs: _ProbeFs) -> tuple[int, int]:
    """(malformed, with a code FUSE does not define) notifications so far."""
    return fs.stats.get("bad_notification", 0), fs.stats.get("notify_other", 0)


def _notify_faults(bad: int, undefined: int) -> str:
    return ", ".join(x for x in (f"{bad} malformed" if bad else "",
                                 f"{undefined} with a notify code FUSE does not define (the "
                                 "kernel refuses them)" if undefined else "") if x)


def _late_notifications(fs: _ProbeFs, report: Report, before: tuple[int, int]) -> None:
    """Notifications that went wrong after notify.queue was judged (during the lock and
    load checks): that check fails too, with what came."""
    bad, undefined = _bad_notifications(fs)
    if (bad, undefined) != before:
        report.add("notify.queue", FAIL, _notify_faults(bad - before[0], undefined - before[1])
                   + " later in the session", instance="later")


def _notification_stats(fs: _ProbeFs) -> dict[str, int]:
    return {k: v for k, v in fs.stats.items()
            if k.startswith("notify_") or k == "bad_notification"}


def _notification_counts(fs: _ProbeFs, before: dict[str, int]) -> str:
    """What came on the notification queue since `before`, by kind ("none")."""
    now = _notification_stats(fs)
    seen = {k: now[k] - before.get(k, 0) for k in now if now[k] > before.get(k, 0)}
    names = {"bad_notification": "malformed", "notify_other": "code over 9"}
    return ", ".join(f"{n} {names.get(k, 'code ' + k.removeprefix('notify_'))}"
                     for k, n in sorted(seen.items())) or "none"


def _lock_check(fs: _ProbeFs, report: Report, opt: CheckOptions, use_notify: bool,
                scratch: fuse_checks.Scratch | None) -> None:
    """Contended locks on a regular file of the root (or, with none there, one made in the
    scratch directory), nothing written: owner A holds a write lock (the file opened
    read-write), owner B asks SETLKW for a read lock (the device answers "wait"), A
    unlocks, B's grant must come as FUSE_NOTIFY_LOCK. If the file cannot be opened for
    writing, an uncontended SETLKW read lock only."""
    import fcntl
    import os

    from ..fs.client import OFFSET_MAX, Lock

    if not use_notify:
        report.add("notify.lock", SKIP, "VIRTIO_FS_F_NOTIFICATION not negotiated")
        return
    if not fs.init_flags & abi.InitFlag.POSIX_LOCKS:
        report.add("notify.lock", SKIP, "the device did not grant FUSE_POSIX_LOCKS in FUSE_INIT")
        return
    client = fs.client()
    parent = 1
    if fs.regular_files:
        name = fs.regular_files[0]
    elif scratch is not None:
        name, parent = b"lockme", scratch.nodeid
        try:
            made, h = client.create(parent, name.decode(), 0o644)
            scratch.names.append(name.decode())
            client.release(made.nodeid, h.fh)
        except (VfsdrvError, OSError, TimeoutError) as exc:
            report.add("notify.lock", SKIP, f"cannot create a file to lock in the scratch "
                       f"directory: {exc}")
            return
    else:
        report.add("notify.lock", SKIP, "no regular file in the export's root to lock "
                   "(and no scratch directory to make one in)")
        return
    owner_a, owner_b, pid = 0x7F5C_0000_0001, 0x7F5C_0000_0002, os.getpid()
    whole = (0, OFFSET_MAX)
    handles: list[int] = []
    try:
        entry = client.lookup(parent, name)
    except (VfsdrvError, OSError, TimeoutError) as exc:
        report.add("notify.lock", SKIP, f"cannot look up {name!r}: {exc}")
        return
    waits, notes_before = fs.stats["lock_waits"], _notification_stats(fs)
    try:
        fh_b = client.open(entry.nodeid, os.O_RDONLY).fh
        handles.append(fh_b)
        try:
            fh_a: int | None = client.open(entry.nodeid, os.O_RDWR).fh
            handles.append(fh_a)  # type: ignore[arg-type]
        except OSError:
            fh_a = None
        waits, notes = fs.stats["lock_waits"], fs.stats["lock_notifications"]
        early = fs.stats["lock_notify_before_reply"]
        if fh_a is not None:
            client.setlk(entry.nodeid, fh_a, owner_a, Lock(*whole, fcntl.F_WRLCK, pid))
        start = time.monotonic()
        pending = client.setlkw_async(entry.nodeid, fh_b, owner_b,
                                      Lock(*whole, fcntl.F_RDLCK, pid))
        if fh_a is not None:
            deadline = time.monotonic() + opt.timeout
            while (not pending.done and fs.lock_waiters == 0
                   and time.monotonic() < deadline):
                fs.wait(0.05)
            if pending.done:
                raise OSError(0, "SETLKW of a conflicting read lock completed while the write "
                              "lock was held")
            client.setlk(entry.nodeid, fh_a, owner_a, Lock(*whole, fcntl.F_UNLCK, pid))
        pending.result(opt.timeout)
        took = time.monotonic() - start
        waited = fs.stats["lock_waits"] - waits + fs.stats["lock_notify_before_reply"] - early
        notified = fs.stats["lock_notifications"] - notes
        how = "contended (write lock held by another owner, then released)" \
            if fh_a is not None else "uncontended (file not writable)"
        if notified:
            report.add("notify.lock", PASS,
                       f"SETLKW F_RDLCK on {name!r}, {how}: {'wait reply, ' if waited else ''}"
                       f"FUSE_NOTIFY_LOCK (error 0) after {_fmt_ms(took)}")
        elif fh_a is None:
            report.add("notify.lock", PASS, f"SETLKW F_RDLCK on {name!r}, {how}: granted at "
                       "once (no wait, no notification needed)")
        else:
            report.add("notify.lock", FAIL, f"SETLKW F_RDLCK on {name!r}, {how}: completed "
                       "without a FUSE_NOTIFY_LOCK")
        client.setlk(entry.nodeid, fh_b, owner_b, Lock(*whole, fcntl.F_UNLCK, pid))
    except (VfsdrvError, OSError, TimeoutError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError) and fs.stats["lock_waits"] > waits:
            why += (f" (it answered \"wait\", but no FUSE_NOTIFY_LOCK with code "
                    f"{fs.notify_lock_code} came; notifications meanwhile: "
                    f"{_notification_counts(fs, notes_before)}; --notify-lock-code N if "
                    "the device uses another code)")
        report.add("notify.lock", FAIL, f"SETLKW F_RDLCK on {name!r}: {why}")
    finally:
        for fh in handles:
            try:
                client.release(entry.nodeid, fh)
            except (VfsdrvError, OSError, TimeoutError) as exc:
                log.debug("release after the lock check: %s", exc)
        try:
            client.forget(entry.nodeid, 1)
        except (VfsdrvError, OSError) as exc:
            log.debug("forget after the lock check: %s", exc)


__all__ = ["CheckOptions", "HIPRIO_QUEUE", "check_pci_function", "run_checks"]
