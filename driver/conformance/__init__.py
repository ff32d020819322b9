"""Conformance checks of a virtio-fs device, seen from the driver's side.

`run_checks` brings a device up through the driver's own layers (transport,
virtio core, virtio-fs device) and records, check by check, what the device
did against what the spec says (the statement and the numbered checklist of
the virtio-fs spec digest, §9). Each `Check` is pass, fail or skip with the
value observed; a known deviation of common devices is a pass that carries a
`deviation` text. See docs/conformance.rst.
"""

from __future__ import annotations

from .model import RESULTS, STATEMENTS, Check, Report
from .runner import CheckOptions, run_checks

__all__ = ["RESULTS", "STATEMENTS", "Check", "CheckOptions", "Report", "run_checks"]
