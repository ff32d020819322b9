"""`vfsdrv check` on the host: against virtiofsd (vhost-user, no config space, request
queue at index 1), against the reference device (config space, notification queue,
FUSE_NOTIFY_LOCK), and against misbehaving devices (bad config, FEATURES_OK cleared,
no answers, broken PCI capabilities), which must fail the right checks."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import virtiofsd
from fakes.transport import FakeTransport
from vfsdrv.conformance import RESULTS, STATEMENTS, CheckOptions, Report, run_checks
from vfsdrv.conformance.runner import INDEX1_DEVIATION, check_pci_function
from vfsdrv.fs.config import encode_config
from vfsdrv.refdev.device import RefDevice
from vfsdrv.refdev.vhost_session import DeviceConfig
from vfsdrv.tools import cli
from vfsdrv.tools.check import check_vhost_user
from vfsdrv.virtio.constants import Feature

FAKE_FEATURES = Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX


def by_id(report: Report | dict) -> dict[str, dict]:
    checks = report["checks"] if isinstance(report, dict) else report.to_dict()["checks"]
    return {c["id"]: c for c in checks}


def assert_schema(doc: dict) -> None:
    assert isinstance(doc["checks"], list) and doc["checks"]
    for c in doc["checks"]:
        assert {"id", "statement", "result", "observed"} <= set(c), c
        assert c["result"] in RESULTS
        assert c["statement"] and isinstance(c["observed"], str)
        base = c["id"].split("[")[0]
        assert c["statement"] == STATEMENTS[base].text
    assert doc["ok"] == all(c["result"] != "fail" for c in doc["checks"])


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vfsdrv-check-", dir="/tmp"))  # short socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def export(sock_dir: Path) -> Path:
    e = sock_dir / "export"
    e.mkdir()
    (e / "file.txt").write_text("conformance\n")
    return e


# -- real devices ---------------------------------------------------------------------------


def test_virtiofsd_passes_with_the_index1_deviation(sock_dir: Path, export: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    sock = sock_dir / "vfsd.sock"
    with virtiofsd(export, sock):
        rc = cli.main(["check", "--vhost-user", str(sock), "--tag", "myfs", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc
    assert_schema(doc)
    c = by_id(doc)
    assert c["features.version_1"]["result"] == "pass"
    # virtiofsd 7.2 has no config space: the config came from --tag, so it is not judged
    assert c["config.tag"]["result"] == "skip" and "--tag" in c["config.tag"]["observed"]
    assert c["config.notify_buf_size"]["result"] == "skip"
    assert c["queues.layout"]["result"] == "pass"
    assert c["queues.layout"]["deviation"] == INDEX1_DEVIATION
    assert c["queues.request[1]"]["result"] == "pass"
    assert c["fuse.init"]["result"] == "pass" and "FUSE 7." in c["fuse.init"]["observed"]
    assert c["hiprio.forget"]["result"] == "pass"
    assert "file.txt" in c["hiprio.forget"]["observed"]  # a real LOOKUP, then its FORGET
    assert c["notify.queue"]["result"] == "skip" and c["notify.lock"]["result"] == "skip"
    assert c["reset"]["result"] == "skip"  # vhost-user has no status register
    assert doc["summary"]["fail"] == 0 and doc["summary"]["deviation"] == 1
    # the export was not touched
    assert sorted(p.name for p in export.iterdir()) == ["file.txt"]
    assert (export / "file.txt").read_text() == "conformance\n"


def test_reference_device_with_notification(sock_dir: Path, export: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export), tag="ref-tag", request_queues=3, notify_buf_size=96):
        rc = cli.main(["check", "--vhost-user", str(sock)])
        table = capsys.readouterr().out
        assert rc == 0, table
        report = check_vhost_user(str(sock), CheckOptions())
    c = by_id(report)
    assert report.ok and report.counts()["deviation"] == 0
    assert c["config.tag"]["result"] == "pass" and "'ref-tag'" in c["config.tag"]["observed"]
    assert c["config.num_request_queues"]["observed"] == "3"
    assert c["config.notify_buf_size"]["result"] == "pass"
    assert c["config.notify_buf_size"]["observed"].startswith("96 bytes")
    assert c["queues.layout"]["observed"].startswith("5 queues: hiprio 0, notification 1, "
                                                     "request 2..4")
    assert "deviation" not in c["queues.layout"]
    assert [k for k in c if k.startswith("queues.request")] == [
        "queues.request[2]", "queues.request[3]", "queues.request[4]"]
    assert all(c[f"queues.request[{i}]"]["result"] == "pass" for i in (2, 3, 4))
    assert c["notify.queue"]["result"] == "pass"
    lock = c["notify.lock"]
    assert lock["result"] == "pass", lock
    assert "contended" in lock["observed"] and "FUSE_NOTIFY_LOCK" in lock["observed"]
    # the table names every check, its statement and a summary line
    for cid in c:
        assert cid in table
    assert "16 passed" in table and "0 failed, 1 skipped" in table
    assert sorted(p.name for p in export.iterdir()) == ["file.txt"]


def test_reference_device_without_notification(sock_dir: Path, export: Path) -> None:
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export), notification=False):
        report = check_vhost_user(str(sock), CheckOptions())
    c = by_id(report)
    assert report.ok
    assert c["features.offered"]["observed"].endswith("VIRTIO_FS_F_NOTIFICATION not offered")
    assert c["queues.layout"]["deviation"] == INDEX1_DEVIATION
    assert c["queues.request[1]"]["result"] == "pass"
    assert c["notify.queue"]["result"] == "skip"


# -- misbehaving devices ----------------------------------------------------------------------


def test_hostile_config_from_a_real_backend(sock_dir: Path, export: Path, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference device made to present a broken config space: bytes after the tag's
    NUL padding and a notify_buf_size too small for FUSE_NOTIFY_LOCK."""
    bad = b"bad\0junk".ljust(36, b"\0") + struct.pack("<II", 1, 8)
    monkeypatch.setattr(DeviceConfig, "config_space", lambda self: bad)
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export)):
        rc = cli.main(["check", "--vhost-user", str(sock), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["ok"] is False
    assert_schema(doc)
    c = by_id(doc)
    assert c["config.tag"]["result"] == "fail"
    assert "after its NUL padding" in c["config.tag"]["observed"]
    assert c["config.notify_buf_size"]["result"] == "fail"
    assert c["config.notify_buf_size"]["observed"].startswith("8 bytes")
    assert c["config.num_request_queues"]["result"] == "pass"
    # the driver refuses such a device: bring-up fails, the FUSE checks are not reached
    assert c["bringup"]["result"] == "fail"
    assert c["fuse.init"]["result"] == "skip" and "not reached" in c["fuse.init"]["observed"]


def test_zero_request_queues_fails(sock_dir: Path, export: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeviceConfig, "config_space",
                        lambda self: encode_config("zero", 1, 64)[:36] + struct.pack("<II", 0, 64))
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export)):
        report = check_vhost_user(str(sock), CheckOptions())
    c = by_id(report)
    assert not report.ok
    assert c["config.num_request_queues"] == {**c["config.num_request_queues"],
                                              "result": "fail", "observed": "0"}
    assert c["queues.layout"]["result"] == "skip" and c["fuse.init"]["result"] == "skip"


