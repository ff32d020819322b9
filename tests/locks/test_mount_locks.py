"""Blocking POSIX locks and flock between two mounts of one reference device,
through the relay: fcntl(F_SETLKW) and flock(2) from ordinary processes reach the
device, a waiter in mount B wakes (FUSE_NOTIFY_LOCK) when a holder in mount A
releases, a signal cancels a wait (FUSE_INTERRUPT), and a mount going away
releases its locks."""

from __future__ import annotations

import errno
import signal
import time
from pathlib import Path

from mounting import is_mounted
from two_mounts import Locker, Pair, mounted, refdev


def _locker(lockers: list[Locker], path: Path) -> Locker:
    lk = Locker(path)
    lockers.append(lk)
    assert lk.expect() == "ready"
    return lk


def _hand_over(holder: Locker, waiter: Locker) -> None:
    """The holder takes the whole file, the waiter blocks on it, the holder lets go:
    the waiter gets it (through FUSE_NOTIFY_LOCK)."""
    holder.send("lock W 0 0")
    assert holder.expect() == "locked"
    waiter.send("lock W 0 0")
    assert waiter.silent_for(0.3)
    holder.send("unlock")
    assert holder.expect() == "unlocked"
    assert waiter.expect(5) == "locked"


def test_waiter_in_b_wakes_when_holder_in_a_releases(pair: Pair, lockers: list[Locker]) -> None:
    (pair.dev.export / "f").write_bytes(b"x" * 100)
    holder = _locker(lockers, pair.a.path / "f")
    waiter = _locker(lockers, pair.b.path / "f")
    holder.send("lock W 0 0")
    assert holder.expect() == "locked"
    waiter.send("try W 0 0")
    assert waiter.expect().startswith("busy")  # the lock is the device's, not the kernel's
    waiter.send("lock W 0 0")
    assert waiter.silent_for(1.0), "the waiter got a lock the holder still has"
    t0 = time.monotonic()
    holder.send("unlock")
    assert holder.expect() == "unlocked"
    assert waiter.expect(5) == "locked"
    assert time.monotonic() - t0 < 2.0
    holder.send("try W 0 0")
    assert holder.expect().startswith("busy")


def test_byte_ranges_do_not_conflict(pair: Pair, lockers: list[Locker]) -> None:
    (pair.dev.export / "r").write_bytes(b"x" * 100)
    a = _locker(lockers, pair.a.path / "r")
    b = _locker(lockers, pair.b.path / "r")
    a.send("lock W 0 10")
    assert a.expect() == "locked"
    b.send("lock W 10 10")
    assert b.expect(5) == "locked"
    b.send("try R 5 10")
    assert b.expect().startswith("busy")
    a.send("getlk")
    assert a.expect().startswith("held")


def test_flock_across_mounts(pair: Pair, lockers: list[Locker]) -> None:
    (pair.dev.export / "fl").write_bytes(b"")
    a = _locker(lockers, pair.a.path / "fl")
    b = _locker(lockers, pair.b.path / "fl")
    a.send("flock")
    assert a.expect() == "flocked"
    b.send("flock")
    assert b.silent_for(1.0)
    a.send("funlock")
    assert a.expect() == "funlocked"
    assert b.expect(5) == "flocked"


def test_a_thousand_contention_rounds_lose_no_wakeup(pair: Pair, lockers: list[Locker],
                                                     tmp_path: Path) -> None:
    (pair.dev.export / "c").write_bytes(b"")
    log = tmp_path / "critical.log"
    a = _locker(lockers, pair.a.path / "c")
    b = _locker(lockers, pair.b.path / "c")
    a.send(f"rounds 500 {log} A")
    b.send(f"rounds 500 {log} B")
    assert a.expect(120) == "done"
    assert b.expect(120) == "done"
    lines = log.read_text().split()
    assert len(lines) == 2000
    # mutual exclusion: every "X+" is immediately followed by its own "X-"
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    assert all(enter[0] == leave[0] and enter[1] == "+" and leave[1] == "-"
               for enter, leave in pairs)
    switches = sum(1 for p, q in zip(pairs, pairs[1:], strict=False) if p[0][0] != q[0][0])
    assert switches > 10, f"only {switches} hand-overs between the mounts: no real contention"


