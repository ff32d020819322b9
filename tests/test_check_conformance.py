"""`vfsdrv check` on the host: against virtiofsd (vhost-user, no config space, request
queue at index 1), against the reference device (config space, notification queue,
FUSE_NOTIFY_LOCK), and against misbehaving devices (bad config, FEATURES_OK cleared,
no answers, broken PCI capabilities), which must fail the right checks."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import pytest
from backends import DEVICE_TAG, device
from fakes.transport import FakeTransport
from vfsdrv.conformance import RESULTS, STATEMENTS, CheckOptions, Report, run_checks
from vfsdrv.conformance.checklist import CHECKLIST_SIZE, ITEMS
from vfsdrv.conformance.runner import INDEX1_DEVIATION, check_pci_function
from vfsdrv.errors import RingError
from vfsdrv.fs import abi
from vfsdrv.fs.config import encode_config
from vfsdrv.refdev.device import RefDevice
from vfsdrv.refdev.device_queue import DeviceQueue
from vfsdrv.refdev.fuse_server import FuseServer
from vfsdrv.refdev.vhost_session import DeviceConfig, MessageError, Role, VhostUserSession
from vfsdrv.tools import cli
from vfsdrv.tools.check import check_vhost_user
from vfsdrv.virtio import ring_layout as rl
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

#: the devices every check test runs on; the Rust virtiofsd joins by adding its name
#: (tests/backends.py starts it like the C one)
CHECKED_DEVICES = ["virtiofsd", "virtiofsd-rs", "refdev", "refdev-split"]


@contextmanager
def serve(name: str, export: Path, sock: Path, **refdev_kw) -> Iterator[list[str]]:
    """Device `name` on `sock`; yields the `vfsdrv check` arguments that reach it."""
    if name.startswith("refdev"):
        kw = {"tag": "ref-tag", "request_queues": 3, "notify_buf_size": 96, **refdev_kw}
        if name == "refdev-split":
            kw["ring"] = "split"  # packed offered by default (and then negotiated)
        with RefDevice(str(sock), str(export), **kw):
            yield ["--vhost-user", str(sock)]
    else:
        with device(name, export, sock):
            yield ["--vhost-user", str(sock), "--tag", DEVICE_TAG]


def assert_coverage(doc: dict) -> dict:
    cov = doc["coverage"]
    assert cov["checklist_size"] == CHECKLIST_SIZE == len(ITEMS)
    assert cov["not_reached"] == {}, cov["not_reached"]
    assert len(cov["covered"]) + len(cov["not_observable"]) == cov["checklist_size"]
    assert not set(cov["covered"]) & set(cov["not_observable"])
    assert all(reason for reason in cov["not_observable"].values())
    # the packed-ring device statements are not probed: their rows say so; the
    # negotiated list and ring_layout say which layout ran
    for n in range(31, 37):
        assert "ring probes drive split rings" in cov["not_observable"][f"D{n}"]
    assert doc["ring_layout"] == ("packed" if "RING_PACKED" in doc["negotiated"] else "split")
    assert "VERSION_1" in doc["negotiated"]
    return cov


@pytest.fixture(params=CHECKED_DEVICES)
def checked_device(request) -> str:
    return request.param


def test_real_device_passes_every_check(checked_device: str, sock_dir: Path, export: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """The whole check (JSON and JUnit) on a real device: nothing fails, every checklist
    item is covered or listed as not observable with its reason, within a minute, and the
    export is as it was."""
    junit = sock_dir / "check.xml"
    with serve(checked_device, export, sock_dir / "dev.sock") as args:
        start = time.monotonic()
        rc = cli.main(["check", *args, "--json", "--junit", str(junit)])
        took = time.monotonic() - start
    doc = json.loads(capsys.readouterr().out)
    failed = [c for c in doc["checks"] if c["result"] == "fail"]
    assert rc == 0 and not failed, failed
    assert took < 60
    assert_schema(doc)
    cov = assert_coverage(doc)
    c = by_id(doc)
    for cid in ("features.subset", "ring.framing[VERSION_1 only]", "ring.used_notify[EVENT_IDX]",
                "ring.spurious_kick[VERSION_1 only]", "hiprio.storm", "reset.live",
                "fuse.opcodes[READ]", "fuse.opcodes[WRITE]", "fuse.opcodes[READDIRPLUS]"):
        assert c[cid]["result"] == "pass", c[cid]
    for err in ("ENOENT", "EEXIST", "ENOTEMPTY", "ENAMETOOLONG", "EBADF"):
        assert c[f"fuse.errors[{err}]"]["result"] == "pass", c[f"fuse.errors[{err}]"]
    inflight = [k for k in c if k.startswith("queues.inflight[")]
    assert inflight and [k.replace("inflight", "request") for k in inflight] == [
        k for k in c if k.startswith("queues.request[")]
    for item in ("D5", "D8", "D10", "D15", "D16", "D18", "D22", "D25", "D30", "D81", "D82",
                 "D83", "D86"):
        assert item in cov["covered"], item
    # vhost-user: PCI rows are not applicable, with the reason
    assert cov["not_observable"]["D43"].startswith("not applicable: no PCI function")
    # JUnit: one testcase per check, failures and skips as the results say
    suite = ElementTree.parse(junit).getroot()
    cases = suite.findall("testcase")
    assert [tc.get("name") for tc in cases] == [ch["id"] for ch in doc["checks"]]
    assert suite.get("failures") == "0"
    assert int(suite.get("skipped")) == sum(ch["result"] == "skip" for ch in doc["checks"])
    # the scratch directory is gone
    assert sorted(p.name for p in export.iterdir()) == ["file.txt"]
    assert (export / "file.txt").read_text() == "conformance\n"
    if checked_device == "virtiofsd":
        assert c["queues.layout"]["deviation"] == INDEX1_DEVIATION
        assert c["config.tag"]["result"] == "skip" and "--tag" in c["config.tag"]["observed"]
        assert c["notify.queue"]["result"] == "skip" and c["notify.load"]["result"] == "skip"
        assert "VIRTIO_FS_F_NOTIFICATION" not in doc["negotiated"]
        assert "not negotiated" in cov["not_observable"]["D84"]
        # it grants no lock flag: an answer to SETLK is not called a claimed one
        flock = c["fuse.opcodes[SETLK(flock)]"]
        assert flock["result"] == "pass" and "claimed" not in flock["observed"], flock
    if checked_device == "virtiofsd-rs":  # config space (--tag), no notification queue
        assert c["queues.layout"]["deviation"] == INDEX1_DEVIATION
        assert c["config.tag"]["result"] == "pass" and f"{DEVICE_TAG!r}" in c["config.tag"][
            "observed"]
        assert c["config.num_request_queues"]["result"] == "pass"
        assert c["notify.queue"]["result"] == "skip" and c["notify.load"]["result"] == "skip"
        assert c["fuse.opcodes[ACCESS]"]["result"] == "pass"
        assert "VIRTIO_FS_F_NOTIFICATION" not in doc["negotiated"]
    if checked_device.startswith("refdev"):
        packed = checked_device == "refdev"
        assert ("RING_PACKED" in doc["negotiated"]) is packed
        assert doc["ring_layout"] == ("packed" if packed else "split")
        assert doc["summary"]["deviation"] == 0
        assert "VIRTIO_FS_F_NOTIFICATION" in doc["negotiated"]
        for cid in ("notify.queue", "notify.lock", "notify.load", "config.tag"):
            assert c[cid]["result"] == "pass", c[cid]
        assert "12 FUSE_NOTIFY_LOCK through 8 notification buffers" in c["notify.load"][
            "observed"]
        assert [k for k in c if k.startswith("queues.request")] == [
            "queues.request[2]", "queues.request[3]", "queues.request[4]"]
        assert {"D79", "D84", "D89", "D11", "D77"} <= set(cov["covered"])


def test_check_table_and_read_only(sock_dir: Path, export: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    """The table names every check once with its statement and ends with the coverage
    line; --read-only creates nothing and skips what needs a scratch directory."""
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    with serve("refdev", export, sock_dir / "ref.sock") as args:
        rc = cli.main(["check", *args, "--read-only"])
        table = capsys.readouterr().out
        assert rc == 0, table
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(read_only=True))
    c = by_id(report)
    for cid in c:
        assert cid in table
    assert table.count(STATEMENTS["fuse.errors"].text) == 1
    assert "0 failed" in table and "device statements covered" in table.splitlines()[-1]
    assert c["fuse.opcodes"]["result"] == "skip"
    assert c["fuse.errors[ENOENT]"]["result"] == "pass"
    assert c["fuse.errors[EBADF]"]["result"] == "skip"
    assert c["notify.load"]["result"] == "skip"
    cov = report.coverage()
    assert cov["not_reached"] == {}
    assert cov["not_observable"]["D86"].startswith("not exercised: --read-only")
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before


def test_reference_device_with_device_status(sock_dir: Path, export: Path) -> None:
    """The reference device in auditing mode keeps a device status (vhost-user STATUS):
    then nothing is used before DRIVER_OK, FEATURES_OK refusal and the reset are observed."""
    with serve("refdev", export, sock_dir / "ref.sock", audit=True):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions())
    c = by_id(report)
    assert report.ok, [ch for ch in c.values() if ch["result"] == "fail"]
    assert c["ring.before_driver_ok"]["result"] == "pass"
    assert c["features.refusal"]["result"] == "pass"
    assert c["reset"]["result"] == "pass" and "STATUS" in c["reset"]["observed"]
    cov = report.coverage()
    assert {"D1", "D6", "D9"} <= set(cov["covered"])
    assert len(cov["covered"]) + len(cov["not_observable"]) == CHECKLIST_SIZE


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
    assert report.coverage()["not_reached"] == {}


def test_ring_packed_asked_of_a_device_without_packed_rings(sock_dir: Path,
                                                             export: Path) -> None:
    """--ring packed is the user's choice: against a device that offers only split
    rings the live checks are skipped with the reason and nothing fails (no fault of
    the device's), but the run is not a pass: it checked next to nothing (a CI job
    must not go green on it)."""
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export), ring="split"):
        report = check_vhost_user(str(sock), CheckOptions(ring="packed"))
    c = by_id(report)
    assert not [x for x in c.values() if x["result"] == "fail"]
    assert not report.ok and "VIRTIO_F_RING_PACKED" in (report.incomplete or "")
    assert "NOT COMPLETE: --ring packed" in report.table()
    assert json.loads(report.to_json())["ok"] is False
    assert 'errors="1"' in report.junit()
    for cid in ("features.features_ok", "bringup", "fuse.init"):
        assert c[cid]["result"] == "skip", c[cid]
        assert "does not offer VIRTIO_F_RING_PACKED" in c[cid]["observed"], c[cid]


def test_a_device_that_runs_packed_rings_only_is_checked_not_aborted(sock_dir: Path,
                                                                    export: Path) -> None:
    """refdev --ring packed refuses every driver without packed rings (its SET_FEATURES
    answer, with REPLY_ACK, is a refusal): check's split-ring probes record that under
    features.subset and the live checks run on packed rings, instead of the whole run
    ending in an error with no report."""
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export), ring="packed"):
        report = check_vhost_user(str(sock), CheckOptions())
    c = by_id(report)
    # refusing is the MUST (D6); not taking the subset is a SHOULD (D5) not met: a
    # pass that names the deviation (docs/conformance.rst), and the run passes
    assert c["features.subset"]["result"] == "pass", c["features.subset"]
    assert "D5 (SHOULD)" in c["features.subset"]["deviation"]
    assert "split-ring subset refused" in c["features.subset"]["observed"]
    assert report.ring_layout == "packed"
    for cid in ("features.features_ok", "bringup", "fuse.init"):
        assert c[cid]["result"] == "pass", c[cid]
    assert report.ok, report.table()


# -- broken devices: the reference device with one defect, caught under the right id ---------


def _check_broken(sock_dir: Path, export: Path, **kw) -> dict[str, dict]:
    # split rings: the broken devices patch the split ring's code paths
    with serve("refdev-split", export, sock_dir / "ref.sock", **kw):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    assert not report.ok
    return by_id(report)


def _init_answers(monkeypatch, **fields: int) -> None:
    """The reference device's FUSE_INIT reply with these fuse_init_out fields changed."""
    real_init = FuseServer.init

    def init(self, hdr, body):
        out = real_init(self, hdr, body)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    monkeypatch.setattr(FuseServer, "init", init)