def test_features_ok_cleared_and_no_version_1() -> None:
    t = FakeTransport(features=FAKE_FEATURES, config=encode_config("t", 1),
                      queue_max={0: 64, 1: 64}, accept_features=lambda f: False)
    c = by_id(run_checks(t, Report("fake", "fake"), CheckOptions(timeout=1)))
    assert c["features.features_ok"]["result"] == "fail"
    assert c["features.features_ok"]["observed"].startswith("cleared")
    assert c["bringup"]["result"] == "skip"
    assert c["reset"]["result"] == "pass"

    t = FakeTransport(features=Feature.INDIRECT_DESC, config=encode_config("t", 1),
                      queue_max={0: 64, 1: 64})
    report = run_checks(t, Report("fake", "fake"), CheckOptions(timeout=1))
    c = by_id(report)
    assert not report.ok
    assert c["features.version_1"]["result"] == "fail"
    assert c["fuse.init"]["observed"] == "not reached: VERSION_1 not offered"


def test_device_that_never_answers_and_bad_queue_sizes() -> None:
    """A device that takes every buffer and answers nothing: FUSE_INIT times out. Its
    queue 0 is 65536 entries (over the split-ring maximum) and queue 1 is not a power of 2."""
    raw_tag = b"\xff\xfe".ljust(36, b"\0")  # not UTF-8
    t = FakeTransport(features=FAKE_FEATURES, config=raw_tag + struct.pack("<I", 1),
                      queue_max={0: 65536, 1: 96})
    c = by_id(run_checks(t, Report("fake", "fake"), CheckOptions(timeout=0.3)))
    assert c["config.tag"]["result"] == "fail" and "UTF-8" in c["config.tag"]["observed"]
    assert c["queues.sizes"]["result"] == "fail" and "queue 0 = 65536" in c["queues.sizes"][
        "observed"]
    t = FakeTransport(features=FAKE_FEATURES, config=encode_config("silent", 1),
                      queue_max={0: 64, 1: 96})
    c = by_id(run_checks(t, Report("fake", "fake"), CheckOptions(timeout=0.3)))
    assert c["queues.sizes"]["result"] == "pass" and "not a power of 2" in c["queues.sizes"][
        "deviation"]
    assert c["bringup"]["result"] == "pass"
    assert c["fuse.init"]["result"] == "fail" and "TimeoutError" in c["fuse.init"]["observed"]
    assert c["hiprio.forget"]["result"] == "skip"


