"""What a conformance check is, what each one shows, and the report.

`refs` of a check are the items of the device-normative checklist (checklist.py,
D1..Dn, each with its virtio 1.3 section) that the check observes. The report
says which items were covered and which are not observable, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .checklist import CHECKLIST_SIZE, CONDITIONS, ITEMS, refs_of

PASS, FAIL, SKIP = "pass", "fail", "skip"
RESULTS = (PASS, FAIL, SKIP)


@dataclass(frozen=True)
class Statement:
    refs: str  # checklist items, e.g. "D43 D44 (§4.1)"
    text: str


#: every check id and what it shows; `refs` (the device checklist items it observes, see
#: checklist.py and docs/conformance.rst) is filled in from the checklist
_TEXTS: dict[str, str] = {
    "pci.identity": "A virtio-fs PCI function is vendor 0x1AF4, device 0x105A (0x1040 + 26), "
    "revision 1 or higher, subsystem device ID 0x40 or higher.",
    "pci.capabilities": "The virtio PCI capabilities (common, notify, ISR, device cfg) are "
    "present, lie inside implemented BARs, are aligned and long enough (cap_len includes "
    "extra data); a shared memory region lies in its BAR, the DAX window has id 0.",
    "pci.cap_list": "The capability list holds a VIRTIO_PCI_CAP_PCI_CFG capability; vendor data "
    "capabilities are not 0x1AF4 and a multiple of 4 bytes; the MSI-X table has 2..0x800 "
    "vectors; VIRTIO_F_SR_IOV is offered only with an SR-IOV capability.",
    "pci.device_cfg": "The device cfg region holds struct virtio_fs_config (40 bytes, 44 with "
    "VIRTIO_FS_F_NOTIFICATION) at a 4-byte aligned offset.",
    "pci.registers": "Common cfg registers after a reset: device_feature is 0 for "
    "device_feature_select 2 and 3, driver_feature reads back what was written, queue_enable "
    "reads 0, MSI-X vectors read NO_VECTOR, queue_size is 0 past the last queue, every "
    "queue's notify address lies in the notify region; reading ISR clears it.",
    "reset": "After 0 is written to device_status, device_status reads back 0 (reset "
    "complete), also after a live session.",
    "features.version_1": "The device offers VIRTIO_F_VERSION_1 (a modern device).",
    "features.offered": "The device offers no feature bit that is undefined for a file system "
    "device (bits 1-23), legacy-only (24, 27), foreign to the transport (SR_IOV without PCI), "
    "or dependent on a bit it does not offer (1.0+ ring bits without VERSION_1).",
    "features.features_ok": "After the driver writes a subset of the offered features and sets "
    "FEATURES_OK, FEATURES_OK reads back set (a device that does not take the driver's valid "
    "subset clears it: a deviation from D5's SHOULD, and no live check runs).",
    "features.subset": "The device accepts the smallest valid subset (VIRTIO_F_VERSION_1 only: "
    "no EVENT_IDX, no INDIRECT_DESC, no notification queue) and serves requests with it.",
    "features.refusal": "Feature bits the device did not offer, written with FEATURES_OK: the "
    "device clears FEATURES_OK, or ignores the bits (driver_feature reads them back as 0).",
    "config.tag": "tag is UTF-8, padded with NUL bytes if shorter than 36 bytes, non-empty, "
    "with nothing after the padding; the config is readable before FEATURES_OK.",
    "config.num_request_queues": "The device MUST set num_request_queues to 1 or greater.",
    "config.notify_buf_size": "With VIRTIO_FS_F_NOTIFICATION, notify_buf_size is readable "
    "before FEATURES_OK and large enough for the notify messages the device emits (at least "
    "the 16-byte out header + 16-byte fuse_notify_lock_out).",
    "queues.layout": "Virtqueues: 0 hiprio, 1 notification queue (only with "
    "VIRTIO_FS_F_NOTIFICATION), 2..n request queues; one per num_request_queues.",
    "queues.sizes": "Every virtqueue the device exposes has a maximum size that is a power of 2 "
    "from 1 to 32768.",
    "bringup": "The initialization sequence completes: queues configured and enabled (MSI-X "
    "vectors read back as mapped), DRIVER_OK set, DEVICE_NEEDS_RESET clear.",
    "ring.before_driver_ok": "A request made available (not notified) before DRIVER_OK is not "
    "used before DRIVER_OK; after DRIVER_OK and a notification it is.",
    "ring.framing": "A request split over unusual descriptors (the fuse_in_header across two, "
    "the reply across three) is answered: the used len covers the reply, the device-readable "
    "buffers and the descriptor table are unchanged.",
    "ring.used_notify": "After using a buffer the device notifies the driver when asked to "
    "(avail->flags 0 without EVENT_IDX, whatever used_event says; used idx reaching "
    "used_event with it, whatever the low bit of avail->flags says), and not while "
    "avail->flags is 1 without EVENT_IDX (SHOULD).",
    "ring.indirect": "A descriptor that refers to an indirect table and also has "
    "VIRTQ_DESC_F_WRITE (set on purpose) is taken as the indirect table: the request is "
    "answered.",
    "ring.used_flags": "used->flags is 0 or 1 without VIRTIO_F_EVENT_IDX, 0 with it.",
    "ring.spurious_kick": "Notifications with nothing new made available are harmless: the "
    "next request is answered.",
    "fuse.init": "FUSE_INIT on a request queue is answered: major 7, a minor this driver "
    "speaks, a usable max_write.",
    "queues.request": "Each request queue (up to num_request_queues) answers a normal request "
    "(FUSE_GETATTR of the root) with a reply the used len covers.",
    "queues.inflight": "Each request queue answers many requests in flight at once, each "
    "under its own unique.",
    "hiprio.forget": "The hiprio queue takes FUSE_FORGET (device-readable only, no reply): "
    "the buffer is used and the device keeps serving.",
    "hiprio.storm": "A storm of FUSE_FORGET and FUSE_BATCH_FORGET on hiprio, sent while "
    "requests are in flight on every request queue, is used without waiting for them.",
    "fuse.opcodes": "Every FUSE opcode the device must serve, or claims in FUSE_INIT flags "
    "(POSIX_LOCKS: GETLK/SETLK/SETLKW; FLOCK_LOCKS: flock; DO_READDIRPLUS: READDIRPLUS), "
    "is answered with a well-formed reply and not ENOSYS.",
    "fuse.errors": "Error paths answer with the errno a FUSE daemon gives and no payload: "
    "ENOENT, EEXIST, ENOTEMPTY, ENAMETOOLONG, EBADF.",
    "notify.queue": "With VIRTIO_FS_F_NOTIFICATION the notification queue exists and takes "
    "device-writable buffers of notify_buf_size; anything the device puts there is a "
    "well-formed notify message.",
    "notify.lock": "A blocking FUSE_SETLKW is answered \"wait\" (+1) and completed by a "
    "FUSE_NOTIFY_LOCK {unique, error} on the notification queue.",
    "notify.load": "More lock grants at once than notification buffers: every FUSE_NOTIFY_LOCK "
    "arrives, held by the device until buffers are replenished.",
    "reset.live": "A reset with requests in flight: after it completes the device neither "
    "uses buffers nor notifies; the same features are negotiated again and the new session "
    "is served.",
}

STATEMENTS: dict[str, Statement] = {k: Statement(refs_of(k), t) for k, t in _TEXTS.items()}


@dataclass
class Check:
    id: str
    statement: str
    result: str  # pass | fail | skip
    observed: str
    refs: str = ""
    deviation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["deviation"] is None:
            del d["deviation"]
        return d


@dataclass
class Report:
    device: str
    transport: str
    checks: list[Check] = field(default_factory=list)
    #: feature bits negotiated by the main session (names), and the ring layout in use
    negotiated: list[str] = field(default_factory=list)
    ring_layout: str = "split"
    #: which set-ups this run had (checklist.CONDITIONS keys -> bool)
    context: dict[str, bool] = field(default_factory=dict)
    #: why the run could not do what it was asked (e.g. --ring packed, not offered):
    #: the report is then not a pass, whatever the checks that ran say
    incomplete: str | None = None

    def add(self, check_id: str, result: str, observed: str, *,
            deviation: str | None = None, instance: str | None = None) -> Check:
        """Record one result. `instance` names one of several (e.g. queue "2")."""
        assert result in RESULTS, result
        st = STATEMENTS[check_id]
        cid = f"{check_id}[{instance}]" if instance is not None else check_id
        c = Check(cid, st.text, result, observed, st.refs, deviation)
        self.checks.append(c)
        return c

    def counts(self) -> dict[str, int]:
        out = {r: 0 for r in RESULTS}
        for c in self.checks:
            out[c.result] += 1
        out["deviation"] = sum(1 for c in self.checks if c.deviation)
        return out

    @property
    def ok(self) -> bool:
        return self.incomplete is None and not any(c.result == FAIL for c in self.checks)

    def coverage(self) -> dict[str, Any]:
        """Checklist coverage: items observed by a check that ran (pass or fail), items not
        observable (with the reason: never, or not in this set-up), and items whose checks
        did not get to run (`not_reached`, empty when the device works)."""
        ran: dict[str, str] = {}
        skipped: dict[str, str] = {}
        for c in self.checks:
            base = c.id.split("[")[0]
            (ran if c.result != SKIP else skipped).setdefault(base, c.observed)
        covered, not_observable, not_reached = [], {}, {}
        for item in ITEMS:
            applies = not item.when or self.context.get(item.when, False)
            if applies and any(cid in ran for cid in item.checks):
                covered.append(item.id)
            elif item.reason:
                not_observable[item.id] = item.reason
            elif item.when and item.when in self.context and not self.context[item.when]:
                # known not to hold (a condition never established is not reached)
                not_observable[item.id] = CONDITIONS[item.when]
            else:
                why = next((skipped[cid] for cid in item.checks if cid in skipped),
                           f"not run: {self.incomplete}" if self.incomplete else
                           "not run: an earlier step failed")
                not_reached[item.id] = why
        return {"covered": covered, "not_observable": not_observable,
                "not_reached": not_reached, "checklist_size": CHECKLIST_SIZE}

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "transport": self.transport, "ok": self.ok,
                "summary": self.counts(), "negotiated": self.negotiated,
                "ring_layout": self.ring_layout, "coverage": self.coverage(),
                "incomplete": self.incomplete, "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def coverage_line(self) -> str:
        cov = self.coverage()
        line = (f"checklist: {len(cov['covered'])} of {cov['checklist_size']} device statements "
                f"covered, {len(cov['not_observable'])} not observable here")
        if cov["not_reached"]:
            line += f", {len(cov['not_reached'])} not reached ({', '.join(cov['not_reached'])})"
        return line + " (vfsdrv check --json: coverage)"

    def table(self) -> str:
        """Human-readable table: result, id, spec reference, observed (and statement)."""
        mark = {PASS: "PASS", FAIL: "FAIL", SKIP: "skip"}
        idw = max([len(c.id) for c in self.checks] + [5])
        lines = [f"conformance of {self.device} ({self.transport})"]
        if self.negotiated:
            lines.append(f"negotiated: {', '.join(self.negotiated)}; {self.ring_layout} rings")
        lines += ["", f"{'RESULT':<6}  {'CHECK':<{idw}}  OBSERVED"]
        shown: set[str] = set()
        for c in self.checks:
            res = mark[c.result] + ("*" if c.deviation else "")
            lines.append(f"{res:<6}  {c.id:<{idw}}  {c.observed}")
            base = c.id.split("[")[0]
            if base not in shown:  # the statement once per check, not per instance
                shown.add(base)
                lines.append(f"{'':<6}  {'':<{idw}}    [{c.refs}] {c.statement}")
            if c.deviation:
                lines.append(f"{'':<6}  {'':<{idw}}    * known deviation: {c.deviation}")
        n = self.counts()
        lines += ["", f"{n[PASS]} passed ({n['deviation']} with a known deviation, marked *), "
                  f"{n[FAIL]} failed, {n[SKIP]} skipped", self.coverage_line()]
        if self.incomplete:
            lines.append(f"NOT COMPLETE: {self.incomplete}")
        return "\n".join(lines)

    def junit(self) -> str:
        """JUnit XML (one testsuite, one testcase per check) for a CI system."""
        from xml.etree import ElementTree as ET

        n = self.counts()
        suite = ET.Element("testsuite", name=f"vfsdrv check {self.device}",
                           tests=str(len(self.checks) + bool(self.incomplete)),
                           failures=str(n[FAIL]), skipped=str(n[SKIP]),
                           errors=str(int(bool(self.incomplete))))
        props = ET.SubElement(suite, "properties")
        for name, value in (("transport", self.transport),
                            ("negotiated", ",".join(self.negotiated)),
                            ("ring_layout", self.ring_layout)):
            ET.SubElement(props, "property", name=name, value=value)
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname="vfsdrv.check." + c.id.split("[")[0],
                                 name=c.id)
            if c.result == FAIL:
                ET.SubElement(case, "failure", message=c.observed).text = (
                    f"[{c.refs}] {c.statement}")
            elif c.result == SKIP:
                ET.SubElement(case, "skipped", message=c.observed)
            out = f"observed: {c.observed}\nrefs: {c.refs}\nstatement: {c.statement}"
            if c.deviation:
                out += f"\nknown deviation: {c.deviation}"
            ET.SubElement(case, "system-out").text = out
        if self.incomplete:
            case = ET.SubElement(suite, "testcase", classname="vfsdrv.check.run", name="run")
            ET.SubElement(case, "error", message=self.incomplete)
        return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