def _failed(c: dict[str, dict]) -> set[str]:
    return {k for k, v in c.items() if v["result"] == "fail"}


def test_broken_enametoolong(sock_dir: Path, export: Path, monkeypatch) -> None:
    """EINVAL for a name over 255 bytes (the reference device's old defect)."""
    orig = FuseServer.lookup

    def lookup(self, hdr, body):
        if len(body.split(b"\0")[0]) > 255:
            raise OSError(errno.EINVAL, "name too long")
        return orig(self, hdr, body)

    monkeypatch.setattr(FuseServer, "lookup", lookup)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"fuse.errors[ENAMETOOLONG]"}
    assert "EINVAL (expected ENAMETOOLONG)" in c["fuse.errors[ENAMETOOLONG]"]["observed"]


def test_broken_read_that_answers_an_error(sock_dir: Path, export: Path,
                                          monkeypatch) -> None:
    """READ of the file the check just wrote answered with an errno: D86 (the device
    MUST support READ) is not met, whatever the errno (it once passed as "answered")."""
    def read(self, hdr, body, room):
        raise OSError(errno.EIO, "no")

    monkeypatch.setattr(FuseServer, "read", read)
    c = _check_broken(sock_dir, export)
    assert c["fuse.opcodes[READ]"]["result"] == "fail", c["fuse.opcodes[READ]"]
    assert "EIO, on what the check had just made" in c["fuse.opcodes[READ]"]["observed"]


