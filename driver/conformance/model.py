"""What a conformance check is, the spec statements they test, and the report.

Checklist numbers (`refs`) are those of the numbered driver-normative checklist
in the virtio-fs spec digest (§9); a check of the device tests the device side
of that statement (what the driver relies on). "§1.x" refers to the virtio-fs
device section of the digest (device-normative text).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL, SKIP = "pass", "fail", "skip"
RESULTS = (PASS, FAIL, SKIP)


@dataclass(frozen=True)
class Statement:
    refs: str  # e.g. "§9 #44" or "§1.3"
    text: str


#: every check id and the spec statement it is tied to (docs/conformance.rst lists them)
STATEMENTS: dict[str, Statement] = {
    "pci.identity": Statement(
        "§9 #44", "A virtio-fs PCI function is vendor 0x1AF4, device 0x105A (0x1040 + 26)."),
    "pci.capabilities": Statement(
        "§9 #46 #48", "The virtio PCI capabilities (common, notify, ISR, device cfg) are "
        "present, lie inside implemented BARs, are aligned and long enough; reserved "
        "cfg_type/BAR entries are ignored."),
    "pci.device_cfg": Statement(
        "§9 #24, §1.3", "The device cfg region holds struct virtio_fs_config (40 bytes, 44 with "
        "VIRTIO_FS_F_NOTIFICATION)."),
    "reset": Statement(
        "§9 #21", "After 0 is written to device_status, device_status reads back 0 (reset "
        "complete), also after a live session."),
    "features.version_1": Statement(
        "§9 #10 #48", "The device offers VIRTIO_F_VERSION_1 (a modern device)."),
    "features.offered": Statement(
        "§9 #7 #9, §1.2", "Feature bits offered by the device; the only virtio-fs bit is "
        "VIRTIO_FS_F_NOTIFICATION (0): bits 1-23 are undefined for this device type."),
    "features.features_ok": Statement(
        "§9 #16 #19", "After the driver writes a subset of the offered features and sets "
        "FEATURES_OK, FEATURES_OK reads back set (cleared: the device is unusable)."),
    "config.tag": Statement(
        "§1.3, §9 #58", "tag is UTF-8, padded with NUL bytes if shorter than 36 bytes, "
        "non-empty, with nothing after the padding."),
    "config.num_request_queues": Statement(
        "§1.3, §9 #59", "The device MUST set num_request_queues to 1 or greater."),
    "config.notify_buf_size": Statement(
        "§1.3, §1.7, §9 #23 #63", "With VIRTIO_FS_F_NOTIFICATION, notify_buf_size is large "
        "enough for the notify messages the device emits (at least the 16-byte out header + "
        "16-byte fuse_notify_lock_out)."),
    "queues.layout": Statement(
        "§1.2", "Virtqueues: 0 hiprio, 1 notification queue (only with "
        "VIRTIO_FS_F_NOTIFICATION), 2..n request queues; one per num_request_queues."),
    "queues.sizes": Statement(
        "§9 #50, split ring", "Every virtqueue the device exposes has a maximum size of 1 to "
        "32768 (the driver writes a power of 2 no larger)."),
    "bringup": Statement(
        "§9 #16 #20 #51", "The initialization sequence completes: queues configured and "
        "enabled (queue_enable reads 1), DRIVER_OK set, DEVICE_NEEDS_RESET clear."),
    "fuse.init": Statement(
        "§1.4, §9 #67", "FUSE_INIT on a request queue is answered: major 7, a minor this "
        "driver speaks, a usable max_write."),
    "queues.request": Statement(
        "§1.5, §9 #59", "Each request queue (up to num_request_queues) answers a normal "
        "request (FUSE_GETATTR of the root)."),
    "hiprio.forget": Statement(
        "§1.6, §9 #60", "The hiprio queue takes FUSE_FORGET (device-readable only, no reply): "
        "the buffer is used and the device keeps serving."),
    "notify.queue": Statement(
        "§1.7, §9 #63 #64", "With VIRTIO_FS_F_NOTIFICATION the notification queue exists and "
        "takes device-writable buffers of notify_buf_size; anything the device puts there is "
        "a well-formed notify message."),
    "notify.lock": Statement(
        "§1.7, §9 #68 #69 (proposal)", "A blocking FUSE_SETLKW is answered \"wait\" (+1) and "
        "completed by a FUSE_NOTIFY_LOCK {unique, error} on the notification queue."),
}


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
        return not any(c.result == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "transport": self.transport, "ok": self.ok,
                "summary": self.counts(), "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """Human-readable table: result, id, spec reference, observed (and statement)."""
        mark = {PASS: "PASS", FAIL: "FAIL", SKIP: "skip"}
        idw = max([len(c.id) for c in self.checks] + [5])
        lines = [f"conformance of {self.device} ({self.transport})", ""]
        lines.append(f"{'RESULT':<6}  {'CHECK':<{idw}}  OBSERVED")
        for c in self.checks:
            res = mark[c.result] + ("*" if c.deviation else "")
            lines.append(f"{res:<6}  {c.id:<{idw}}  {c.observed}")
            lines.append(f"{'':<6}  {'':<{idw}}    [{c.refs}] {c.statement}")
            if c.deviation:
                lines.append(f"{'':<6}  {'':<{idw}}    * known deviation: {c.deviation}")
        n = self.counts()
        lines += ["", f"{n[PASS]} passed ({n['deviation']} with a known deviation, marked *), "
                  f"{n[FAIL]} failed, {n[SKIP]} skipped"]
        return "\n".join(lines)
