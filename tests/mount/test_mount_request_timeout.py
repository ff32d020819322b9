"""`vfsdrv mount -o request_timeout=N` (relay, off by default): a device that stays
connected but stops answering fails the mount like a dead FUSE server after N
seconds (waiting programs get an error, the mount stays and answers ENOTCONN
until it is unmounted), while a slow device that keeps completing requests and a
blocking lock that waits on the notification queue do not trip it.

The reference device runs in this process (inprocess_refdev_mount) so that a test
can make it hold requests or answer them late. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mount_helpers import VFSDRV, inprocess_refdev_mount, refused_mount
from mounting import is_mounted, mount_points
from test_mount_pumps import status_of

TIMEOUT = 2  # -o request_timeout= in these tests

READER = r"""
import errno, sys, time
t0 = time.monotonic()
try:
    with open(sys.argv[1]) as f:
        f.read()
    print("ok %.2f" % (time.monotonic() - t0), flush=True)
except OSError as exc:
    print("%s %.2f" % (errno.errorcode[exc.errno], time.monotonic() - t0), flush=True)
"""

HOLDER = r"""
import fcntl, sys
f = open(sys.argv[1], "r+")
fcntl.lockf(f, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""

WAITER = r"""
import fcntl, sys, time
f = open(sys.argv[1], "r+")
print("asking", flush=True)
t0 = time.monotonic()
fcntl.lockf(f, fcntl.LOCK_EX)
print("granted %.2f" % (time.monotonic() - t0), flush=True)
"""


@contextmanager
def lock_held_and_awaited(path: Path) -> Iterator[tuple[subprocess.Popen, subprocess.Popen]]:
    """(holder, waiter): the holder has the lock on `path` (it lets go at a line on
    its stdin), the waiter has asked for it. Both end with the block; a waiter still
    stuck in the kernel goes when the mount's teardown aborts the connection, so no
    wait here is unbounded."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        assert waiter.stdout is not None and waiter.stdout.readline() == "asking\n"
        yield holder, waiter
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)


class DeviceControl:
    """What the in-process reference device does with requests on the request
    queues (hiprio is always served): answer, hold them forever, answer each
    one `delay` seconds late, or hold the next one that `drop` picks."""

    def __init__(self) -> None:
        self.drop: Callable[[bytes], bool] | None = None
        self.stall = threading.Event()
        self.delay = 0.0
        self.fsync_takes = 0.0  # an FSYNC holds the queue (a device serving in order)
        self.held: list[object] = []
        self.served_late = 0


@pytest.fixture
def control(monkeypatch) -> Iterator[DeviceControl]:
    from vfsdrv.refdev.vhost_session import VhostUserSession

    ctl = DeviceControl()
    real_serve = VhostUserSession._serve_chain

    def serve(self, q, chain, hiprio: bool) -> None:
        if hiprio:
            return real_serve(self, q, chain, hiprio)
        if ctl.stall.is_set():
            ctl.held.append(chain)  # never answered, never returned
            return
        if ctl.drop is not None and ctl.drop(bytes(chain.read_all())):
            ctl.drop = None
            ctl.held.append(chain)
            return
        delay = ctl.delay
        if ctl.fsync_takes and struct.unpack_from("<I", bytes(chain.read_all()), 4)[0] == 20:
            time.sleep(ctl.fsync_takes)  # in the queue's thread: nothing else is served
        if delay:
            time.sleep(delay)
        real_serve(self, q, chain, hiprio)
        if delay:
            # publish and signal each late answer at once, not at the end of the batch
            ctl.served_late += 1
            q.flush()
            q.signal()

    monkeypatch.setattr(VhostUserSession, "_serve_chain", serve)
    yield ctl


def _wait_for(pattern: str, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text := log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{text[-3000:]}"
        time.sleep(0.05)
    return text


def _why_unserved(mnt: Path) -> str:
    """What `vfsdrv status --json` says of why the server of `mnt` ended, once it
    lists the mount as unserved (the server may still be on its way out)."""
    deadline = time.monotonic() + 15
    while True:
        st = json.loads(subprocess.run([*VFSDRV, "status", "--json"], capture_output=True,
                                       text=True, timeout=30, check=True).stdout)
        mine = [m for m in st["unserved"] if m["mountpoint"] == str(mnt)]
        if mine:
            return mine[0].get("why", "")
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def _read_from_a_stalled_device(tmp_path: Path, mnt: Path, control: DeviceControl) -> None:
    """The device answers nothing from now on: a program reading a file it never
    looked up gets an error after about request_timeout seconds."""
    (tmp_path / "export" / "g").write_text("never looked up")
    control.stall.set()
    r = subprocess.run([sys.executable, "-c", READER, str(mnt / "g")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    name, elapsed = r.stdout.split()
    # The kernel ends the requests still with the server with ECONNABORTED when the
    # server closes /dev/fuse (fuse_abort_conn); ENOTCONN if it was not sent yet
    assert name in ("ECONNABORTED", "ENOTCONN"), r.stdout
    # sampled once a second: between N and N + 2 s after the request went out (the
    # upper bound leaves room for a loaded machine)
    assert TIMEOUT - 0.5 <= float(elapsed) < TIMEOUT + 4, r.stdout


def test_a_device_that_stops_answering_fails_the_mount(tmp_path: Path,
                                                       control: DeviceControl) -> None:
    """The device keeps its connection but answers nothing: a program reading a file
    gets an error after about request_timeout seconds instead of hanging; the mount
    stays listed and answers ENOTCONN; `vfsdrv umount` removes it."""
    with inprocess_refdev_mount(tmp_path, "-o", f"request_timeout={TIMEOUT}") as (mnt, log, _):
        st = status_of(mnt)
        assert st["request_timeout"] == TIMEOUT
        text_status = subprocess.run([*VFSDRV, "status"], capture_output=True, text=True,
                                     timeout=30, check=True).stdout
        assert f"request timeout: {TIMEOUT} s" in text_status
        _read_from_a_stalled_device(tmp_path, mnt, control)
        assert control.held, "the device was never asked"
        text = _wait_for(
            rf"the device is unresponsive: request queue \d+ has [1-9]\d* request\(s\) in "
            rf"flight and nothing completed for [\d.]+ s \(-o request_timeout={TIMEOUT}\)",
            log, 10)
        _wait_for(r"stays mounted and answers ENOTCONN", log, 10)
        assert "FUSE_DESTROY sent" not in text  # nothing more is asked of a dead device
        assert str(mnt) in mount_points()
        # status lists it as unserved, with why its server ended
        assert "the device is unresponsive" in _why_unserved(mnt)
        text_status = subprocess.run([*VFSDRV, "status"], capture_output=True, text=True,
                                     timeout=30, check=True).stdout
        assert f"{mnt}: " in text_status and "(no server (the device is unresponsive" \
            in text_status, text_status
        with pytest.raises(OSError) as later:
            os.stat(mnt / "f")
        assert later.value.errno == errno.ENOTCONN
        r = subprocess.run([*VFSDRV, "umount", str(mnt)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not is_mounted(mnt)
        from vfsdrv.tools.status import _ending_path

        assert not _ending_path(str(mnt)).exists()  # its mount is gone: so is the record


def test_a_request_left_behind_fails_the_mount(tmp_path: Path, control: DeviceControl) -> None:
    """The device drops one LOOKUP and goes on answering everything else (another
    program keeps asking): the reader gets an error after about request_timeout
    seconds, not when the other program stops."""
    # split: on the packed ring the two negotiate IN_ORDER, where answering a later
    # request answers the held one too
    with inprocess_refdev_mount(tmp_path, "-o", f"request_timeout={TIMEOUT}",
                                "--ring", "split") as (mnt, log, _):
        (tmp_path / "export" / "g").write_text("its LOOKUP is lost")
        stop = threading.Event()

        def other_program() -> None:
            i = 0
            while not stop.is_set():
                try:
                    os.stat(mnt / f"missing-{i}")  # a LOOKUP each, answered at once
                except FileNotFoundError:
                    pass
                except OSError:
                    return  # the mount failed
                i += 1
                time.sleep(0.02)

        # the reader's LOOKUP of "g" (opcode 1, the name after the 40-byte header)
        control.drop = lambda req: struct.unpack_from("<I", req, 4)[0] == 1 and \
            req[40:].rstrip(b"\0") == b"g"
        t = threading.Thread(target=other_program)
        t.start()
        try:
            r = subprocess.run([sys.executable, "-c", READER, str(mnt / "g")],
                               capture_output=True, text=True, timeout=60)
        finally:
            stop.set()
            t.join(30)
        assert r.returncode == 0, r.stderr
        name, elapsed = r.stdout.split()
        assert name in ("ECONNABORTED", "ENOTCONN"), r.stdout
        assert TIMEOUT - 0.5 <= float(elapsed) < TIMEOUT + 4, r.stdout
        assert control.held, "the LOOKUP was not held"
        _wait_for(rf"the device is unresponsive: request queue \d+: a request has waited "
                  rf"[\d.]+ s while the device answered later ones \(-o request_timeout="
                  rf"{TIMEOUT}\)", log, 10)


def test_a_request_the_device_still_holds_at_shutdown_keeps_its_buffer(
        tmp_path: Path, control: DeviceControl) -> None:
    """The server stops (SIGTERM) while the device holds a LOOKUP: the program gets
    an error, DESTROY still goes to the device, and the held request's buffer is not
    reused for it (a late reply would land there)."""
    with inprocess_refdev_mount(tmp_path, "--ring", "split", verbose=True) as (mnt, log, _):
        (tmp_path / "export" / "g").write_text("its LOOKUP is held")
        control.drop = lambda req: struct.unpack_from("<I", req, 4)[0] == 1 and \
            req[40:].rstrip(b"\0") == b"g"
        reader = subprocess.Popen([sys.executable, "-c", READER, str(mnt / "g")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            while not control.held:
                assert time.monotonic() < deadline, "the LOOKUP never reached the device"
                time.sleep(0.02)
            st = status_of(mnt)
            assert st["request_timeout"] == 120  # the default: nothing waits forever
            os.kill(st["pid"], signal.SIGTERM)
            out, _ = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(5)
        assert out.split()[0] in ("ECONNABORTED", "ENOTCONN"), out
        text = _wait_for(r"1 request\(s\) the device had not answered: their buffers are "
                         r"not reused", log, 15)
        _wait_for("FUSE_DESTROY sent to the device", log, 15)
        assert "Traceback" not in text


FSYNCER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.write(fd, b"y")
print("asking", flush=True)
os.fsync(fd)
print("synced", flush=True)
"""


@pytest.mark.parametrize("opcode,program", [(33, WAITER), (20, FSYNCER)],
                         ids=["SETLKW", "FSYNC"])
def test_a_request_a_sound_device_may_hold_does_not_trip_it(
        tmp_path: Path, control: DeviceControl, opcode: int, program: str) -> None:
    """A device without blocking-lock notifications may hold a SETLKW on the request
    queue until the lock is free, and an FSYNC takes what the disk takes: with
    nothing else in flight that is no stall, and a later request still works."""
    # split: with IN_ORDER (packed) answering a later request answers the held one too
    with inprocess_refdev_mount(tmp_path, "-o", f"request_timeout={TIMEOUT}",
                                "--ring", "split") as (mnt, log, _):
        control.drop = lambda req: struct.unpack_from("<I", req, 4)[0] == opcode
        held = subprocess.Popen([sys.executable, "-c", program, str(mnt / "f")],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout is not None and held.stdout.readline() == "asking\n"
            deadline = time.monotonic() + 15
            while not control.held:
                assert time.monotonic() < deadline, "the request never reached the device"
                time.sleep(0.02)
            time.sleep(TIMEOUT + 2.5)  # two and more of the relay's samples
            assert "unresponsive" not in log.read_text()
            assert (mnt / "g").exists() is False  # a LOOKUP still answered
            assert held.poll() is None  # still waiting for the device
            os.kill(status_of(mnt)["pid"], signal.SIGTERM)  # ends the wait (aborted)
            held.wait(60)
        finally:
            if held.poll() is None:
                held.kill()
                held.wait(5)


@pytest.mark.parametrize("frontend", ["relay", "pyfuse3"])
def test_requests_queued_behind_a_long_fsync_do_not_trip_it(
        tmp_path: Path, control: DeviceControl, frontend: str) -> None:
    """A device that serves its queue in order spends longer than the timeout on an
    FSYNC, and a LOOKUP waits behind it: nothing completes meanwhile, yet the device
    is sound, and both requests are answered."""
    with inprocess_refdev_mount(tmp_path, "--frontend", frontend, "-o",
                                f"request_timeout={TIMEOUT}") as (mnt, log, _):
        (tmp_path / "export" / "behind").write_text("behind")
        control.fsync_takes = TIMEOUT + 2.5
        syncer = subprocess.Popen([sys.executable, "-c", FSYNCER, str(mnt / "f")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert syncer.stdout is not None and syncer.stdout.readline() == "asking\n"
            time.sleep(0.5)  # the FSYNC is with the device
            r = subprocess.run(["stat", "-c", "%s", str(mnt / "behind")], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == "6", r.stderr
            assert syncer.stdout.readline() == "synced\n"
            assert syncer.wait(30) == 0
        finally:
            control.fsync_takes = 0.0
            if syncer.poll() is None:
                syncer.kill()
                syncer.wait(5)
        assert "unresponsive" not in log.read_text()
        assert (mnt / "f").read_text() == "y"  # FSYNCER wrote it over the "x"


def test_a_slow_device_that_keeps_answering_does_not_trip_it(
        tmp_path: Path, control: DeviceControl) -> None:
    """Each request answered 0.5 s late, eight programs at once: the batch takes
    about 4 s, twice the timeout, but something completes every 0.5 s."""
    with inprocess_refdev_mount(tmp_path, "-o", f"request_timeout={TIMEOUT}") as (mnt, log, _):
        names = [f"slow{i}" for i in range(8)]
        for name in names:
            (tmp_path / "export" / name).write_text(name)
        control.delay = 0.5
        t0 = time.monotonic()
        procs = [subprocess.Popen(["stat", "-c", "%s", str(mnt / name)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in names]
        try:
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        elapsed = time.monotonic() - t0
        control.delay = 0.0
        assert [p.returncode for p in procs] == [0] * 8, outs
        assert [int(out) for out, _err in outs] == [len(n) for n in names]
        assert control.served_late >= 8
        assert elapsed > TIMEOUT + 1, f"the batch took {elapsed:.2f} s: not slow enough"
        assert (mnt / "f").read_text() == "x"  # still served
        assert "unresponsive" not in log.read_text()
        assert is_mounted(mnt)


def test_stalls_shorter_than_the_timeout_never_trip_it(tmp_path: Path,
                                                     control: DeviceControl) -> None:
    """request_timeout=1, one request at a time, each answered 0.5 s late, each sent
    more than a second after the last (so an idle sample comes between) at a
    different phase of the once-a-second sampling: none may be taken for a dead
    device. (A request sent just after an idle sample used to be timed from that
    sample, up to a second early: about half of these tripped it.)"""
    with inprocess_refdev_mount(tmp_path, "-o", "request_timeout=1") as (mnt, log, _):
        names = [f"late{i}" for i in range(8)]
        for name in names:
            (tmp_path / "export" / name).write_text(name)
        control.delay = 0.5
        try:
            for k, name in enumerate(names):
                time.sleep(1.05 + k / len(names))
                r = subprocess.run(["stat", "-c", "%s", str(mnt / name)],
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 0, (name, r.stderr, log.read_text()[-2000:])
                assert int(r.stdout) == len(name)
        finally:
            control.delay = 0.0
        assert control.served_late >= len(names)
        assert "unresponsive" not in log.read_text()
        assert is_mounted(mnt)


def test_a_blocking_lock_waiting_longer_than_the_timeout_does_not_trip_it(
        tmp_path: Path, control: DeviceControl) -> None:
    """A SETLKW that the device answers "wait" (notification queue) and grants after
    more than the timeout: parked off the ring, it is not an unanswered request."""
    with inprocess_refdev_mount(tmp_path, "-o", f"request_timeout={TIMEOUT}") as (mnt, log, _):
        with lock_held_and_awaited(mnt / "f") as (holder, waiter):
            time.sleep(TIMEOUT + 2.5)  # more than the timeout and two samples
            assert waiter.poll() is None, "the lock was granted while held"
            assert (mnt / "f").read_text() == "x"  # the mount still answers
            st = status_of(mnt)
            assert st["lock_waiters"] == 1, st
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(10)
            out, _ = waiter.communicate(timeout=15)
            assert waiter.returncode == 0 and out.startswith("granted"), out
            assert float(out.split()[1]) >= TIMEOUT + 2, out
        assert "unresponsive" not in log.read_text()
        assert is_mounted(mnt)


def test_a_lock_wait_whose_interrupt_the_device_leaves_unanswered_ends(tmp_path: Path) -> None:
    """The kernel waits for the reply to an interrupted SETLKW uninterruptibly, so not
    even SIGKILL ends a program whose lock wait the device never answers. Here the
    mount takes lock notifications as code 8 while the reference device sends 7: the
    device's answer to the INTERRUPT never counts. The relay answers EINTR itself
    after INTERRUPT_GRACE, the killed program goes, and the log says why."""
    from vfsdrv.frontends.relay import INTERRUPT_GRACE

    with inprocess_refdev_mount(tmp_path, "--notify-lock-code", "8") as (mnt, log, _):
        with lock_held_and_awaited(mnt / "f") as (_holder, waiter):
            deadline = time.monotonic() + 15
            while status_of(mnt)["lock_waiters"] != 1:
                assert time.monotonic() < deadline, "the SETLKW was never parked"
                time.sleep(0.05)
            t0 = time.monotonic()
            waiter.kill()
            try:
                waiter.wait(INTERRUPT_GRACE + 15)
            except subprocess.TimeoutExpired:
                pytest.fail("SIGKILL did not end the lock waiter: its SETLKW is unanswered")
            assert time.monotonic() - t0 >= INTERRUPT_GRACE - 0.5
        text = _wait_for(r"did not answer the INTERRUPT of SETLKW \d+ within \d+ s: "
                         r"answered EINTR", log, 10)
        assert "it has the shape of FUSE_NOTIFY_LOCK, which this mount expects as code 8" in text
        assert (mnt / "f").read_text() == "x"  # the mount still answers
        assert status_of(mnt)["lock_waiters"] == 0


@pytest.mark.parametrize("value", ["-1", "abc", "0.5", "", "1e3", "nan", "inf", "2s", ".5",
                                   "4294967296", "99999999999999999999"])
def test_bad_request_timeout_is_refused_and_nothing_is_mounted(tmp_path: Path,
                                                               value: str) -> None:
    r = refused_mount(tmp_path, "-o", f"ro,request_timeout={value}", status=2)
    assert (f"'request_timeout={value}': request_timeout is seconds in decimal digits "
            "(30, 2.5): 0 (off) or from 1 to 4294967295") in r.stderr


def test_request_timeout_values() -> None:
    from vfsdrv.frontends.fuse_dev import MountOptions

    assert MountOptions.parse([]).request_timeout is None  # not chosen: the default
    assert MountOptions.parse(["ro,request_timeout=0"]).request_timeout == 0
    assert MountOptions.parse(["request_timeout=1"]).request_timeout == 1
    assert MountOptions.parse(["request_timeout=2.5"]).request_timeout == 2.5
    mo = MountOptions.parse(["request_timeout=0.99"])
    assert mo.invalid and mo.request_timeout is None


def test_pyfuse3_fails_a_device_that_stops_answering(tmp_path: Path,
                                                     control: DeviceControl) -> None:
    """The pyfuse3 frontend keeps the same deadline: the reader gets an error after
    about request_timeout seconds, the mount stays and answers ENOTCONN."""
    with inprocess_refdev_mount(tmp_path, "--frontend", "pyfuse3", "-o",
                                f"request_timeout={TIMEOUT}") as (mnt, log, _):
        _read_from_a_stalled_device(tmp_path, mnt, control)
        _wait_for(rf"the device is unresponsive: [1-9]\d* request\(s\) in flight and "
                  rf"nothing completed for [\d.]+ s \(-o request_timeout={TIMEOUT}\)", log, 10)
        _wait_for(r"stays mounted and answers ENOTCONN", log, 10)
        assert str(mnt) in mount_points()
        with pytest.raises(OSError) as later:
            os.stat(mnt / "f")
        assert later.value.errno == errno.ENOTCONN
        assert "the device is unresponsive" in _why_unserved(mnt)  # as for the relay


def test_pyfuse3_finds_replies_sent_without_their_interrupt(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The device answers on the request queues but never signals: the pyfuse3
    frontend looks at the rings once a second while requests are in flight (as the
    relay's pumps do), so the program gets its data, slowly, instead of hanging."""
    from vfsdrv.refdev.device_queue import DeviceQueue

    muted = threading.Event()
    real_signal = DeviceQueue.signal

    def signal(self) -> None:
        if not (muted.is_set() and self.index >= 2):  # 0 hiprio, 1 notifications
            real_signal(self)

    monkeypatch.setattr(DeviceQueue, "signal", signal)
    with inprocess_refdev_mount(tmp_path, "--frontend", "pyfuse3", "-o",
                                "request_timeout=0") as (mnt, log, _):
        (tmp_path / "export" / "g").write_text("quiet")
        muted.set()
        r = subprocess.run([sys.executable, "-c", READER, str(mnt / "g")],
                           capture_output=True, text=True, timeout=60)
        muted.clear()
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ok "), r.stdout
        assert (mnt / "g").read_text() == "quiet"
