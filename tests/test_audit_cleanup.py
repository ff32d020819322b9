"""`vfsdrv audit` cleans up after itself even when interrupted: a Ctrl-C during one
device's stop still stops the others and removes the scratch directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from vfsdrv.tools import audit as audit_tool


class FakeDevice:
    stopped: list[str] = []
    interrupt_in_stop: set[str] = set()

    def __init__(self, socket_path: str, export: str, **kw) -> None:
        self.socket_path = socket_path
        self.auditor = object()

    def start(self) -> None:
        open(self.socket_path, "w").close()  # a probe socket left in the scratch dir

    def wait_sessions_closed(self) -> None:
        pass

    def audit_report(self) -> str:
        return "report"

    def stop(self) -> None:
        name = os.path.basename(self.socket_path)
        FakeDevice.stopped.append(name)
        if name in FakeDevice.interrupt_in_stop:
            raise KeyboardInterrupt


@pytest.mark.parametrize("interrupted", ["audit.sock", "probe1.sock", "probe2.sock"])
def test_ctrl_c_in_a_stop_still_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          interrupted: str) -> None:
    scratch = tmp_path / "vfsdrv-audit-x"

    def mkdtemp(prefix: str = "") -> str:
        scratch.mkdir()
        return str(scratch)

    def probes(make_device, w) -> None:
        make_device("a")
        make_device("b")

    FakeDevice.stopped = []
    FakeDevice.interrupt_in_stop = {interrupted}
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(audit_tool, "RefDevice", FakeDevice)
    monkeypatch.setattr(audit_tool, "run_workload", lambda path: audit_tool.Workload())
    monkeypatch.setattr(audit_tool, "run_probes", probes)
    with pytest.raises(KeyboardInterrupt):
        audit_tool.audit_driver()
    assert FakeDevice.stopped == ["audit.sock", "probe1.sock", "probe2.sock"]
    assert not scratch.exists()


def test_an_error_in_a_stop_still_cleans_up(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "vfsdrv-audit-y"

    def mkdtemp(prefix: str = "") -> str:
        scratch.mkdir()
        return str(scratch)

    class Failing(FakeDevice):
        def stop(self) -> None:
            super().stop()
            raise OSError("stop failed")

    FakeDevice.stopped = []
    FakeDevice.interrupt_in_stop = set()
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(audit_tool, "RefDevice", Failing)
    monkeypatch.setattr(audit_tool, "run_workload", lambda path: audit_tool.Workload())
    monkeypatch.setattr(audit_tool, "run_probes", lambda make, w: make("a"))
    with pytest.raises(OSError, match="stop failed"):
        audit_tool.audit_driver()
    assert FakeDevice.stopped == ["audit.sock", "probe1.sock"]
    assert not scratch.exists()
