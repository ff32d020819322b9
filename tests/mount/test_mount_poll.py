"""The pumps' busy-poll window (`vfsdrv mount -o poll_us=N`, off by default): a relay
mount over Debian's virtiofsd with the window open moves data byte for byte and
`vfsdrv status` counts windows that found a completion and idle windows that found
a request; a default mount never
spins; a bad value is refused before anything is mounted; a pump that spins does
not hold up the unmount."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mount_helpers import refused_mount, serving
from test_mount_pumps import busy, status_of


def dd(*args: str) -> None:
    r = subprocess.run(["dd", "status=none", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def request_queues(mnt: Path) -> list[dict]:
    queues = [q for q in status_of(mnt)["queues"] if q["name"].startswith("request")]
    assert queues
    return queues


@pytest.mark.parametrize("poll_us", ["200", None], ids=["poll_us=200", "default"])
def test_data_through_a_polling_mount_and_the_counts(tmp_path: Path, poll_us: str | None) -> None:
    args = ("-o", f"poll_us={poll_us}") if poll_us else ()
    with serving(tmp_path, "relay", mount_args=args) as m:
        # 4 KiB O_DIRECT reads and writes: one request at a time, each to the device
        data = os.urandom(2 << 20)
        (m.export / "in").write_bytes(data)
        dd(f"if={m.mnt}/in", f"of={tmp_path}/out", "bs=4k", "iflag=direct")
        assert (tmp_path / "out").read_bytes() == data
        src = tmp_path / "src"
        src.write_bytes(os.urandom(1 << 20) + b"tail")
        dd(f"if={src}", f"of={m.mnt}/w", "bs=4k", "oflag=direct")
        dd(f"if={src}", f"of={m.mnt}/b", "bs=64k")  # buffered: writeback, large writes
        assert (m.export / "w").read_bytes() == src.read_bytes()
        assert (m.mnt / "b").read_bytes() == src.read_bytes() == (m.export / "b").read_bytes()
        for i in range(200):  # metadata: a LOOKUP each
            assert not (m.mnt / f"missing-{i}").exists()
        # several requests in flight: completions keep coming while the kernel has more
        busy(m.mnt)
        queues = request_queues(m.mnt)
    polls = sum(q["polls"] for q in queues)
    idle_polls = sum(q["idle_polls"] for q in queues)
    misses = sum(q["poll_misses"] for q in queues)
    served = sum(q["served"] for q in queues)
    assert served > 1000, queues
    if poll_us:
        # virtiofsd answers a 4 KiB read well within 200 us unless descheduled
        assert polls > 0, queues
        # and dd asks for the next block within 200 us of its reply: the idle window
        # reads it without the pump sleeping in between
        assert idle_polls > 0, queues
    else:
        assert polls == idle_polls == misses == 0, queues


@pytest.mark.parametrize("value", ["-1", "abc", "1001", "", "1e3"])
def test_bad_poll_us_is_refused_and_nothing_is_mounted(tmp_path: Path, value: str) -> None:
    r = refused_mount(tmp_path, "-o", f"ro,poll_us={value}", status=2)
    assert f"'poll_us={value}': poll_us is a whole number from 0 to 1000" in r.stderr


def test_poll_us_needs_the_relay(tmp_path: Path) -> None:
    """pyfuse3 has no pump: the option is refused, not silently ignored."""
    r = refused_mount(tmp_path, "--frontend", "pyfuse3", "-o", "poll_us=10", status=2)
    assert "poll_us" in r.stderr and "use the relay frontend" in r.stderr


def test_unmount_while_the_pump_spins_is_prompt(tmp_path: Path) -> None:
    """The widest window, a reader keeping requests in flight, then SIGTERM: the
    server stops its pumps and exits at once (a pump that did not stop would cost
    the relay's 5 s stop timeout and log "did not stop")."""
    with serving(tmp_path, "relay", mount_args=("-o", "poll_us=1000")) as m:
        (m.export / "f").write_bytes(os.urandom(1 << 20))
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                subprocess.run(["dd", "status=none", f"if={m.mnt}/f", "of=/dev/null",
                                "bs=4k", "iflag=direct"], capture_output=True, timeout=60)

        t = threading.Thread(target=reader)
        t.start()
        try:
            deadline = time.monotonic() + 20
            while sum(q["polls"] for q in request_queues(m.mnt)) < 100:
                assert time.monotonic() < deadline, "the pump never found a completion"
                time.sleep(0.1)
            assert m.proc is not None
            start = time.monotonic()
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(20) == 0, m.log_text()
            took = time.monotonic() - start
        finally:
            stop.set()
            t.join(60)
        assert "did not stop" not in m.log_text()
        assert took < 3, f"the server took {took:.1f} s to exit:\n{m.log_text()[-2000:]}"