def test_broken_lookup_of_a_symlink_it_made_gives_a_report(sock_dir: Path, export: Path,
                                                           monkeypatch) -> None:
    """LOOKUP refused for the symlink the check just made: READLINK is left out and the
    run goes on to the end (it ended in a traceback and no report)."""
    orig = FuseServer.lookup

    def lookup(self, hdr, body):
        if body.split(b"\0")[0] == b"link":
            raise OSError(errno.EIO, "no")
        return orig(self, hdr, body)

    monkeypatch.setattr(FuseServer, "lookup", lookup)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    c = by_id(report)
    assert "fuse.opcodes[READLINK]" not in c and c["fuse.opcodes[SYMLINK]"]["result"] == "pass"
    assert c["notify.load"]["result"] == "pass", c["notify.load"]  # the run went on
    assert report.ok, report.table()


def test_a_ring_broken_mid_run_keeps_the_report(sock_dir: Path, export: Path,
                                                monkeypatch) -> None:
    """A broken ring while the opcodes run (as a device that repeats a used id does):
    that check fails with what happened, the session's later checks say they were not
    reached, and the report (table, JSON) is still there."""
    from vfsdrv.fs.client import FuseClient

    def read(self, *args, **kwargs):
        raise RingError("queue 2: used index 31 is 2 ahead of 29, but only 1 chains are "
                        "in flight")

    monkeypatch.setattr(FuseClient, "read", read)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    c = by_id(report)
    stopped = c["fuse.opcodes[(the check stopped here)]"]
    assert stopped["result"] == "fail" and "RingError: queue 2" in stopped["observed"]
    for cid in ("fuse.errors", "hiprio.storm", "notify.load"):
        assert c[cid]["result"] == "skip", c[cid]
        assert "the session broke during fuse.opcodes" in c[cid]["observed"]
    assert not report.ok and "RingError" in report.table()
    assert json.loads(report.to_json())["ok"] is False


def test_a_ring_broken_during_the_forget_keeps_the_report(sock_dir: Path, export: Path,
                                                          monkeypatch) -> None:
    """A ring error while check waits for hiprio's FORGET (a device that uses a chain
    twice): hiprio.forget fails with it, the later checks are not reached, and the
    report is kept (it was lost to a bare error object)."""
    from vfsdrv.conformance import runner

    calls = {"n": 0}
    real_wait = runner._ProbeFs.wait

    def wait(self, timeout):
        if not self.hiprio.vq.idle:  # the FORGET is out: the device breaks the ring
            calls["n"] += 1
            raise RingError("queue 2: used index 3 is 2 ahead of 1, but only 1 chains "
                            "are in flight")
        return real_wait(self, timeout)

    monkeypatch.setattr(runner._ProbeFs, "wait", wait)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    c = by_id(report)
    assert calls["n"] >= 1
    stopped = c["hiprio.forget[(the check stopped here)]"]
    assert stopped["result"] == "fail" and "RingError: queue 2" in stopped["observed"]
    for cid in ("fuse.opcodes", "fuse.errors", "hiprio.storm", "notify.load"):
        assert c[cid]["result"] == "skip", c[cid]
        assert "the session broke during hiprio.forget" in c[cid]["observed"]
    assert not report.ok and json.loads(report.to_json())["ok"] is False


def test_a_used_len_beyond_what_was_written_fails_the_framing(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """D28: a device that reports the whole writable part as used, having written only
    the reply, fails ring.framing (the bytes past out.len still hold the check's
    pattern); the same device reporting what it wrote passes."""
    real_push = DeviceQueue.push

    def push(self, chain, written):
        return real_push(self, chain, chain.writable_len)

    with serve("refdev-split", export, sock_dir / "ref.sock"):
        good = by_id(check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0)))
    framing = [v for k, v in good.items() if k.startswith("ring.framing")]
    assert framing and all(v["result"] == "pass" for v in framing), framing
    monkeypatch.setattr(DeviceQueue, "push", push)
    with serve("refdev-split", export, sock_dir / "ref2.sock"):
        bad = by_id(check_vhost_user(str(sock_dir / "ref2.sock"), CheckOptions(timeout=1.0)))
    framing = [v for k, v in bad.items() if k.startswith("ring.framing")]
    assert framing and all(v["result"] == "fail" for v in framing), framing
    assert all("were never written" in v["observed"] for v in framing), framing