def test_a_signal_cancels_the_wait(pair: Pair, lockers: list[Locker]) -> None:
    (pair.dev.export / "s").write_bytes(b"")
    holder = _locker(lockers, pair.a.path / "s")
    waiter = _locker(lockers, pair.b.path / "s")
    holder.send("lock W 0 0")
    assert holder.expect() == "locked"
    waiter.send("lock-intr")
    assert waiter.silent_for(0.5)
    waiter.proc.send_signal(signal.SIGUSR1)
    assert waiter.expect(5) == "interrupted EINTR"
    # the cancelled wait must not turn into a lock later
    holder.send("unlock")
    assert holder.expect() == "unlocked"
    time.sleep(0.3)
    holder.send("try W 0 0")
    assert holder.expect() == "locked"


def test_holder_mount_going_away_releases_its_locks(tmp_path: Path,
                                                    lockers: list[Locker]) -> None:
    with refdev(tmp_path) as dev:
        (dev.export / "g").write_bytes(b"")
        with mounted(dev, tmp_path / "b") as b:
            with mounted(dev, tmp_path / "a") as a:
                holder = _locker(lockers, a.path / "g")
                holder.send("lock W 0 0")
                assert holder.expect() == "locked"
                waiter = _locker(lockers, b.path / "g")
                waiter.send("lock W 0 0")
                assert waiter.silent_for(0.5)
                # the holder's whole mount disappears: its server is killed outright
                a.proc.kill()
                a.proc.wait()
                assert waiter.expect(10) == "locked"
                holder.close()
            assert not is_mounted(tmp_path / "a")


def test_enolck_at_the_devices_limit(tmp_path: Path, lockers: list[Locker]) -> None:
    with refdev(tmp_path, "--max-waiting-locks", "1") as dev:
        (dev.export / "n").write_bytes(b"")
        with mounted(dev, tmp_path / "a") as a, mounted(dev, tmp_path / "b") as b:
            holder = _locker(lockers, a.path / "n")
            holder.send("lock W 0 0")
            assert holder.expect() == "locked"
            first = _locker(lockers, b.path / "n")
            first.send("lock W 0 0")
            assert first.silent_for(0.5)  # waits: the device's one waiting slot
            second = _locker(lockers, b.path / "n")
            second.send("lock-intr")
            assert second.expect(5) == "interrupted ENOLCK"
            holder.send("unlock")
            assert holder.expect() == "unlocked"
            assert first.expect(5) == "locked"


def test_notify_buf_size_edges_work(tmp_path: Path, lockers: list[Locker]) -> None:
    for size in ("32", "4096"):
        base = tmp_path / size
        base.mkdir()
        with refdev(base, "--notify-buf-size", size) as dev:
            (dev.export / "e").write_bytes(b"")
            with mounted(dev, base / "a") as a, mounted(dev, base / "b") as b:
                _hand_over(_locker(lockers, a.path / "e"), _locker(lockers, b.path / "e"))


def test_notify_lock_code_is_an_option_on_both_sides(tmp_path: Path,
                                                     lockers: list[Locker]) -> None:
    with refdev(tmp_path, "--notify-lock-code", "13") as dev:
        (dev.export / "k").write_bytes(b"")
        opts = ("--notify-lock-code", "13")
        with mounted(dev, tmp_path / "a", *opts) as a, mounted(dev, tmp_path / "b", *opts) as b:
            _hand_over(_locker(lockers, a.path / "k"), _locker(lockers, b.path / "k"))


def test_without_the_notification_queue_a_blocking_lock_reports_the_device_answer(
        tmp_path: Path, lockers: list[Locker]) -> None:
    with refdev(tmp_path) as dev:
        (dev.export / "q").write_bytes(b"")
        with mounted(dev, tmp_path / "a") as a, \
                mounted(dev, tmp_path / "b", "--no-notification") as b:
            h = _locker(lockers, a.path / "q")
            h.send("lock W 0 0")
            assert h.expect() == "locked"
            w = _locker(lockers, b.path / "q")
            w.send("try W 0 0")
            assert w.expect().startswith("busy")  # locks still reach the device
            w.send("lock-intr")
            # what the device answers (errno 95: EOPNOTSUPP, which Python names ENOTSUP)
            assert w.expect(5) == f"interrupted {errno.errorcode[errno.EOPNOTSUPP]}"
