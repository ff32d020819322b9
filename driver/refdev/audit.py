"""Auditing mode of the reference device: the driver's own conformance.

With ``RefDevice(..., audit=True)`` (``--audit``) the device offers the vhost-user
STATUS protocol feature, so it sees every device-status write, and checks every
driver-normative statement it can observe from its side of the socket and the
rings. Each statement carries its number in the driver-normative checklist of the
virtio-fs spec digest (§9, items 1-67) and ends

* ``held``: exercised (observed at least once) and never broken,
* ``violated``: broken at least once (the first observations are kept), or
* ``not-exercised``: nothing the driver did touched it.

A MUST violation fails the audit; a SHOULD violation is a warning.

The checks are the auditor's own: chains are walked independently of the
device's parser (which goes on refusing what it refuses), so a misbehaving
driver is both reported precisely and kept away from the device.

One `Auditor` is shared by all sessions of a device (thread-safe); each session
has a `SessionAudit` (status sequence, features, FUSE session start) and each of
its queues a `QueueAudit` (ring layout, descriptor chains, avail index), both
used only from that session's thread.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..fs import abi
from ..virtio import ring_layout as rl
from ..virtio import vhost_user_proto as vu
from .guest_memory import MemoryAccessError

if TYPE_CHECKING:
    from .device_queue import DeviceQueue

MUST, SHOULD = "MUST", "SHOULD"
HELD, VIOLATED, NOT_EXERCISED = "held", "violated", "not-exercised"

#: the driver-normative checklist of the spec digest (§9) has items 1-67
#: (68-72 are proposal-level behaviours, not normative)
CHECKLIST_SIZE = 67

# device status bits (virtio 1.2 2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 128
STATUS_ORDER = ((DRIVER, ACKNOWLEDGE), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK))

# feature bits a virtio-fs driver may accept over vhost-user (anything else is
# undefined for the device type, reserved, legacy-only or not for this transport)
F_NOTIFICATION = 1 << 0
F_VERSION_1 = 1 << 32
F_SR_IOV = 1 << 37
DEFINED_FEATURES = (
    F_NOTIFICATION
    | sum(1 << b for b in (28, 29, 32, 33, 34, 35, 36, 38, 39, 40))
    | vu.VHOST_USER_F_PROTOCOL_FEATURES
)

#: auditing probes: the device departs from its normal behaviour to see how the
#: driver copes. "unknown-feature" also offers UNKNOWN_FEATURE (a virtio-fs bit
#: the spec leaves undefined), "refuse-features-ok" never keeps FEATURES_OK.
PROBE_UNKNOWN_FEATURE = "unknown-feature"
PROBE_REFUSE_FEATURES_OK = "refuse-features-ok"
PROBES = frozenset({PROBE_UNKNOWN_FEATURE, PROBE_REFUSE_FEATURES_OK})
UNKNOWN_FEATURE = 1 << 23

#: offset of notify_buf_size in struct virtio_fs_config (optional field)
NOTIFY_BUF_SIZE_OFFSET = 40
#: observations kept per violated statement
KEPT_VIOLATIONS = 5
#: a driver publishes, then kicks at once: an avail idx that moved without a kick
#: for this long (seen on two checks) is a lost notification
LOST_KICK_GRACE = 0.5


@dataclass(frozen=True)
class Statement:
    id: str
    checklist: int  # item of the digest's §9 checklist
    section: str  # where the spec says it
    level: str  # MUST or SHOULD
    text: str


def _s(id_: str, item: int, section: str, level: str, text: str) -> Statement:
    return Statement(id_, item, section, level, text)


#: every statement the auditor checks, in report order
STATEMENTS: tuple[Statement, ...] = (
    _s("1", 1, "§3.6 §3.7", MUST, "The driver MUST update device status, setting bits to "
       "indicate the completed steps of the initialization sequence: ACKNOWLEDGE, DRIVER, "
       "FEATURES_OK, DRIVER_OK, each only once the ones before it are set."),
    _s("2", 2, "§3.6", MUST, "The driver MUST NOT clear a device status bit (only a reset "
       "writes 0)."),
    _s("3", 3, "§3.6", MUST, "If the driver sets the FAILED bit, the driver MUST later reset "
       "the device before attempting to re-initialize."),
    _s("5", 5, "§3.8", MUST, "The driver MUST NOT accept a feature which the device did not "
       "offer."),
    _s("7", 7, "§3.8", MUST, "The driver MUST NOT accept a feature bit that is not described "
       "in the spec, reserved, not supported for the transport or not defined for the device "
       "type (virtio-fs bits 1-23, legacy-only bits 24 and 27)."),
    _s("9", 9, "§3.8", MUST, "The driver MUST NOT fail solely because a feature it does not "
       "understand has been offered (probe: an undefined virtio-fs bit offered; the driver "
       "reaches DRIVER_OK)."),
    _s("10", 10, "§3.8", MUST, "A driver MUST accept VIRTIO_F_VERSION_1 if it is offered."),
    _s("15", 15, "§3.8", MUST, "A driver MUST NOT negotiate VIRTIO_F_SR_IOV if the device is "
       "not a PCI device (vhost-user)."),
    _s("16", 16, "§3.7", MUST, "The driver MUST follow the initialization sequence: reset, "
       "ACKNOWLEDGE, DRIVER, write features, FEATURES_OK, re-read status, device-specific "
       "setup (queues), DRIVER_OK."),
    _s("17", 17, "§3.7", MUST, "During feature negotiation the driver MAY read but MUST NOT "
       "write the device-specific configuration."),
    _s("18", 18, "§3.7", MUST, "The driver MUST NOT accept new feature bits after setting "
       "FEATURES_OK."),
    _s("19", 19, "§3.7", MUST, "If FEATURES_OK is not still set when the driver re-reads the "
       "status, the device is unusable: the driver MUST NOT continue initialization (probe: "
       "the device refuses FEATURES_OK)."),
    _s("19b", 19, "§3.7", SHOULD, "If FEATURES_OK is not still set, the driver SHOULD set the "
       "FAILED status bit."),
    _s("20", 20, "§3.7", MUST, "The driver MUST NOT send any available buffer notifications "
       "(kicks) before setting DRIVER_OK."),
    _s("21", 21, "§3.7", MUST, "After writing 0 to the device status (reset), the driver MUST "
       "wait for a read of the status to return 0 before reinitializing the device."),
    _s("23", 23, "§1.3", MUST, "For optional config fields (notify_buf_size) the driver MUST "
       "check that the corresponding feature (VIRTIO_FS_F_NOTIFICATION) is offered before "
       "accessing them."),
    _s("25", 25, "§4.1", MUST, "A driver MUST NOT alter the descriptor table entries of "
       "exposed (available, not yet used) buffers of a live virtqueue."),
    _s("26", 26, "§4.1", MUST, "The driver MUST ensure each virtqueue part is aligned: "
       "descriptor table 16, available ring 2, used ring 4 bytes."),
    _s("27", 27, "§4.1", MUST, "The driver MUST place device-writable descriptors after "
       "device-readable ones."),
    _s("28", 28, "§4.1", MUST, "Drivers MUST NOT add a descriptor chain longer than 2^32 "
       "bytes in total (nor one that loops)."),
    _s("30a", 30, "§4.1", MUST, "The driver MUST NOT set VIRTQ_DESC_F_INDIRECT unless "
       "VIRTIO_F_INDIRECT_DESC was negotiated."),
    _s("30b", 30, "§4.1", MUST, "The driver MUST NOT set VIRTQ_DESC_F_INDIRECT within an "
       "indirect descriptor table."),
    _s("30c", 30, "§4.1", MUST, "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and "
       "VIRTQ_DESC_F_NEXT in one descriptor."),
    _s("30d", 30, "§4.1", MUST, "A driver MUST NOT create a descriptor chain longer than the "
       "Queue Size."),
    _s("31", 31, "§4.1", MUST, "A driver MUST NOT decrement the available idx."),
    _s("31b", 31, "§4.1", MUST, "The driver MUST NOT expose more chains than the ring has "
       "entries: the available idx never runs more than the queue size ahead of the device."),
    _s("32", 32, "§4.1", MUST, "Without VIRTIO_F_EVENT_IDX the driver MUST set avail->flags "
       "to 0 or 1; with it, to 0."),
    _s("35", 35, "§4.1", MUST, "The driver MUST initialize flags in the used ring to 0 when "
       "allocating the used ring."),
    _s("36", 36, "§4.1", MUST, "Without VIRTIO_F_EVENT_IDX, while used->flags is 0 (this "
       "device never sets NO_NOTIFY) the driver MUST send a notification after making "
       "buffers available."),
    _s("37", 37, "§4.1", MUST, "With VIRTIO_F_EVENT_IDX, the driver MUST send a notification "
       "when the available idx it publishes goes past avail_event."),
    _s("50", 50, "§4.1", MUST, "Queue sizes are powers of 2 no larger than 32768 (the "
       "device's maximum); the driver MUST NOT set any other (SET_VRING_NUM)."),
    _s("51a", 51, "§3.7", MUST, "The driver MUST configure the other virtqueue fields (size, "
       "ring addresses) before enabling the virtqueue."),
    _s("51b", 51, "§3.7", MUST, "The driver MUST NOT disable a virtqueue while the device is "
       "live (queue_enable 0; vhost-user: SET_VRING_ENABLE 0 after DRIVER_OK)."),
    _s("58", 58, "§1.3", MUST, "The driver MUST NOT write to device configuration fields "
       "(tag, num_request_queues, notify_buf_size): no SET_CONFIG."),
    _s("59", 59, "§1.2", MUST, "The driver MAY use from one up to num_request_queues request "
       "virtqueues, and MUST NOT use a queue index outside hiprio, notification and those."),
    _s("60", 60, "§1.6", MUST, "The driver MUST submit FUSE_INTERRUPT, FUSE_FORGET and "
       "FUSE_BATCH_FORGET requests solely on the hiprio queue."),
    _s("61", 61, "§1.6", MUST, "The driver MUST not submit normal requests on the hiprio "
       "queue."),
    _s("63", 63, "§1.7", MUST, "The driver MUST provide notification queue buffers of at "
       "least notify_buf_size bytes, device-writable only."),
    _s("64", 64, "§1.7", SHOULD, "The driver SHOULD replenish notification queue buffers "
       "sufficiently quickly so that there is always at least one available buffer (also "
       "when DRIVER_OK is set)."),
    _s("67", 67, "§1.5", MUST, "The driver MUST start a FUSE session with one FUSE_INIT on a "
       "request queue, before any other request (required for interop)."),
    _s("67b", 67, "§1.5", SHOULD, "The session's byte order is the one its FUSE_INIT was "
       "sent in (§1.5: the driver chooses it, the device detects it): the driver SHOULD send "
       "it little-endian, the only order virtiofsd and this device serve (for interop)."),
)
BY_ID = {s.id: s for s in STATEMENTS}

#: register-level statements of the PCI transport, observed only when the driver runs
#: behind an emulated virtio-pci function whose device model forwards to this device
#: (tests/fakes/vhost_pci_bridge.py, QEMU's role); that model reports them through
#: `Auditor.held`/`violated`. A vhost-user device never sees a PCI register.
PCI_STATEMENTS: tuple[Statement, ...] = (
    _s("45", 45, "§3.1", MUST, "PCI: the driver MUST use 8/16/32-bit aligned accesses for "
       "8/16/32-bit fields, and 64-bit fields as two 32-bit halves."),
    _s("47", 47, "§3.2", MUST, "PCI: the driver MUST NOT write into any capability structure "
       "(the device-specific config region included)."),
    _s("49", 49, "§3.3", MUST, "PCI: the driver MUST NOT write device_feature, num_queues, "
       "config_generation, queue_notify_off or queue_notif_config_data."),
    _s("55", 55, "§3.7", MUST, "PCI: without NOTIFICATION_DATA an available buffer "
       "notification MUST be a 16-bit write of the queue index to its notify address."),
)
STATEMENTS = STATEMENTS + PCI_STATEMENTS
BY_ID = {s.id: s for s in STATEMENTS}

#: checklist items (§9, 1-67) no vhost-user device can observe, and why; together with
#: the items the audit covers they make up the whole checklist (AuditReport.coverage)
NOT_OBSERVABLE: dict[int, str] = {
    4: "the driver's own use of completions once DEVICE_NEEDS_RESET is set: a vhost-user "
       "backend has no way to set DEVICE_NEEDS_RESET, and what the driver relies on is "
       "internal to it (driver tests: tests/test_virtio_device.py)",
    6: "no feature this device offers depends on another (VERSION_1, INDIRECT_DESC, "
       "EVENT_IDX, VIRTIO_FS_F_NOTIFICATION are independent)",
    8: "the device offers every feature the driver needs; the choice between a legacy mode "
       "and FAILED for a device without VERSION_1 is the driver's own (it has no legacy "
       "mode: tests/test_virtio_device.py)",
    11: "VIRTIO_F_ACCESS_PLATFORM is not offered in auditing mode (the auditor reads rings "
        "by guest-physical address; refdev --access-platform offers it outside that mode); "
        "how addresses are translated (IOMMU or physical) is seen by the IOMMU, not by the "
        "device",
    12: "VIRTIO_F_RING_PACKED is not offered in auditing mode, which offers split rings only "
        "(vfsdrv does drive packed rings: vfsdrv check --ring packed): a SHOULD that cannot "
        "come up",
    13: "VIRTIO_F_ORDER_PLATFORM is not offered over vhost-user; barriers leave no trace a "
        "device can see",
    14: "VIRTIO_F_NOTIF_CONFIG_DATA is PCI-only and not offered",
    22: "the config is read with one GET_CONFIG message (atomic, no config_generation); "
        "behind PCI the generation loop is the driver's own",
    24: "how the driver sizes its config reads is internal; the device only sees reads within "
        "the config it has",
    29: "VIRTIO_F_IN_ORDER is not offered",
    33: "spurious used-buffer notifications are handled (or not) inside the driver",
    34: "what the driver does with bytes beyond the used len is internal to it",
    38: "memory barriers leave no trace a device can see (the native helper provides them; "
        "docs in README, driver/_native_build.py)",
    39: "VIRTIO_F_RING_PACKED is not negotiated (packed-ring rules 39-42 do not apply)",
    40: "VIRTIO_F_RING_PACKED is not negotiated",
    41: "VIRTIO_F_RING_PACKED is not negotiated",
    42: "VIRTIO_F_RING_PACKED is not negotiated",
    43: "VIRTIO_F_RING_RESET is not offered (the driver never resets single queues)",
    44: "PCI only: which vendor/device IDs the driver binds is decided before any device "
        "sees it (vfsdrv.virtio.pci.check_identity, tests/test_pci_transport.py)",
    45: "PCI only: register access widths; observed behind the emulated virtio-pci function "
        "(tests/test_audit_driver.py runs the workload there)",
    46: "PCI only: how the driver parses capabilities is internal (reserved cfg_type and BAR "
        "entries ignored: tests/test_pci_transport.py)",
    47: "PCI only: writes into capability structures; observed behind the emulated "
        "virtio-pci function (tests/test_audit_driver.py)",
    48: "PCI only: looking for the virtio capabilities happens before the device is used",
    49: "PCI only: writes to read-only common cfg fields; observed behind the emulated "
        "virtio-pci function (tests/test_audit_driver.py)",
    52: "PCI only: ISR reads with MSI-X enabled (the bridge reports ISR reads only for "
        "queues without a vector)",
    53: "PCI only: MSI-X vector programming and its read-back are checked by "
        "tests/test_pci_transport.py against a device model that refuses vectors",
    54: "PCI only: one interrupt for both config change and used buffers",
    55: "PCI only: the notify write; observed behind the emulated virtio-pci function "
        "(tests/test_audit_driver.py)",
    56: "PCI only: vfsdrv never uses VIRTIO_PCI_CAP_PCI_CFG",
    57: "PCI only: vfsdrv never uses vendor data capabilities",
    62: "ordering across queues is the driver's own: a dependent request is made available "
        "only after its prerequisite was used, which a device cannot tell from chance",
    65: "the device has no shared memory region 0 (DAX window); the driver's fallback to "
        "READ/WRITE is the only behaviour, exercised by the whole workload",
    66: "the DAX window is not offered, so no mapping is ever accessed",
}


@dataclass
class _Record:
    held: int = 0
    violated: int = 0
    held_detail: str = ""
    violations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    """One statement's line of the report."""

    id: str
    checklist: int
    section: str
    level: str
    statement: str
    result: str
    observed: str
    held: int
    violated: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "checklist": self.checklist, "section": self.section,
            "level": self.level, "statement": self.statement, "result": self.result,
            "observed": self.observed, "held": self.held, "violated": self.violated,
        }