def test_a_scratch_directory_made_by_a_failed_mkdir_is_removed(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """A device that makes the scratch directory but answers the MKDIR with an error:
    the check fails MKDIR and still removes the directory by its name."""
    real_mkdir = FuseServer.mkdir

    def mkdir(self, hdr, body):
        real_mkdir(self, hdr, body)
        raise OSError(errno.EIO, "made it, said otherwise")

    monkeypatch.setattr(FuseServer, "mkdir", mkdir)
    c = _check_broken(sock_dir, export)
    assert c["fuse.opcodes[MKDIR]"]["result"] == "fail", c["fuse.opcodes[MKDIR]"]
    assert "no scratch directory" in c["fuse.opcodes"]["observed"], c["fuse.opcodes"]
    assert [p.name for p in export.iterdir() if p.name.startswith(".vfsdrv-check")] == []


def test_a_max_write_under_a_page_fails_init_and_the_run_goes_on(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """FUSE_INIT granting max_write 100: fuse.init fails, and a check that would write
    more fails with why instead of the run ending in a traceback."""
    _init_answers(monkeypatch, max_write=100)
    c = _check_broken(sock_dir, export)
    assert c["fuse.init"]["result"] == "fail" and "max_write 100 < 4096" in \
        c["fuse.init"]["observed"]
    assert "notify.load" in c or "notify.load[(the check stopped here)]" in c


def _check_with_a_hang(sock_dir: Path, export: Path, monkeypatch, method: str
                       ) -> tuple[Report, float]:
    """`vfsdrv check --timeout 1` of the reference device whose FuseServer.`method`
    never answers (its queue thread hangs in it until the check is over): the report
    and how long the run took."""
    import threading

    release = threading.Event()

    def hang(self, hdr, body):
        release.wait(120)
        raise OSError(errno.EIO, "released")

    monkeypatch.setattr(FuseServer, method, hang)
    start = time.monotonic()
    try:
        with serve("refdev-split", export, sock_dir / "ref.sock"):
            report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
            took = time.monotonic() - start
            release.set()
    finally:
        release.set()
    return report, took


def test_a_device_that_stops_answering_costs_timeout_per_request(sock_dir: Path,
                                                                 export: Path,
                                                                 monkeypatch) -> None:
    """STATFS never answered (the device's thread for it hangs): each request the
    check waits for costs --timeout, not the library's 60 s, and the run ends."""
    report, took = _check_with_a_hang(sock_dir, export, monkeypatch, "statfs")
    c = by_id(report)
    assert c["fuse.opcodes[STATFS]"]["result"] == "fail"
    assert "within 1 s" in c["fuse.opcodes[STATFS]"]["observed"], c["fuse.opcodes[STATFS]"]
    assert took < 45, (took, report.table())


def test_broken_claimed_opcode_not_implemented(sock_dir: Path, export: Path,
                                               monkeypatch) -> None:
    """FUSE_POSIX_LOCKS granted in FUSE_INIT, but GETLK answers ENOSYS."""
    def getlk(self, hdr, body):
        raise OSError(errno.ENOSYS, "no")

    monkeypatch.setattr(FuseServer, "getlk", getlk)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"fuse.opcodes[GETLK]"}
    assert "claimed by POSIX_LOCKS" in c["fuse.opcodes[GETLK]"]["observed"]


def test_broken_error_reply_with_payload(sock_dir: Path, export: Path, monkeypatch) -> None:
    """Error replies that carry 8 payload bytes (out.len 24)."""
    def error(unique: int, err: int) -> bytes:
        return abi.pack("fuse_out_header", len=24, error=-err, unique=unique) + bytes(8)

    monkeypatch.setattr(FuseServer, "_error", staticmethod(error))
    c = _check_broken(sock_dir, export)
    assert c["fuse.errors[ENOENT]"]["result"] == "fail"
    assert "malformed error reply" in c["fuse.errors[ENOENT]"]["observed"]
    # and why it is malformed, in the report itself (not only on stderr)
    assert "error" in c["fuse.errors[ENOENT]"]["observed"].split("malformed error reply: ")[1]
    assert {k for k in _failed(c) if not k.startswith(("fuse.errors", "fuse.opcodes"))} == set()


def test_broken_writes_into_readable_buffers(sock_dir: Path, export: Path, monkeypatch) -> None:
    orig = DeviceQueue.push

    def push(self, chain, written):
        if chain.readable:
            chain.readable[-1][-1:] = b"\xff"
        orig(self, chain, written)

    monkeypatch.setattr(DeviceQueue, "push", push)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"ring.framing[VERSION_1 only]", "ring.framing[EVENT_IDX]"}
    assert "device-readable buffer" in c["ring.framing[EVENT_IDX]"]["observed"]


def test_broken_no_used_buffer_notification(sock_dir: Path, export: Path, monkeypatch) -> None:
    """Without EVENT_IDX the device never interrupts (with it, it does)."""
    orig = DeviceQueue.signal

    def signal(self):
        if self.event_idx:
            orig(self)

    monkeypatch.setattr(DeviceQueue, "signal", signal)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"ring.used_notify[VERSION_1 only]"}


def test_broken_write_flag_on_indirect_descriptor(sock_dir: Path, export: Path,
                                                  monkeypatch) -> None:
    """A device that refuses a chain whose indirect descriptor also has WRITE (D19)."""
    orig = DeviceQueue._read_chain

    def read_chain(self, head):
        addr, length, flags, nxt = rl.DESC.unpack_from(self._desc, rl.DESC_SIZE * head)
        if flags & rl.VRING_DESC_F_INDIRECT and flags & rl.VRING_DESC_F_WRITE:
            raise RingError(f"queue {self.index}: WRITE on an indirect descriptor")
        return orig(self, head)

    monkeypatch.setattr(DeviceQueue, "_read_chain", read_chain)
    c = _check_broken(sock_dir, export)
    # the reference device stops serving a queue after a ring error and (a defect of its
    # own) does not revive it on reset: queue 1, the notification queue of the next
    # session, stays dead, so the notification checks may fail too
    assert {"ring.indirect", "ring.framing[EVENT_IDX]"} <= _failed(c)
    assert _failed(c) - {"notify.lock", "notify.load"} == {"ring.indirect",
                                                           "ring.framing[EVENT_IDX]"}
    assert "not used within" in c["ring.framing[EVENT_IDX]"]["observed"]


