"""Conformance checks of a virtio-fs device, seen from the driver's side.

`run_checks` brings a device up through the driver's own layers (transport,
virtio core, virtio-fs device, FUSE client) and records, check by check, what the
device did against what the spec says: each check is tied to the items it observes
in the device-normative checklist (`checklist.ITEMS`, D1..Dn, every device MUST and
SHOULD of virtio 1.3 with its section). Each `Check` is pass, fail or skip with the
value observed; a known deviation of common devices (or a SHOULD not met) is a pass
that carries a `deviation` text. `Report.coverage()` says which items were covered
and which are not observable, with the reason. See docs/conformance.rst."""

from __future__ import annotations

from .checklist import CHECKLIST_SIZE, ITEMS
from .model import RESULTS, STATEMENTS, Check, Report
from .runner import CheckOptions, run_checks

__all__ = ["CHECKLIST_SIZE", "ITEMS", "RESULTS", "STATEMENTS", "Check", "CheckOptions", "Report",
           "run_checks"]