@dataclass(frozen=True)
class AuditReport:
    entries: list[Entry]

    @property
    def covered(self) -> list[int]:
        """Checklist items with at least one statement exercised."""
        return sorted({e.checklist for e in self.entries if e.result != NOT_EXERCISED})

    @property
    def violated(self) -> list[Entry]:
        """MUST statements broken: the audit fails."""
        return [e for e in self.entries if e.result == VIOLATED and e.level == MUST]

    @property
    def warnings(self) -> list[Entry]:
        """SHOULD statements broken."""
        return [e for e in self.entries if e.result == VIOLATED and e.level == SHOULD]

    @property
    def ok(self) -> bool:
        return not self.violated

    def entry(self, statement_id: str) -> Entry:
        for e in self.entries:
            if e.id == statement_id:
                return e
        raise KeyError(statement_id)

    def result(self, statement_id: str) -> str:
        return self.entry(statement_id).result

    def coverage(self) -> dict[str, Any]:
        """Every checklist item: `covered` (exercised), `not_observable` (item -> why no
        device of this kind can see it, or why it cannot come up in this run), and
        `not_exercised` (observable but nothing the driver did touched it: empty for the
        whole `vfsdrv audit` workload). covered + not_observable + not_exercised = size."""
        covered = self.covered
        exercised = {e.id for e in self.entries if e.result != NOT_EXERCISED}
        not_observable: dict[str, str] = {}
        not_exercised: list[int] = []
        for item in range(1, CHECKLIST_SIZE + 1):
            if item in covered:
                continue
            if item in NOT_OBSERVABLE:
                not_observable[str(item)] = NOT_OBSERVABLE[item]
            elif item == 36 and "37" in exercised:
                not_observable["36"] = ("every session negotiated VIRTIO_F_EVENT_IDX, and 36 "
                                        "is the rule without it (tests/test_audit_frontend.py "
                                        "exercises it with a frontend that does not)")
            else:
                not_exercised.append(item)
        return {"covered": covered, "not_observable": not_observable,
                "not_exercised": not_exercised, "checklist_size": CHECKLIST_SIZE}

    def summary(self) -> str:
        cov = self.coverage()
        tail = (f"; not exercised: {', '.join(map(str, cov['not_exercised']))}"
                if cov["not_exercised"] else "")
        return (
            f"covered {len(self.covered)} of {CHECKLIST_SIZE} driver-normative checklist items "
            f"({', '.join(str(n) for n in self.covered) or 'none'}), "
            f"{len(cov['not_observable'])} not observable from the device{tail}; "
            f"{len(self.violated)} violated (MUST), {len(self.warnings)} warning(s) (SHOULD)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "covered": len(self.covered),
            "covered_items": self.covered,
            "checklist_size": CHECKLIST_SIZE,
            "coverage": self.coverage(),
            "violated": [e.id for e in self.violated],
            "warnings": [e.id for e in self.warnings],
            "summary": self.summary(),
            "statements": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        lines = [f"{'id':<5} {'level':<6} {'result':<13} statement / observed"]
        for e in self.entries:
            result = e.result if not (e.result == VIOLATED and e.level == SHOULD) else "warning"
            lines.append(f"{e.id:<5} {e.level:<6} {result:<13} {e.statement}")
            if e.observed:
                lines.append(f"{'':<27}-> {e.observed}")
        lines.append(self.summary())
        return "\n".join(lines)


class Auditor:
    """Statement records shared by every session of one device (or of several
    devices given the same auditor)."""

    def __init__(self, probes: frozenset[str] | set[str] = frozenset()) -> None:
        unknown = set(probes) - PROBES
        if unknown:
            raise ValueError(f"unknown audit probe(s) {sorted(unknown)}; known: {sorted(PROBES)}")
        self.probes = frozenset(probes)
        self._mutex = threading.Lock()
        self._records = {s.id: _Record() for s in STATEMENTS}

    def held(self, sid: str, detail: str = "") -> None:
        with self._mutex:
            rec = self._records[sid]
            rec.held += 1
            if detail:
                rec.held_detail = detail

    def violated(self, sid: str, detail: str) -> None:
        with self._mutex:
            rec = self._records[sid]
            rec.violated += 1
            if len(rec.violations) < KEPT_VIOLATIONS:
                rec.violations.append(detail)

    def check(self, sid: str, ok: bool, detail: str) -> bool:
        """Record one observation: held when `ok`, else violated with `detail`."""
        if ok:
            self.held(sid)
        else:
            self.violated(sid, detail)
        return ok

    def with_probes(self, probes: frozenset[str] | set[str]) -> Auditor:
        """An auditor recording into the same statements with other probes (for a
        second device of one audit)."""
        other = Auditor(probes)
        other._mutex, other._records = self._mutex, self._records
        return other

    def report(self) -> AuditReport:
        entries = []
        with self._mutex:
            for s in STATEMENTS:
                rec = self._records[s.id]
                if rec.violated:
                    result = VIOLATED
                    observed = f"violated {rec.violated} time(s): " + "; ".join(rec.violations)
                    if rec.held:
                        observed += f" (held {rec.held} time(s))"
                elif rec.held:
                    result = HELD
                    observed = f"held {rec.held} time(s)"
                    if rec.held_detail:
                        observed += f"; {rec.held_detail}"
                else:
                    result, observed = NOT_EXERCISED, ""
                entries.append(Entry(s.id, s.checklist, s.section, s.level, s.text, result,
                                     observed, rec.held, rec.violated))
        return AuditReport(entries)


def _status_str(status: int) -> str:
    names = [(ACKNOWLEDGE, "ACKNOWLEDGE"), (DRIVER, "DRIVER"), (FEATURES_OK, "FEATURES_OK"),
             (DRIVER_OK, "DRIVER_OK"), (64, "NEEDS_RESET"), (FAILED, "FAILED")]
    bits = [n for b, n in names if status & b]
    return f"{status:#x} ({'|'.join(bits) or '0'})"


class SessionAudit:
    """What one frontend connection did: status sequence, features, config, FUSE start."""

    def __init__(self, auditor: Auditor, session_id: int, offered: int,
                 notify_buf_size: int) -> None:
        self.a = auditor
        self.id = session_id
        self.offered = offered
        self.notify_buf_size = notify_buf_size
        self.status_negotiated = False
        self.config_negotiated = False
        self.status = 0
        self.features: int | None = None
        self._reset_unconfirmed = False  # 0 written, no status read since
        self._features_written = False  # since DRIVER was set
        self._reread = False  # status read after FEATURES_OK was set
        self._config_written = False
        self._driver_ok_seen = False  # since the last reset
        self._ever_live = False
        self._fuse_started = False
        self._refused = False  # FEATURES_OK refused and no reset since
        self._continued = False  # ... and the driver went on anyway

    def where(self) -> str:
        return f"session {self.id}"

    # -- status ---------------------------------------------------------------------
    def set_status(self, new: int, stored: int | None = None) -> None:
        """The driver wrote `new`; the device keeps `stored` (FEATURES_OK may be refused)."""
        stored = new if stored is None else stored
        old = self.status
        a = self.a
        if new == 0:
            if old & FAILED:
                a.held("3", "FAILED followed by a reset")
            self._end_refusal()
            self.status = 0
            self._reset_unconfirmed = True
            self._features_written = self._reread = self._driver_ok_seen = False
            return
        what = f"{self.where()}: status {_status_str(old)} -> {_status_str(new)}"
        a.check("2", not old & ~new, f"{what} clears {_status_str(old & ~new)}")
        if old & FAILED and new & ~old & ~FAILED:
            a.violated("3", f"{what}: re-initialization after FAILED without a reset")
        if old == 0:
            a.check("21", not self._reset_unconfirmed,
                    f"{what}: written after a reset without reading status 0 back")
        added = new & ~old
        for bit, before in STATUS_ORDER:
            if added & bit:
                a.check("1", bool(new & before),
                        f"{what}: {_status_str(bit)} set without {_status_str(before)}")
        if added & FEATURES_OK:
            a.check("16", self._features_written,
                    f"{what}: FEATURES_OK set before the driver wrote its features")
        if self._refused:
            if added & FAILED:
                a.held("19b", "FAILED set after FEATURES_OK was refused")
            if added & DRIVER_OK:
                self._continue(f"{what}: DRIVER_OK")
        if added & DRIVER_OK:
            problems = []
            if not new & FEATURES_OK:
                problems.append("FEATURES_OK was never set")
            elif not self._reread:
                problems.append("status not re-read after FEATURES_OK")
            if self.features is None:
                problems.append("no features written")
            a.check("16", not problems, f"{what}: DRIVER_OK with {', '.join(problems)}")
            self._driver_ok_seen = self._ever_live = True
            if PROBE_UNKNOWN_FEATURE in a.probes and self.features is not None:
                a.held("9", f"DRIVER_OK with bit 23 offered, features {self.features:#x}")
            if self.config_negotiated and not self._config_written:
                a.held("17", "no SET_CONFIG up to DRIVER_OK")
                a.held("58", "no SET_CONFIG")
        if added & FEATURES_OK and not stored & FEATURES_OK:
            self._refused = True
        self.status = stored

    def _continue(self, what: str) -> None:
        self.a.violated("19", f"{what} after the device refused FEATURES_OK")
        self._continued = True

    def _end_refusal(self) -> None:
        """A reset or the end of the connection closes a FEATURES_OK refusal."""
        if self._refused:
            if not self._continued:
                self.a.held("19", "stopped after FEATURES_OK was refused")
            if not self.status & FAILED:
                self.a.violated("19b", f"{self.where()}: FEATURES_OK refused, no FAILED "
                                "before the reset or disconnect")
        self._refused = self._continued = False

    def closed(self) -> None:
        """The frontend disconnected."""
        self._end_refusal()
        if PROBE_UNKNOWN_FEATURE in self.a.probes and self.features is not None \
                and not self._ever_live:
            self.a.violated("9", f"{self.where()}: wrote features {self.features:#x} but "
                            "never DRIVER_OK with an undefined feature bit offered")

    def status_read(self) -> None:
        self._reset_unconfirmed = False
        if self.status & FEATURES_OK:
            self._reread = True

    @property
    def live(self) -> bool:
        return bool(self.status & DRIVER_OK)

    def setup_step(self, what: str) -> None:
        """Device-specific setup (queues) belongs after FEATURES_OK (step 7)."""
        if self._refused:
            self._continue(f"{self.where()}: {what}")
            return
        if self.status_negotiated:
            self.a.check("16", bool(self.status & FEATURES_OK),
                         f"{self.where()}: {what} before FEATURES_OK "
                         f"(status {_status_str(self.status)})")

    # -- features and config ----------------------------------------------------------
    def set_features(self, features: int) -> None:
        a, w = self.a, self.where()
        a.check("5", not features & ~self.offered,
                f"{w}: accepted {features:#x}, never offered {features & ~self.offered:#x}")
        a.check("7", not features & ~DEFINED_FEATURES,
                f"{w}: accepted undefined/reserved bits {features & ~DEFINED_FEATURES:#x}")
        if self.offered & F_VERSION_1:
            a.check("10", bool(features & F_VERSION_1),
                    f"{w}: VIRTIO_F_VERSION_1 offered but not accepted ({features:#x})")
        a.check("15", not features & F_SR_IOV, f"{w}: VIRTIO_F_SR_IOV accepted over vhost-user")
        if self.status_negotiated:
            a.check("18", not self.status & FEATURES_OK,
                    f"{w}: SET_FEATURES {features:#x} with status {_status_str(self.status)}")
            if self.status & FAILED:
                a.violated("3", f"{w}: SET_FEATURES after FAILED without a reset")
            a.check("16", bool(self.status & DRIVER),
                    f"{w}: features written with status {_status_str(self.status)} "
                    "(before ACKNOWLEDGE and DRIVER)")
            self._features_written = True
        self.features = features

    def get_config(self, offset: int, size: int) -> None:
        if offset + size > NOTIFY_BUF_SIZE_OFFSET and offset < NOTIFY_BUF_SIZE_OFFSET + 4:
            self.a.check("23", bool(self.offered & F_NOTIFICATION),
                         f"{self.where()}: GET_CONFIG {offset}+{size} reads notify_buf_size, "
                         "but VIRTIO_FS_F_NOTIFICATION is not offered")

    def set_config(self, payload: bytes) -> None:
        self._config_written = True
        head = ""
        if len(payload) >= vu.CONFIG_HEAD.size:
            offset, size, _ = vu.CONFIG_HEAD.unpack_from(payload)
            head = f" of {size} bytes at offset {offset}"
        detail = f"{self.where()}: SET_CONFIG{head}, status {_status_str(self.status)}"
        self.a.violated("58", detail)
        if not self.status & FEATURES_OK:
            self.a.violated("17", detail + " (during feature negotiation)")

    # -- queues -----------------------------------------------------------------------
    def queue_index(self, index: int, usable: int) -> None:
        self.a.check("59", 0 <= index < usable,
                     f"{self.where()}: queue index {index} outside the layout 0..{usable - 1}")

    def vring_num(self, index: int, num: int) -> None:
        self.setup_step(f"SET_VRING_NUM({index})")
        self.a.check("50", rl.is_valid_size(num),
                     f"{self.where()}: queue {index} size {num} is not a power of 2 in 1..32768")

    def vring_enable(self, q: DeviceQueue, enable: int) -> None:
        w = self.where()
        if enable:
            self.setup_step(f"SET_VRING_ENABLE({q.index}, 1)")
            self.a.check("51a", bool(q.size) and q.addresses_set,
                         f"{w}: queue {q.index} enabled before its size and addresses were set")
        elif self.status_negotiated:
            self.a.check("51b", not self.live,
                         f"{w}: SET_VRING_ENABLE({q.index}, 0) with status "
                         f"{_status_str(self.status)}")

    def driver_ok_done(self) -> None:
        """Absence statements hold up to here (a later violation still counts)."""
        if self.status_negotiated:
            self.a.held("51b")

    # -- kicks ------------------------------------------------------------------------
    def kick(self, index: int, sock: socket.socket, reply_ack: bool = False) -> None:
        """A kick of queue `index` was read. It breaks the rule when no DRIVER_OK has
        been set since the last reset and none is waiting in the socket that the kick
        may have followed: a DRIVER_OK write the frontend waits to see acknowledged
        (REPLY_ACK) is not set yet for it, so a kick visible now came before it."""
        if not self.status_negotiated:
            return
        if self.live or self._driver_ok_seen:
            self.a.held("20")  # a DRIVER_OK cleared later is statement 2's business
            return
        if _driver_ok_queued(sock, reply_ack) is False:
            self.a.violated("20", f"{self.where()}: kick of queue {index} with status "
                            f"{_status_str(self.status)}")

    def kicks_at_driver_ok(self, kicked: list[int], acked: bool) -> None:
        """Kicks already pending when a DRIVER_OK write is processed. With REPLY_ACK the
        driver waits for the write's ack, so they were sent before DRIVER_OK was set."""
        if kicked and acked:
            self.a.violated("20", f"{self.where()}: queue(s) {kicked} kicked before the "
                            "DRIVER_OK write was acknowledged")

    # -- FUSE requests ---------------------------------------------------------------
    def request(self, role: str, request: bytes) -> None:
        a, w = self.a, self.where()
        if len(request) < abi.IN_HEADER_SIZE:
            return
        opcode = int.from_bytes(request[4:8], "little")
        if not self._fuse_started:
            self._fuse_started = True
            big = int.from_bytes(request[4:8], "big")
            if opcode != abi.Opcode.INIT and big == abi.Opcode.INIT:
                a.violated("67b", f"{w}: big-endian FUSE_INIT (opcode bytes {request[4:8].hex()})")
            else:
                a.check("67", opcode == abi.Opcode.INIT,
                        f"{w}: first request is opcode {opcode} on the {role} queue, not "
                        "FUSE_INIT")
                if opcode == abi.Opcode.INIT:
                    a.held("67b", "FUSE_INIT little-endian")
        elif opcode == abi.Opcode.INIT:
            a.held("67b")
        hiprio_op = opcode in abi.HIPRIO_OPCODES
        if role == "hiprio":
            a.check("61", hiprio_op, f"{w}: opcode {abi.opcode_name(opcode)} on the hiprio queue")
            if hiprio_op:
                a.held("60", f"{abi.opcode_name(opcode)} on hiprio")
        else:
            a.check("60", not hiprio_op, f"{w}: {abi.opcode_name(opcode)} on a {role} queue")
            if not hiprio_op:
                a.held("61")


def _driver_ok_queued(sock: socket.socket, reply_ack: bool) -> bool | None:
    """Is a SET_STATUS with DRIVER_OK waiting in the socket that a kick read now may
    have followed? Not one asking for an ack with REPLY_ACK negotiated: its sender
    waits for the ack before going on. None when the queued messages cannot all be
    seen (then nothing is judged)."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        if queued == 0:
            return False
        data = sock.recv(queued, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    pos = 0
    while pos + vu.HEADER.size <= len(data):
        request, flags, size = vu.HEADER.unpack_from(data, pos)
        payload = data[pos + vu.HEADER.size : pos + vu.HEADER.size + size]
        if request == vu.Request.SET_STATUS and len(payload) >= 8:
            waits = reply_ack and flags & vu.FLAG_NEED_REPLY
            if vu.U64.unpack_from(payload)[0] & DRIVER_OK and not waits:
                return True
        pos += vu.HEADER.size + size
    return None if len(data) < queued else False


@dataclass
class _Snapshot:
    """The descriptor bytes of one exposed chain, to compare when it is used."""

    entries: list[tuple[int | None, int, bytes]]  # (indirect table GPA or None, offset, bytes)


class QueueAudit:
    """Ring-level checks of one queue (used from the session thread only)."""

    def __init__(self, session: SessionAudit, index: int) -> None:
        self.s = session
        self.a = session.a
        self.index = index
        self.role = "request"
        self.audited = 0  # next avail slot whose chain is still to be walked
        self.last_seen_idx: int | None = None
        self.fresh_ring = False  # addresses set, used flags not checked yet
        self._snapshots: dict[int, _Snapshot] = {}
        self.armed: int | None = None  # avail idx the device asked a kick past
        self._suspect_since: float | None = None

    def where(self) -> str:
        return f"{self.s.where()} queue {self.index} ({self.role})"

    # -- configuration ------------------------------------------------------------------
    def set_addresses(self, q: DeviceQueue, desc: int, used: int, avail: int,
                      to_gpa: Any) -> None:
        self.s.setup_step(f"SET_VRING_ADDR({self.index})")
        parts = []
        for name, addr, align in (("descriptor table", desc, rl.DESC_ALIGN),
                                  ("available ring", avail, rl.AVAIL_ALIGN),
                                  ("used ring", used, rl.USED_ALIGN)):
            gpa = to_gpa(addr)
            if (gpa if gpa is not None else addr) % align:
                where = f"GPA {gpa:#x}" if gpa is not None else f"address {addr:#x}"
                parts.append(f"{name} at {where} not {align}-aligned")
        self.a.check("26", not parts, f"{self.where()}: {'; '.join(parts)}")
        self.fresh_ring = True

    def set_base(self, base: int) -> None:
        self.audited = base
        self.last_seen_idx = None
        self._snapshots.clear()
        self.disarm()

    # -- notifications (kicks) -------------------------------------------------------------
    def arm(self, idx: int) -> None:
        """The device found the ring empty at `idx` after publishing avail_event = idx
        (with EVENT_IDX) or with used->flags 0: the next publish needs a kick."""
        self.armed = idx
        self._suspect_since = None

    def disarm(self) -> None:
        self.armed = None
        self._suspect_since = None

    def _kick_rule(self, q: DeviceQueue) -> str:
        return "37" if q.event_idx else "36"

    def kicked(self, q: DeviceQueue) -> None:
        if self.armed is not None and q._avail is not None:
            idx = int.from_bytes(q._avail[rl.AVAIL_IDX : rl.AVAIL_IDX + 2], "little")
            if idx != self.armed:
                self.a.held(self._kick_rule(q))
        self.disarm()

    def tick(self, q: DeviceQueue, kick_pending: bool, now: float) -> None:
        if self.armed is None or kick_pending or q._avail is None:
            self._suspect_since = None
            return
        idx = int.from_bytes(q._avail[rl.AVAIL_IDX : rl.AVAIL_IDX + 2], "little")
        if idx == self.armed or ((idx - self.armed) & 0xFFFF) > q.size:
            self._suspect_since = None  # nothing new (or 31/31b's business)
            return
        if self._suspect_since is None:
            self._suspect_since = now
            return
        if now - self._suspect_since >= LOST_KICK_GRACE:
            what = "avail_event" if q.event_idx else "used->flags 0"
            self.a.violated(self._kick_rule(q), f"{self.where()}: avail idx went from "
                            f"{self.armed} to {idx} ({what} asked for a kick at "
                            f"{self.armed}) and no kick came for {now - self._suspect_since:.1f} s")
            self.disarm()

    def started(self, q: DeviceQueue) -> None:
        if not self.fresh_ring or q._used is None:
            return
        self.fresh_ring = False
        flags = int.from_bytes(q._used[rl.USED_FLAGS : rl.USED_FLAGS + 2], "little")
        self.a.check("35", flags == 0, f"{self.where()}: used->flags is {flags:#x} at start")

    # -- the available ring --------------------------------------------------------------
    def avail_idx(self, q: DeviceQueue, idx: int) -> None:
        last = self.last_seen_idx
        self.last_seen_idx = idx
        back = (last - idx) & 0xFFFF if last is not None else 0
        if last is not None and 0 < back <= q.size:
            self.a.violated("31", f"{self.where()}: avail idx went from {last} to {idx}")
            return
        if last is not None and idx != last:
            self.a.held("31")
        ahead = (idx - q.last_avail) & 0xFFFF
        self.a.check("31b", ahead <= q.size,
                     f"{self.where()}: avail idx {idx} is {ahead} entries ahead of the "
                     f"device's {q.last_avail} in a {q.size}-entry ring")

    def scan(self, q: DeviceQueue) -> None:
        """Walk every chain made available since the last scan (once each)."""
        if q._avail is None or q._desc is None or not q.size:
            return
        flags = int.from_bytes(q._avail[rl.AVAIL_FLAGS : rl.AVAIL_FLAGS + 2], "little")
        allowed = (0,) if q.event_idx else (0, rl.VRING_AVAIL_F_NO_INTERRUPT)
        self.a.check("32", flags in allowed,
                     f"{self.where()}: avail->flags {flags:#x} "
                     f"({'with' if q.event_idx else 'without'} EVENT_IDX)")
        idx = int.from_bytes(q._avail[rl.AVAIL_IDX : rl.AVAIL_IDX + 2], "little")
        if ((idx - q.last_avail) & 0xFFFF) > q.size:
            return  # 31/31b report it; nothing here can be trusted
        if ((self.audited - q.last_avail) & 0xFFFF) > q.size:
            self.audited = q.last_avail
        while self.audited != idx:
            slot = rl.AVAIL_RING + 2 * (self.audited % q.size)
            head = int.from_bytes(q._avail[slot : slot + 2], "little")
            self.audited = (self.audited + 1) & 0xFFFF
            if head < q.size:
                self._walk(q, head)

    def _walk(self, q: DeviceQueue, head: int) -> None:
        a, w = self.a, f"{self.where()} chain {head}"
        assert q._desc is not None
        table: memoryview = q._desc
        table_size, index = q.size, head
        in_indirect = False
        count = total = readable = writable = 0
        seen_writable = misordered = False
        snapshot = _Snapshot([])
        steps = 0
        while True:
            steps += 1
            if steps > table_size + 1:
                a.violated("28", f"{w}: the descriptor chain loops")
                return
            off = rl.DESC_SIZE * index
            raw = bytes(table[off : off + rl.DESC_SIZE])
            if not in_indirect:  # an indirect table is kept whole
                snapshot.entries.append((None, off, raw))
            addr, length, flags, nxt = rl.DESC.unpack(raw)
            if flags & rl.VRING_DESC_F_INDIRECT:
                a.check("30a", q.indirect, f"{w}: INDIRECT without VIRTIO_F_INDIRECT_DESC")
                a.check("30c", not flags & rl.VRING_DESC_F_NEXT,
                        f"{w}: INDIRECT together with NEXT")
                if in_indirect:
                    a.violated("30b", f"{w}: INDIRECT inside an indirect table")
                    return
                if count or not length or length % rl.DESC_SIZE or q._memory is None:
                    return  # the device refuses it; no rule of ours to cite
                try:
                    table = q._memory.gpa(addr, length)
                except MemoryAccessError:
                    return
                snapshot.entries.append((addr, 0, bytes(table)))
                table_size, index, in_indirect, steps = length // rl.DESC_SIZE, 0, True, 0
                continue
            count += 1
            total += length
            if flags & rl.VRING_DESC_F_WRITE:
                seen_writable = True
                writable += length
            else:
                readable += length
                misordered = misordered or seen_writable
            if not flags & rl.VRING_DESC_F_NEXT:
                break
            if nxt >= table_size:
                return  # malformed (the device refuses it)
            index = nxt
        a.check("27", not misordered, f"{w}: a device-readable descriptor after a writable one")
        a.check("28", total <= 1 << 32, f"{w}: {total} bytes in one chain (more than 2^32)")
        a.check("30d", count <= q.size,
                f"{w}: {count} descriptors in a chain, queue size {q.size}")
        if in_indirect:
            a.held("30b")  # a whole indirect table without INDIRECT inside
        else:
            a.held("30a")
            a.held("30c")
        if self.role == "notification":
            need = self.s.notify_buf_size
            a.check("63", not readable and writable >= need,
                    f"{w}: notification buffer of {writable} writable and {readable} readable "
                    f"bytes; notify_buf_size is {need}")
        self._snapshots[head] = snapshot

    def used(self, q: DeviceQueue, head: int) -> None:
        """The device returns chain `head`: its descriptors must be as they were exposed."""
        snap = self._snapshots.pop(head, None)
        if snap is None or q._desc is None:
            return
        for table_gpa, off, raw in snap.entries:
            try:
                if table_gpa is None:
                    now = bytes(q._desc[off : off + len(raw)])
                else:
                    assert q._memory is not None
                    now = bytes(q._memory.gpa(table_gpa + off, len(raw)))
            except MemoryAccessError:
                now = b""
            if now != raw:
                where = f"indirect table {table_gpa:#x}" if table_gpa else "descriptor table"
                self.a.violated("25", f"{self.where()} chain {head}: {where} at +{off} changed "
                                f"while the chain was exposed ({raw.hex()} -> {now.hex()})")
                return
        self.a.held("25")