def test_a_wrong_fuse_major_is_not_charged_to_the_subset_or_indirect(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """FUSE_INIT answered with major 8: fuse.init and the framing of the raw ring
    sessions fail; D5 (the subset works) and D19 (the indirect table followed) do not,
    since the reply landed where the driver put it."""
    _init_answers(monkeypatch, major=8)
    c = _check_broken(sock_dir, export)
    assert c["fuse.init"]["result"] == "fail"
    assert c["ring.framing[VERSION_1 only]"]["result"] == "fail"
    assert "FUSE major 8" in c["ring.framing[VERSION_1 only]"]["observed"]
    assert c["features.subset"]["result"] == "pass", c["features.subset"]
    assert c["ring.indirect"]["result"] == "pass", c["ring.indirect"]


def test_broken_avail_flags_honoured_with_event_idx(sock_dir: Path, export: Path,
                                                    monkeypatch) -> None:
    """With EVENT_IDX the device takes avail->flags' low bit as "no interrupt" (D24)."""
    orig = DeviceQueue.signal

    def signal(self):
        flags = int.from_bytes(self._avail[rl.AVAIL_FLAGS:rl.AVAIL_FLAGS + 2], "little")
        if self.event_idx and flags & 1:
            return
        orig(self)

    monkeypatch.setattr(DeviceQueue, "signal", signal)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"ring.used_notify[EVENT_IDX]"}
    assert "NOT for GETATTR" in c["ring.used_notify[EVENT_IDX]"]["observed"]


def test_broken_used_flags_with_event_idx(sock_dir: Path, export: Path, monkeypatch) -> None:
    """used->flags NO_NOTIFY although VIRTIO_F_EVENT_IDX is negotiated."""
    orig = DeviceQueue.push

    def push(self, chain, written):
        if self.event_idx:
            self._used[0:2] = b"\x01\x00"
        orig(self, chain, written)

    monkeypatch.setattr(DeviceQueue, "push", push)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"ring.used_flags[EVENT_IDX]"}


def test_broken_notifications_dropped_without_buffers(sock_dir: Path, export: Path,
                                                      monkeypatch) -> None:
    """Lock notifications that find no buffer are dropped instead of held."""
    orig = VhostUserSession._deliver_notifications

    def deliver(self):
        orig(self)
        with self._pending_mutex:
            self._pending.clear()

    monkeypatch.setattr(VhostUserSession, "_deliver_notifications", deliver)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"notify.load"}
    assert "TimeoutError" in c["notify.load"]["observed"]


def test_broken_hiprio_never_served(sock_dir: Path, export: Path, monkeypatch) -> None:
    """A device that never uses what is made available on hiprio (D83)."""
    orig = VhostUserSession._run_queue

    def run_queue(self, q):
        if self.role(q.index) is not Role.HIPRIO:
            orig(self, q)

    monkeypatch.setattr(VhostUserSession, "_run_queue", run_queue)
    start = time.monotonic()
    c = _check_broken(sock_dir, export)
    assert time.monotonic() - start < 20
    assert _failed(c) == {"hiprio.forget", "hiprio.storm"}
    assert "not used within" in c["hiprio.forget"]["observed"]
    assert "not all used" in c["hiprio.storm"]["observed"]


def test_broken_renegotiation_after_reset(sock_dir: Path, export: Path, monkeypatch) -> None:
    """A device that accepts the live session's feature set once and refuses it after the
    reset (D8: it SHOULD NOT fail re-negotiation of the same set)."""
    orig = VhostUserSession._set_features
    seen: dict[int, int] = {}

    def set_features(self, payload, fds):
        features = self._u64(payload)
        seen[features] = seen.get(features, 0) + 1
        if features & 1 and seen[features] > 1:  # the set with VIRTIO_FS_F_NOTIFICATION
            raise MessageError(f"features {features:#x} again")
        return orig(self, payload, fds)

    monkeypatch.setattr(VhostUserSession, "_set_features", set_features)
    c = _check_broken(sock_dir, export)
    assert _failed(c) == {"reset.live"}
    assert "re-negotiating the same features" in c["reset.live"]["observed"]


def test_broken_undefined_feature_bit(sock_dir: Path, export: Path) -> None:
    """The auditing probe that also offers virtio-fs feature bit 23 (undefined)."""
    c = _check_broken(sock_dir, export, audit=True, audit_probes={"unknown-feature"})
    assert _failed(c) == {"features.offered"}
    assert "bit23" in c["features.offered"]["observed"]


def test_broken_wrong_unique_under_load(sock_dir: Path, export: Path, monkeypatch) -> None:
    """Replies get another request's unique once more than 8 requests are in flight."""
    orig_handle = FuseServer.handle
    state = {"getattrs": 0}

    def handle(self, request, room):
        reply = orig_handle(self, request, room)
        opcode = int.from_bytes(request[4:8], "little")
        if opcode == abi.Opcode.GETATTR and reply:
            state["getattrs"] += 1
            if 40 < state["getattrs"] < 80:
                reply = bytearray(reply)
                reply[8:16] = (int.from_bytes(reply[8:16], "little") + 2).to_bytes(8, "little")
                reply = bytes(reply)
        return reply

    monkeypatch.setattr(FuseServer, "handle", handle)
    c = _check_broken(sock_dir, export)
    assert any(k.startswith("queues.inflight[") for k in _failed(c)), _failed(c)


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


