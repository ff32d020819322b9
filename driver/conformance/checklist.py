"""The device-normative checklist that `vfsdrv check` measures a device against.

Every device MUST/SHOULD statement of virtio 1.3 (oasis-tcs/virtio-spec v1.3-wd02:
chapter 2 basic facilities incl. split and packed virtqueues, chapter 6 reserved
feature bits, §4.1 virtio over PCI, §5.11 file system device), one statement per
item, numbered D1..Dn. The file system device has little normative text; the few
descriptive statements of §5.11 a driver depends on (queue layout, FUSE_INIT, the
request format, the notification queue) and the FUSE_NOTIFY_LOCK proposal are
items too, with level DESC (descriptive) or PROPOSAL, so that every check is tied
to an item.

Each item is either observed by checks (`checks`: the check ids that test it) or
not observable from the driver's side, with the reason (`reason`). Some are
observable only in some set-ups (`when`: a PCI function, a device-side status
register, device config space, the notification queue): otherwise they are not
applicable, with `when_reason`. docs/conformance.rst lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass

MUST, SHOULD, DESC, PROPOSAL = "MUST", "SHOULD", "DESC", "PROPOSAL"

#: set-ups an item may depend on: flag name -> why the item is not applicable without it
CONDITIONS = {
    "pci": "not applicable: no PCI function (vhost-user transport)",
    "device_status": "not applicable: the device keeps no status register (vhost-user without "
                     "the STATUS protocol feature: device status lives in the frontend)",
    "config_space": "not applicable: the device has no config space (vhost-user without the "
                    "CONFIG protocol feature: the config was supplied by --tag/--request-queues)",
    "notification": "not applicable: VIRTIO_FS_F_NOTIFICATION not negotiated",
    "event_idx": "not applicable: VIRTIO_F_EVENT_IDX not offered",
    "indirect": "not applicable: VIRTIO_F_INDIRECT_DESC (with VIRTIO_F_EVENT_IDX: it is probed "
                "in that ring session) not offered",
    "posix_locks": "not applicable: the device did not grant FUSE_POSIX_LOCKS in FUSE_INIT",
    "writable": "not exercised: --read-only (the checks that create a scratch directory were "
                "not run)",
}

_PACKED = ("not observed: check's ring probes drive split rings (with VIRTIO_F_RING_PACKED "
           "negotiated the FUSE checks run over packed rings; the `negotiated` list and "
           "ring_layout say which layout is in use)")
_RING_RESET = ("not applicable: VIRTIO_F_RING_RESET is never negotiated (vfsdrv does not "
               "reset single queues)")
_DAX = ("not exercised: vfsdrv does not use the DAX window (no FUSE_SETUPMAPPING), so "
        "mapping semantics cannot be observed")


@dataclass(frozen=True)
class Item:
    id: str
    level: str
    source: str  # virtio 1.3 section (title) the statement is in
    text: str
    checks: tuple[str, ...] = ()  # check ids (model.STATEMENTS keys) that observe it
    reason: str = ""  # why it is not observable, when no check observes it
    when: str = ""  # a CONDITIONS key the observation needs


def _i(n: int, level: str, source: str, text: str, checks: tuple[str, ...] | str = (),
       when: str = "") -> Item:
    if isinstance(checks, str):
        return Item(f"D{n}", level, source, text, (), checks, when)
    return Item(f"D{n}", level, source, text, checks, "", when)


S21 = "virtio 1.3 §2.1 Device Status Field"
S22 = "virtio 1.3 §2.2 Feature Bits"
S24 = "virtio 1.3 §2.4 Device Reset"
S25 = "virtio 1.3 §2.5 Device Configuration Space"
S26 = "virtio 1.3 §2.6 Virtqueues / Virtqueue Reset"
S27 = "virtio 1.3 §2.7 Split Virtqueues"
S28 = "virtio 1.3 §2.8 Packed Virtqueues"
S210 = "virtio 1.3 §2.10 Shared Memory Regions"
S6 = "virtio 1.3 §6 Reserved Feature Bits"
S41 = "virtio 1.3 §4.1 Virtio Over PCI Bus"
S511 = "virtio 1.3 §5.11 File System Device"

#: the checklist, in spec order
ITEMS: tuple[Item, ...] = (
    # -- §2.1 device status
    _i(1, MUST, S21, "The device MUST NOT consume buffers or send any used buffer notifications "
       "to the driver before DRIVER_OK.", ("ring.before_driver_ok",), "device_status"),
    _i(2, SHOULD, S21, "The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state "
       "that a reset is needed.", "not observable: the checker cannot put a device into an "
       "internal error state without breaking a driver rule itself; what the driver does with "
       "DEVICE_NEEDS_RESET is audited on the driver side"),
    _i(3, MUST, S21, "If DRIVER_OK is set, after it sets DEVICE_NEEDS_RESET, the device MUST send "
       "a device configuration change notification to the driver.", "not observable: needs a "
       "device in an internal error state (see D2)"),
    # -- §2.2 feature bits
    _i(4, MUST, S22, "The device MUST NOT offer a feature which requires another feature which "
       "was not offered.", ("features.offered",)),
    _i(5, SHOULD, S22, "The device SHOULD accept any valid subset of features the driver "
       "accepts.", ("features.features_ok", "features.subset")),
    _i(6, MUST, S22, "Otherwise (a subset it does not accept) the device MUST fail to set the "
       "FEATURES_OK device status bit when the driver writes it.", ("features.refusal",),
       "device_status"),
    _i(7, MUST, S22, "The device MUST NOT offer feature bits corresponding to features it would "
       "not support if accepted by the driver: bits not described in the spec, reserved bits, "
       "bits not supported for the transport or the device type.", ("features.offered",)),
    _i(8, SHOULD, S22, "If a device has successfully negotiated a set of features at least once, "
       "it SHOULD NOT fail re-negotiation of the same set of features after a device or system "
       "reset.", ("reset.live",)),
    # -- §2.4 reset
    _i(9, MUST, S24, "A device MUST reinitialize device status to 0 after receiving a reset.",
       ("reset",), "device_status"),
    _i(10, MUST, S24, "A device MUST NOT send notifications or interact with the queues after "
       "indicating completion of the reset by reinitializing device status to 0, until the "
       "driver re-initializes the device.", ("reset.live",)),
    # -- §2.5 config space
    _i(11, MUST, S25, "The device MUST allow reading of any device-specific configuration field "
       "before FEATURES_OK is set by the driver, including fields conditional on offered "
       "feature bits.", ("config.tag", "config.notify_buf_size"), "config_space"),
    # -- §2.6 virtqueue reset
    _i(12, MUST, S26, "After a queue has been reset by the driver, the device MUST NOT execute "
       "any requests from that virtqueue, or notify the driver for it.", _RING_RESET),
    _i(13, MUST, S26, "The device MUST reset any state of a virtqueue to the default state, "
       "including the available state and the used state.", _RING_RESET),
    _i(14, MUST, S26, "On re-enable the device MUST observe any queue configuration that may "
       "have been changed by the driver, like the maximum queue size.", _RING_RESET),
    # -- §2.7 split virtqueues
    _i(15, MUST, f"{S27} / Message Framing", "The device MUST NOT make assumptions about the "
       "particular arrangement of descriptors.", ("ring.framing",)),
    _i(16, MUST, f"{S27} / The Virtqueue Descriptor Table", "A device MUST NOT write to a "
       "device-readable buffer.", ("ring.framing",)),
    _i(17, SHOULD, f"{S27} / The Virtqueue Descriptor Table", "A device SHOULD NOT read a "
       "device-writable buffer.", "not observable: a read leaves no trace in memory"),
    _i(18, MUST, f"{S27} / The Virtqueue Descriptor Table", "A device MUST NOT write to any "
       "descriptor table entry.", ("ring.framing",)),
    _i(19, MUST, f"{S27} / Indirect Descriptors", "The device MUST ignore the write-only flag in "
       "the descriptor that refers to an indirect table.", ("ring.indirect",), "indirect"),
    _i(20, MUST, f"{S27} / Indirect Descriptors", "The device MUST handle the case of zero or "
       "more normal chained descriptors followed by a single descriptor with "
       "VIRTQ_DESC_F_INDIRECT.", "not exercised: the driver's Virtqueue never puts normal "
       "descriptors in front of an indirect one; the ring parsers of libvhost-user (the C "
       "virtiofsd) and of the reference device take INDIRECT only in a chain's first "
       "descriptor, and such a probe could make them stop the queue"),
    _i(21, MUST, f"{S27} / Used Buffer Notification Suppression", "Without VIRTIO_F_EVENT_IDX "
       "the device MUST ignore the used_event value.", ("ring.used_notify",)),
    _i(22, MUST, f"{S27} / Used Buffer Notification Suppression", "Without VIRTIO_F_EVENT_IDX, "
       "after writing a descriptor index into the used ring: if avail->flags is 0, the device "
       "MUST send a notification.", ("ring.used_notify",)),
    _i(23, SHOULD, f"{S27} / Used Buffer Notification Suppression", "Without "
       "VIRTIO_F_EVENT_IDX, if avail->flags is 1 the device SHOULD NOT send a notification.",
       ("ring.used_notify",)),
    _i(24, MUST, f"{S27} / Used Buffer Notification Suppression", "With VIRTIO_F_EVENT_IDX the "
       "device MUST ignore the lower bit of avail->flags.", ("ring.used_notify",), "event_idx"),
    _i(25, MUST, f"{S27} / Used Buffer Notification Suppression", "With VIRTIO_F_EVENT_IDX, if "
       "the used idx (where the descriptor index was placed) was equal to used_event, the "
       "device MUST send a notification.", ("ring.used_notify",), "event_idx"),
    _i(26, SHOULD, f"{S27} / Used Buffer Notification Suppression", "With VIRTIO_F_EVENT_IDX, "
       "otherwise the device SHOULD NOT send a notification.", "not observable: notifications "
       "coalesce, and an extra one cannot be told from the spurious ones a driver must "
       "tolerate"),
    _i(27, MUST, f"{S27} / The Virtqueue Used Ring", "The device MUST set len prior to updating "
       "the used idx.", ("ring.framing", "queues.request")),
    _i(28, MUST, f"{S27} / The Virtqueue Used Ring", "The device MUST write at least len bytes to "
       "the descriptor, beginning at the first device-writable buffer, prior to updating the "
       "used idx.", ("ring.framing", "queues.request")),
    _i(29, MUST, f"{S27} / Available Buffer Notification Suppression", "Without "
       "VIRTIO_F_EVENT_IDX the device MUST set used->flags to 0 or 1; with it, to 0.",
       ("ring.used_flags",)),
    _i(30, MUST, f"{S27} / Available Buffer Notification Suppression", "The device MUST handle "
       "spurious notifications from the driver.", ("ring.spurious_kick",)),
    # -- §2.8 packed virtqueues
    _i(31, MUST, S28, "The device MUST start processing driver descriptors in the order in "
       "which they appear in the ring.", _PACKED),
    _i(32, MUST, S28, "The device MUST start writing device descriptors into the ring in the "
       "order in which they complete.", _PACKED),
    _i(33, MUST, f"{S28} / The Virtqueue Descriptor Table", "A device MUST NOT write to a "
       "device-readable buffer (packed ring).", _PACKED),
    _i(34, MUST, f"{S28} / The Virtqueue Descriptor Table", "A device MUST NOT use a descriptor "
       "unless it observes the VIRTQ_DESC_F_AVAIL bit in its flags being changed.", _PACKED),
    _i(35, MUST, f"{S28} / The Virtqueue Descriptor Table", "A device MUST NOT change a "
       "descriptor after changing its VIRTQ_DESC_F_USED bit.", _PACKED),
    _i(36, MUST, f"{S28} / Scatter-Gather Support", "The device MUST use descriptors in a list "
       "chained by VIRTQ_DESC_F_NEXT in the same order that they were made available.",
       _PACKED),
    # -- §2.10 shared memory
    _i(37, MUST, S210, "Shared memory regions MUST NOT expose shared memory regions which are "
       "used to control the operation of the device, nor to stream data.", "not observable: "
       "what a region is used for is the device's own design"),
    # -- §6 reserved feature bits
    _i(38, MUST, S6, "A device MUST offer VIRTIO_F_VERSION_1.", ("features.version_1",)),
    _i(39, SHOULD, S6, "A device SHOULD offer VIRTIO_F_ACCESS_PLATFORM if its access to memory "
       "is through translated bus addresses or restricted by the platform.", "not observable: "
       "how the device reaches memory is known to the platform, not to the driver"),
    _i(40, MUST, S6, "If VIRTIO_F_IN_ORDER has been negotiated, a device MUST use buffers in the "
       "same order in which they have been made available.", "not observed: vfsdrv accepts "
       "VIRTIO_F_IN_ORDER with packed rings only, which check's ring probes do not drive"),
    _i(41, MUST, S6, "A device MUST NOT offer VIRTIO_F_SR_IOV unless it is a PCI device that "
       "presents a PCI SR-IOV capability structure (and SHOULD offer it then).",
       ("features.offered",)),
    # -- §4.1 PCI
    _i(42, MUST, S41, "A virtio device over PCI MUST expose an interface that meets the PCI and "
       "PCIe specifications.", "not observable: PCI compliance testing is out of scope; the "
       "kernel's enumeration of the function is the only evidence"),
    _i(43, MUST, f"{S41} / PCI Device Discovery", "Devices MUST have the PCI Vendor ID 0x1AF4.",
       ("pci.identity",), "pci"),
    _i(44, MUST, f"{S41} / PCI Device Discovery", "Devices MUST have the PCI Device ID 0x1040 + "
       "the virtio device ID (0x105A for a file system device, which has no transitional ID).",
       ("pci.identity",), "pci"),
    _i(45, SHOULD, f"{S41} / PCI Device Discovery", "Non-transitional devices SHOULD have a PCI "
       "Revision ID of 1 or higher.", ("pci.identity",), "pci"),
    _i(46, SHOULD, f"{S41} / PCI Device Discovery", "Non-transitional devices SHOULD have a PCI "
       "Subsystem Device ID of 0x40 or higher.", ("pci.identity",), "pci"),
    _i(47, MUST, f"{S41} / PCI Device Layout", "For 64-bit device configuration fields the "
       "device MUST allow independent access to the high and low 32-bit parts.",
       "not applicable: struct virtio_fs_config has no 64-bit field"),
    _i(48, MUST, f"{S41} / Virtio Structure PCI Capabilities", "The device MUST include any "
       "extra data of a capability in cap_len.", ("pci.capabilities",), "pci"),
    _i(49, SHOULD, f"{S41} / Virtio Structure PCI Capabilities", "If the device presents "
       "multiple structures of the same type, it SHOULD order them from optimal to "
       "least-optimal.", "not observable: which structure is optimal is the device's "
       "knowledge"),
    _i(50, MUST, f"{S41} / Common configuration structure layout", "The common configuration "
       "capability's offset MUST be 4-byte aligned, and the device MUST present at least one.",
       ("pci.capabilities",), "pci"),
    _i(51, MUST, f"{S41} / Common configuration structure layout", "The device MUST present the "
       "feature bits it offers in device_feature for any device_feature_select (0 beyond bit "
       "63).", ("pci.registers",), "pci"),
    _i(52, MUST, f"{S41} / Common configuration structure layout", "The device MUST present any "
       "valid feature bits the driver has written in driver_feature.", ("pci.registers",),
       "pci"),
    _i(53, MUST, f"{S41} / Common configuration structure layout", "The device MUST present a "
       "changed config_generation after the driver has read a configuration value which has "
       "changed since the configuration was last read.", "not observable: a virtio-fs config "
       "does not change while it is checked"),
    _i(54, MUST, f"{S41} / Common configuration structure layout", "The device MUST reset when "
       "0 is written to device_status, and present 0 in device_status once that is done.",
       ("reset",), "pci"),
    _i(55, MUST, f"{S41} / Common configuration structure layout", "The device MUST present 0 "
       "in queue_enable on reset.", ("pci.registers",), "pci"),
    _i(56, MUST, f"{S41} / Common configuration structure layout", "With VIRTIO_F_RING_RESET: "
       "queue_reset reads 0 on reset and after enabling, 1 while a queue reset is ongoing, then "
       "0 in queue_reset and queue_enable.", _RING_RESET),
    _i(57, MUST, f"{S41} / Common configuration structure layout", "The device MUST present 0 "
       "in queue_size if the selected virtqueue is unavailable.", ("pci.registers",), "pci"),
    _i(58, MUST, f"{S41} / Common configuration structure layout", "Without VIRTIO_F_RING_PACKED "
       "the device MUST present either 0 or a power of 2 in queue_size.", ("queues.sizes",)),
    _i(59, MUST, f"{S41} / Common configuration structure layout", "With VIRTIO_F_ADMIN_VQ, "
       "admin_queue_index and admin_queue_num stay in range.", "not applicable: "
       "VIRTIO_F_ADMIN_VQ is never negotiated"),
    _i(60, MUST, f"{S41} / Notification capability", "The device MUST present at least one "
       "notification capability; cap.offset 2-byte aligned; notify_off_multiplier an even "
       "power of 2 or 0.", ("pci.capabilities",), "pci"),
    _i(61, MUST, f"{S41} / Notification capability", "cap.length MUST be at least 2 and at "
       "least queue_notify_off * notify_off_multiplier + 2 for all queues.",
       ("pci.registers",), "pci"),
    _i(62, MUST, f"{S41} / ISR status capability", "The device MUST present at least one "
       "VIRTIO_PCI_CAP_ISR_CFG capability.", ("pci.capabilities",), "pci"),
    _i(63, MUST, f"{S41} / ISR status capability", "The device MUST set the Device "
       "Configuration Interrupt bit in ISR status before sending a configuration change "
       "notification.", "not observable: the configuration does not change during a check"),
    _i(64, MUST, f"{S41} / ISR status capability", "With MSI-X disabled the device MUST set the "
       "Queue Interrupt bit in ISR status before a virtqueue notification, and reflect ISR in "
       "the PCI Status register's Interrupt Status bit.", "not exercised: vfsdrv uses MSI-X "
       "(INTx is not implemented)"),
    _i(65, MUST, f"{S41} / ISR status capability", "The device MUST reset ISR status to 0 on "
       "driver read.", ("pci.registers",), "pci"),
    _i(66, MUST, f"{S41} / Device-specific configuration", "The offset of the device-specific "
       "configuration MUST be 4-byte aligned.", ("pci.capabilities", "pci.device_cfg"), "pci"),
    _i(67, MUST, f"{S41} / Shared memory capability", "A shared memory region MUST be contained "
       "within its BAR and its cap.id MUST be unique.", ("pci.capabilities",), "pci"),
    _i(68, MUST, f"{S41} / Vendor data capability", "A vendor data capability's vendor_id MUST "
       "NOT be 0x1AF4 and its size MUST be a multiple of 4.", ("pci.cap_list",), "pci"),
    _i(69, MUST, f"{S41} / Vendor data capability", "Reads of the vendor data capability MUST "
       "NOT have side effects.", "not observable: side effects are internal to the device"),
    _i(70, MUST, f"{S41} / PCI configuration access capability", "The device MUST present at "
       "least one VIRTIO_PCI_CAP_PCI_CFG capability.", ("pci.cap_list",), "pci"),
    _i(71, MUST, f"{S41} / PCI configuration access capability", "Accesses to pci_cfg_data MUST "
       "be executed on the BAR selected by cap.bar at cap.offset.", "not exercised: vfsdrv maps "
       "the BARs; config-space writes to the window may be refused by vfio-pci"),
    _i(72, SHOULD, f"{S41} / MSI-X Vector Configuration", "A device with an MSI-X capability "
       "SHOULD support at least 2 and at most 0x800 vectors.", ("pci.cap_list",), "pci"),
    _i(73, MUST, f"{S41} / MSI-X Vector Configuration", "The device MUST support mapping any "
       "event type to any valid vector and return the mapped vector on read (NO_VECTOR when "
       "unmapped or when a mapping failed).", ("bringup",), "pci"),
    _i(74, MUST, f"{S41} / MSI-X Vector Configuration", "The device MUST have all queue and "
       "configuration change events unmapped upon reset.", ("pci.registers",), "pci"),
    _i(75, MUST, f"{S41} / Used Buffer Notifications", "With MSI-X enabled and queue_msix_vector "
       "NO_VECTOR, the device MUST NOT deliver an interrupt for that virtqueue (likewise "
       "config_msix_vector for configuration changes).", "not exercised: vfsdrv maps every "
       "queue it uses to a vector"),
    # -- §5.11 file system device
    _i(76, DESC, f"{S511} / Virtqueues", "Virtqueues: 0 hiprio, 1 notification queue (only with "
       "VIRTIO_FS_F_NOTIFICATION), 2..n request queues.", ("queues.layout",)),
    _i(77, MUST, f"{S511} / Device configuration layout", "The device MUST set "
       "num_request_queues to 1 or greater.", ("config.num_request_queues",), "config_space"),
    _i(78, DESC, f"{S511} / Device configuration layout", "tag is the name of the file system, "
       "UTF-8, padded with NUL bytes if shorter than the available space.",
       ("config.tag", "pci.device_cfg"), "config_space"),
    _i(79, MUST, f"{S511} / Device configuration layout", "The device MUST set notify_buf_size "
       "large enough to hold any of the FUSE notify messages that this device emits.",
       ("config.notify_buf_size", "notify.queue", "notify.load"), "notification"),
    _i(80, DESC, f"{S511} / Device Initialization", "The FUSE session is started by a FUSE_INIT "
       "request on one request virtqueue; all virtqueues give access to the same session.",
       ("fuse.init", "queues.request")),
    _i(81, DESC, f"{S511} / Device Operation: Request Queues", "Each request queue offers "
       "identical functionality; the device processes requests in any order (many may be in "
       "flight).", ("queues.request", "queues.inflight")),
    _i(82, DESC, f"{S511} / Device Operation: Request Queues", "The device-writable part of a "
       "request holds exactly what a FUSE daemon writes to /dev/fuse: the reply, or an error "
       "(fuse_out_header only) with the errno the operation gives.",
       ("fuse.opcodes", "fuse.errors")),
    _i(83, MUST, f"{S511} / Device Operation: High Priority Queue", "The device MUST NOT pause "
       "processing of the hiprio queue due to activity on a normal request queue.",
       ("hiprio.forget", "hiprio.storm")),
    _i(84, DESC, f"{S511} / Device Operation: Notification Queue", "The device emits FUSE notify "
       "messages in the driver's notification buffers; FUSE_NOTIFY_LOCK messages wait for "
       "buffers when the queue is empty.", ("notify.queue", "notify.load"), "notification"),
    _i(85, MUST, f"{S511} / Device Operation: DAX Window", "If present, the DAX window MUST be "
       "shared memory region ID 0.", ("pci.capabilities",), "pci"),
    _i(86, MUST, f"{S511} / Device Operation: DAX Window", "The device MUST support FUSE_READ and "
       "FUSE_WRITE requests regardless of whether the DAX window is being used.",
       ("fuse.opcodes",), "writable"),
    _i(87, MUST, f"{S511} / Device Operation: DAX Window", "The device MUST allow mappings that "
       "completely or partially overlap existing mappings within the DAX window.", _DAX),
    _i(88, MUST, f"{S511} / Device Operation: DAX Window", "The device MUST reject mappings that "
       "would go beyond the end of the DAX window.", _DAX),
    _i(89, PROPOSAL, f"{S511} / Notification Queue; FUSE_NOTIFY_LOCK proposal (2021)", "A "
       "blocking FUSE_SETLKW is answered \"wait\" (+1) and completed by a FUSE_NOTIFY_LOCK "
       "{unique, error} on the notification queue.", ("notify.lock", "notify.load"),
       "notification"),
)

BY_ID = {i.id: i for i in ITEMS}
CHECKLIST_SIZE = len(ITEMS)


def items_of(check_id: str) -> list[Item]:
    """The checklist items a check observes."""
    return [i for i in ITEMS if check_id in i.checks]


def refs_of(check_id: str) -> str:
    """`refs` of a check: its checklist ids and their spec sections."""
    its = items_of(check_id)
    sections = sorted({i.source.split(" / ")[0].removeprefix("virtio 1.3 ") for i in its})
    return " ".join(i.id for i in its) + (f" ({', '.join(sections)})" if sections else "")