def test_too_few_queues_for_num_request_queues() -> None:
    t = FakeTransport(features=FAKE_FEATURES, config=encode_config("t", 4),
                      queue_max={0: 64, 1: 64})
    t.num_queues = lambda: 2  # type: ignore[method-assign]
    c = by_id(run_checks(t, Report("fake", "fake"), CheckOptions(timeout=0.3)))
    assert c["queues.layout"]["result"] == "fail"
    assert "5 needed for num_request_queues 4" in c["queues.layout"]["observed"]


def test_pci_capability_checks_on_emulated_functions() -> None:
    from test_pci_transport import make_function, standard_caps, vcap
    from vfsdrv.virtio.pci import COMMON_CFG

    report = Report("emulated", "pci")
    fn, _, _ = make_function()
    assert check_pci_function(report, fn)
    c = by_id(report)
    assert c["pci.identity"] == {**c["pci.identity"], "result": "pass", "observed": "1af4:105a"}
    assert c["pci.capabilities"]["result"] == "pass"
    assert "common BAR" in c["pci.capabilities"]["observed"]

    # the common cfg capability runs past the end of its BAR
    caps = [vcap(COMMON_CFG, 4, 0x3FF0, 0x38)] + standard_caps()[1:]
    report = Report("emulated", "pci")
    fn, _, _ = make_function(caps)
    assert not check_pci_function(report, fn)
    c = by_id(report)
    assert c["pci.capabilities"]["result"] == "fail"
    assert "BAR" in c["pci.capabilities"]["observed"]


def test_pci_device_whose_reset_never_completes() -> None:
    """An emulated virtio-pci function (the transport's register protocol) whose status
    never reads back 0 after a reset: the reset check fails, the session is not attempted."""
    from test_pci_transport import CommonCfgModel, make_function
    from vfsdrv.virtio.pci import VirtioPciTransport

    fn, _, _ = make_function(model=CommonCfgModel(reset_delay=10**9))
    t = VirtioPciTransport(fn, poll=True)
    t.common.write8(0x14, 1)  # ACKNOWLEDGE left over from "an earlier driver"
    report = Report("emulated", "pci")
    assert check_pci_function(report, fn)
    run_checks(t, report, CheckOptions(timeout=0.05))
    c = by_id(report)
    assert c["reset"]["result"] == "fail" and "after reset" in c["reset"]["observed"]
    assert c["bringup"]["observed"] == "not reached: the device did not reset"
    assert not report.ok


def test_pci_device_that_resets_passes_the_register_checks() -> None:
    from test_pci_transport import CommonCfgModel, make_function
    from vfsdrv.virtio.pci import VirtioPciTransport

    fn, _, _ = make_function(model=CommonCfgModel(reset_delay=3, num_queues=2))
    t = VirtioPciTransport(fn, poll=True)
    report = Report("emulated", "pci")
    run_checks(t, report, CheckOptions(timeout=0.2))
    c = by_id(report)
    assert c["reset"]["result"] == "pass" and c["reset"]["observed"].startswith("status 0 after")
    assert "after the session" in c["reset"]["observed"]
    assert c["config.tag"]["observed"].startswith("'myfs'")
    assert c["features.features_ok"]["result"] == "pass"
    # nothing behind the rings answers: FUSE_INIT times out
    assert c["fuse.init"]["result"] == "fail"


def test_docs_list_every_check_with_its_statement() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "conformance.rst").read_text()
    for cid, st in STATEMENTS.items():
        assert f"``{cid}``" in doc, cid
        assert st.text in doc, cid