@pytest.mark.parametrize("what", ["num_request_queues", "queue count"])
def test_huge_counts_from_a_backend_end_the_check(sock_dir: Path, export: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  what: str) -> None:
    """num_request_queues 2^32 - 1 in the config space, or 2^64 - 1 queues from
    GET_QUEUE_NUM: the check ends within seconds with a verdict (it used to probe
    every one of them, growing by hundreds of MB a second)."""
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    if what == "num_request_queues":
        bad = b"big".ljust(36, b"\0") + struct.pack("<II", 0xFFFFFFFF, 64)
        monkeypatch.setattr(DeviceConfig, "config_space", lambda self: bad)
    else:
        monkeypatch.setattr(VhostUserTransport, "num_queues", lambda self: 2**64 - 1)
    sock = sock_dir / "ref.sock"
    start = time.monotonic()
    with RefDevice(str(sock), str(export)):
        rc = cli.main(["check", "--vhost-user", str(sock), "--json"])
    assert time.monotonic() - start < 30
    doc = json.loads(capsys.readouterr().out)
    assert_schema(doc)
    c = by_id(doc)
    if what == "num_request_queues":
        assert rc == 1 and c["config.num_request_queues"]["result"] == "fail"
        assert c["queues.layout"]["result"] == "skip"
    else:
        assert "queues.sizes" in c


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
    report = run_checks(t, Report("fake", "fake"), CheckOptions(timeout=1))
    c = by_id(report)
    # clearing FEATURES_OK is what a device MUST do with features it does not take
    # (D6); not taking a valid subset is D5, a SHOULD: a deviation, and the run is
    # incomplete (no live check ran), so it is not ok
    assert c["features.features_ok"]["result"] == "pass"
    assert "D5 (SHOULD)" in c["features.features_ok"]["deviation"]
    assert "cleared FEATURES_OK" in c["features.features_ok"]["observed"]
    assert not report.ok and "no live check ran" in report.incomplete
    assert c["bringup"]["result"] == "skip"
    assert c["reset"]["result"] == "pass"

    t = FakeTransport(features=Feature.INDIRECT_DESC, config=encode_config("t", 1),
                      queue_max={0: 64, 1: 64})
    report = run_checks(t, Report("fake", "fake"), CheckOptions(timeout=1))
    c = by_id(report)
    assert not report.ok
    assert c["features.version_1"]["result"] == "fail"
    assert c["fuse.init"]["observed"] == "not reached: VERSION_1 not offered"


def test_junit_of_a_failing_device(tmp_path: Path, capsys) -> None:
    """--junit marks failed checks as failures and skipped ones as skipped."""
    t = FakeTransport(features=Feature.INDIRECT_DESC, config=encode_config("t", 1),
                      queue_max={0: 64, 1: 64})
    report = run_checks(t, Report("fake", "fake"), CheckOptions(timeout=0.2))
    suite = ElementTree.fromstring(report.junit())
    failed = {tc.get("name") for tc in suite.findall("testcase") if tc.find("failure") is not None}
    skipped = {tc.get("name") for tc in suite.findall("testcase") if tc.find("skipped") is not None}
    assert failed == {c.id for c in report.checks if c.result == "fail"} and failed
    assert "features.version_1" in failed
    assert skipped == {c.id for c in report.checks if c.result == "skip"} and "fuse.init" in skipped
    assert suite.get("failures") == str(len(failed))
    case = next(tc for tc in suite.findall("testcase") if tc.get("name") == "features.version_1")
    assert "D38" in case.find("failure").text and "VERSION_1" in case.find("failure").get("message")
    # an unfinished run says which items it did not reach
    assert report.coverage()["not_reached"]


def test_device_that_never_answers_and_bad_queue_sizes() -> None:
    """A device that takes every buffer and answers nothing: FUSE_INIT times out (through
    the driver and on the raw ring). Its queue 0 is 65536 entries (over the split-ring
    maximum) and queue 1 is not a power of 2."""
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
    # D58: a split-ring queue_size is 0 or a power of 2 (MUST); the driver rounds down
    assert c["queues.sizes"]["result"] == "fail" and "not a power of 2" in c["queues.sizes"][
        "observed"]
    assert c["bringup"]["result"] == "pass"
    assert c["ring.framing[VERSION_1 only]"]["result"] == "fail"
    assert "not used within" in c["ring.framing[VERSION_1 only]"]["observed"]
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
    assert c["pci.identity"]["result"] == "pass"
    assert c["pci.identity"]["observed"].startswith("1af4:105a rev ")
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


def test_a_pci_function_that_is_not_virtio_fs_is_reported_as_pci() -> None:
    """Another device (virtio-net's 1af4:1041): its identity items count as checked
    (and failed), and nothing not reached is explained by vhost-user or --read-only."""
    from test_pci_transport import make_function

    report = Report("0000:00:03.0", "virtio-pci (VFIO)")
    fn, _, _ = make_function(device=0x1041)
    assert not check_pci_function(report, fn, CheckOptions())
    assert not report.ok
    cov = report.coverage()
    assert {"D43", "D44", "D45", "D46"} <= set(cov["covered"]), cov["covered"]
    reasons = " ".join([*cov["not_observable"].values(), *cov["not_reached"].values()])
    assert "vhost-user transport" not in reasons and "--read-only" not in reasons, reasons
    # features were never read: what they would decide is not reached, not "not offered"
    assert "not offered" not in reasons and "not negotiated" not in reasons, reasons


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
        assert st.refs in doc, cid


def test_checklist_is_complete_and_documented() -> None:
    """Every item has a source and is observed by a known check or says why not; every
    check observes at least one item; docs/conformance.rst lists each item as the code."""
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" /
                    "conformance.rst").read_text().split())
    assert [i.id for i in ITEMS] == [f"D{n}" for n in range(1, CHECKLIST_SIZE + 1)]
    for item in ITEMS:
        assert item.source.startswith("virtio 1.3 §") and item.text
        assert bool(item.checks) != bool(item.reason), item.id
        assert set(item.checks) <= set(STATEMENTS), item.id
        assert f"* - {item.id} - {item.level} - {item.source} - {item.text}" in doc, item.id
        assert (item.reason[1:] if item.reason else item.checks[0]) in doc, item.id
    for cid, st in STATEMENTS.items():
        assert st.refs.startswith("D"), cid


def test_reference_device_behind_an_emulated_pci_function(sock_dir: Path, export: Path) -> None:
    """check through the driver's PCI transport on the emulated virtio-pci function that
    forwards to the reference device (tests/fakes/vhost_pci_bridge.py, QEMU's role): the
    PCI rows of the checklist become observable."""
    from fakes.vhost_pci_bridge import VhostPciFunction
    from vfsdrv.virtio import pci as vp

    with serve("refdev", export, sock_dir / "ref.sock"):
        fn = VhostPciFunction(str(sock_dir / "ref.sock"))
        report = Report("emulated", "virtio-pci (emulated)")
        try:
            assert check_pci_function(report, fn)
            t = vp.VirtioPciTransport(fn, device_id=vp.VIRTIO_ID_FS)
            try:
                run_checks(t, report, CheckOptions())
            finally:
                t.close()
        finally:
            fn.close()
    c = by_id(report)
    # the emulated function (test_pci_transport.make_function) presents no PCI_CFG
    # capability, which D70 requires of a device: that, and only that, is reported
    assert _failed(c) == {"pci.cap_list"}
    assert c["pci.cap_list"]["observed"] == "no VIRTIO_PCI_CAP_PCI_CFG capability"
    assert "D70" in c["pci.cap_list"]["refs"]
    for cid in ("pci.identity", "pci.capabilities", "pci.registers", "reset",
                "ring.before_driver_ok", "reset.live", "notify.load"):
        assert c[cid]["result"] == "pass", c[cid]
    cov = report.coverage()
    assert cov["not_reached"] == {}
    assert len(cov["covered"]) + len(cov["not_observable"]) == CHECKLIST_SIZE
    assert {"D1", "D9", "D43", "D44", "D51", "D55", "D57", "D61", "D65", "D70",
            "D74"} <= set(cov["covered"])
    assert sorted(p.name for p in export.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_check_stopped_by_a_signal_removes_its_scratch_directory(
        sock_dir: Path, export: Path, sig: str) -> None:
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM while the
    checks work in the scratch directory: the check stops between two requests,
    removes the directory and exits 130, at every moment tried."""
    import signal
    import sys

    from interrupting import signal_group_when

    with RefDevice(str(sock_dir / "r.sock"), str(export)):
        for delay in (0.0, 0.004, 0.008, 0.012, 0.02, 0.04):
            rc, err = signal_group_when(
                [sys.executable, "-m", "vfsdrv.tools.cli", "check", "--vhost-user",
                 str(sock_dir / "r.sock")], lambda: bool(list(export.glob(".vfsdrv-check-*"))),
                delay, getattr(signal, sig))
            # 0/1: it had finished; -15: SIGTERM after the scratch work (its default)
            assert rc in (0, 1, 130, -signal.SIGTERM), err
            assert "Traceback" not in err and "could not remove" not in err, err
            assert list(export.glob(".vfsdrv-check-*")) == [], (delay, err)


def test_tag_for_a_device_with_its_own_config_space_is_said_to_be_ignored(
        sock_dir: Path, export: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export)), caplog.at_level(logging.WARNING):
        check_vhost_user(str(sock), CheckOptions(read_only=True), tag="x")
    assert any("--tag/--request-queues ignored" in m for m in caplog.messages)


def test_a_backend_with_no_queues_is_refused(sock_dir: Path, export: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """GET_QUEUE_NUM answered 0 (QEMU refuses such a backend): an error naming it, not
    a run that treats 0 as "no limit" and passes."""
    from vfsdrv.errors import TransportError
    from vfsdrv.virtio import vhost_user_proto as vu
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    orig = VhostUserTransport._get_u64
    monkeypatch.setattr(VhostUserTransport, "_get_u64", lambda self, req: 0
                        if req == vu.Request.GET_QUEUE_NUM else orig(self, req))
    with serve("refdev", export, sock_dir / "ref.sock"), \
            pytest.raises(TransportError, match="GET_QUEUE_NUM answered 0 queues"):
        check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))


def test_notifications_with_codes_fuse_does_not_define_fail(sock_dir: Path,
                                                           export: Path) -> None:
    """A device that floods the notification queue with header-only messages under
    codes FUSE does not define (the kernel refuses them): notify.queue fails, also
    for those that come after it was judged (they once passed as "received")."""
    from fakes.hostile_device import HostileDevice, Mutator

    mutator = Mutator(seed=1, rate=0.0, notify_rate=0.3, notify_kinds=["notify_flood"],
                      flood=20)
    sock = sock_dir / "hostile.sock"
    with HostileDevice(str(sock), str(export), mutator, ring="split"):
        report = check_vhost_user(str(sock), CheckOptions(timeout=1.0))
    c = by_id(report)
    fails = [v for k, v in c.items() if k.startswith("notify.queue") and v["result"] == "fail"]
    assert fails, c.get("notify.queue")
    assert all("notify code FUSE does not define" in v["observed"] for v in fails), fails


def test_more_request_queues_than_the_backend_has_is_a_usage_error(sock_dir: Path,
                                                                    export: Path) -> None:
    """Debian's virtiofsd has no config space: --request-queues is the user's, and more
    than the backend's queues is a bad command line (status 2), not a device failing
    queues.layout."""
    import subprocess
    import sys

    with serve("virtiofsd", export, sock_dir / "v.sock") as args:
        r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "check", *args,
                            "--request-queues", "2"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--request-queues 2: the backend has 2 queue(s)" in r.stderr, r.stderr


def test_a_ring_broken_inside_a_check_that_catches_it_skips_the_rest(
        sock_dir: Path, export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring breaks inside hiprio.storm, which reports the device's errors itself:
    the session is broken all the same (VirtioFs marked it), so the later checks say
    they were not reached instead of failing one by one on the same defect."""
    from vfsdrv.conformance import fuse_checks

    def room(fs, deadline):
        exc = RingError("used id repeated")
        fs._break(exc)  # as the device layer breaks it
        raise exc

    monkeypatch.setattr(fuse_checks, "_hiprio_room", room)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    c = by_id(report)
    assert c["hiprio.storm"]["result"] == "fail", c["hiprio.storm"]
    for cid in ("notify.queue", "notify.lock", "notify.load"):
        assert c[cid]["result"] == "skip", c[cid]
        assert "the session broke during hiprio.storm" in c[cid]["observed"]


def test_a_read_only_export_is_not_a_failure(sock_dir: Path, export: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The device answers EROFS for the scratch directory (its export is read-only,
    and the user did not say --read-only): the checks that write skip, as with
    --read-only, and the device passes; it used to fail fuse.opcodes[MKDIR]."""
    def mkdir(self, hdr, body):
        raise OSError(errno.EROFS, "read-only file system")

    monkeypatch.setattr(FuseServer, "mkdir", mkdir)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    c = by_id(report)
    assert c["fuse.opcodes[MKDIR]"]["result"] == "skip", c["fuse.opcodes[MKDIR]"]
    assert "read-only" in c["fuse.opcodes[MKDIR]"]["observed"]
    assert report.ok, report.table()


def test_a_device_that_never_notifies_under_event_idx_costs_no_timeout_per_request(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """With EVENT_IDX the request queues are never interrupted: ring.used_notify fails,
    and the answers the device does give are still found without waiting --timeout for
    each (the run took about 45 x --timeout before)."""
    orig = DeviceQueue.signal

    def signal(self):
        if not (self.event_idx and self.index > 0):
            orig(self)

    monkeypatch.setattr(DeviceQueue, "signal", signal)
    start = time.monotonic()
    c = _check_broken(sock_dir, export)
    took = time.monotonic() - start
    assert _failed(c) == {"ring.used_notify[EVENT_IDX]"}
    assert took < 30, took


def test_a_device_that_stops_answering_ends_the_session_not_each_check(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """The device stops answering at its first WRITE (its queue thread hangs, as a
    SIGSTOPped device's would): that check fails, one GETATTR of the root tells the
    device stopped, and the checks after it are not reached, instead of each waiting
    --timeout (the run took about 20 x --timeout before)."""
    report, took = _check_with_a_hang(sock_dir, export, monkeypatch, "write")
    c = by_id(report)
    stopped = c["fuse.opcodes[(the check stopped here)]"]
    assert stopped["result"] == "fail"
    assert "the device stopped answering: no reply to WRITE" in stopped["observed"], stopped
    for cid in ("fuse.errors", "hiprio.storm", "notify.load", "reset.live"):
        assert c[cid]["result"] == "skip" and "not reached" in c[cid]["observed"], c[cid]
    assert took < 12, (took, report.table())


def test_a_device_gone_during_the_ring_probes_keeps_the_report(
        sock_dir: Path, export: Path, monkeypatch) -> None:
    """The device goes away during the EVENT_IDX ring probe: what was checked before
    stays in the report, the probe fails, the live checks are not reached."""
    from vfsdrv.conformance import probes
    from vfsdrv.errors import DeviceGoneError

    real = probes.ring_session

    def ring_session(t, report, timeout, *, event_idx, device_status):
        if event_idx:
            raise DeviceGoneError("vhost-user: backend closed the connection")
        real(t, report, timeout, event_idx=event_idx, device_status=device_status)

    monkeypatch.setattr(probes, "ring_session", ring_session)
    with serve("refdev-split", export, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
    assert not report.ok
    c = by_id(report)
    assert c["features.version_1"]["result"] == "pass"
    assert c["ring.framing[VERSION_1 only]"]["result"] == "pass"
    assert "backend closed" in c["ring.framing[(the check stopped here)]"]["observed"]
    for cid in ("bringup", "fuse.init", "notify.lock", "reset.live"):
        assert c[cid]["result"] == "skip" and "not reached" in c[cid]["observed"], c[cid]


def test_an_empty_export_still_gets_its_lock_checked(sock_dir: Path) -> None:
    """No regular file in the root: notify.lock locks one made in the scratch directory."""
    empty = sock_dir / "empty"
    empty.mkdir()
    with serve("refdev", empty, sock_dir / "ref.sock"):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=2.0))
    c = by_id(report)
    assert c["notify.lock"]["result"] == "pass", c["notify.lock"]
    assert "FUSE_NOTIFY_LOCK" in c["notify.lock"]["observed"]
    assert report.ok
    assert list(empty.iterdir()) == []  # the scratch directory and its file are gone


def test_a_device_out_of_lock_resources_is_not_failed(sock_dir: Path, export: Path) -> None:
    """A device that parks at most 4 blocking locks refuses the rest with ENOLCK (the
    proposal allows it): notify.load says so and is not failed."""
    with serve("refdev", export, sock_dir / "ref.sock", max_waiting_locks=4):
        report = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=2.0))
    c = by_id(report)
    assert c["notify.load"]["result"] == "skip", c["notify.load"]
    assert "4 parked" in c["notify.load"]["observed"]
    assert "8 refused with ENOLCK" in c["notify.load"]["observed"]
    assert report.ok, report.table()


def test_ring_split_asked_of_a_device_that_runs_packed_rings_only(sock_dir: Path,
                                                                 export: Path) -> None:
    """--ring split against refdev --ring packed: the device refuses the driver's
    features (its MUST), which is not a failure of the device but leaves the run
    incomplete, as --ring packed against a split-only device does."""
    sock = sock_dir / "ref.sock"
    with RefDevice(str(sock), str(export), ring="packed"):
        report = check_vhost_user(str(sock), CheckOptions(ring="split"))
    c = by_id(report)
    assert _failed(c) == set(), report.table()
    assert c["features.features_ok"]["result"] == "pass"
    assert "--ring split" in c["features.features_ok"]["observed"]
    assert not report.ok and "--ring" in report.incomplete
    assert c["bringup"]["result"] == "skip"


def test_a_device_with_another_lock_notify_code(sock_dir: Path, export: Path) -> None:
    """refdev --notify-lock-code 9: checked with the same code it passes; with the
    default the failure says what came instead and how to say which code."""
    with serve("refdev", export, sock_dir / "ref.sock", notify_lock_code=9):
        wrong = check_vhost_user(str(sock_dir / "ref.sock"), CheckOptions(timeout=1.0))
        right = check_vhost_user(str(sock_dir / "ref.sock"),
                                 CheckOptions(timeout=2.0, notify_lock_code=9))
    assert right.ok, right.table()
    c = by_id(wrong)
    assert c["notify.lock"]["result"] == "fail"
    assert "no FUSE_NOTIFY_LOCK with code 7 came; notifications meanwhile: 1 code 9" in \
        c["notify.lock"]["observed"], c["notify.lock"]
    assert "--notify-lock-code" in c["notify.lock"]["observed"]
