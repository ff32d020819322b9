"""The command line: help, the main job (`vfsdrv demo`) and the benchmark's report."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mounting import mount_points

VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSDRV, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for command in ("mount", "umount", "demo", "bench", "refdev"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.M), command


def test_unknown_arguments_are_refused() -> None:
    r = run("demo", "--no-such-option")
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-option" in r.stderr


def test_demo_runs_end_to_end_and_leaves_nothing_mounted() -> None:
    before = set(mount_points())
    r = run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("demo: OK")
    assert "sha256 matches host: True" in r.stdout
    assert "checksums through the mount match the host's files: True" in r.stdout
    assert set(mount_points()) == before


def test_bench_prints_figures_side_by_side() -> None:
    r = run("bench", "--seconds", "0.2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.endswith("x")]
    assert len(rows) == 6, r.stdout
    for line in rows:
        mine, floor, _unit, ratio = line.split()[-4:]
        assert float(mine) > 0 and float(floor) > 0
        assert float(ratio.rstrip("x")) > 0


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_as_non_root_says_root_is_needed(command: str) -> None:
    r = subprocess.run([*VFSDRV, command], capture_output=True, text=True, timeout=60,
                       user=65534, cwd="/", env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp",
                                                 "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{command} needs root" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctrl_c_during_demo_leaves_no_temporary_directory(tmp_path) -> None:
    import os
    import signal
    import time

    before = set(mount_points())
    proc = subprocess.Popen([*VFSDRV, "demo"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first step: the backend runs, the directory exists
        assert list(tmp_path.glob("vfsdrv-demo-*"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while list(tmp_path.glob("vfsdrv-demo-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("vfsdrv-demo-*")) == []
    assert set(mount_points()) == before


@pytest.mark.parametrize("delay", [0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
def test_ctrl_c_at_a_terminal_during_the_demo_leaves_nothing(tmp_path, delay: float) -> None:
    """A terminal's Ctrl-C goes to the whole process group (the demo and whatever it
    runs), here `delay` s after the demo's directory appears (the mount part is about
    0.3-0.5 s in): the demo still unmounts, stops its backend and removes its
    directory, without a traceback."""
    import os
    import signal
    import time

    from interrupting import signal_group_when

    try:
        rc, err = signal_group_when([*VFSDRV, "demo"],
                                    lambda: bool(list(tmp_path.glob("vfsdrv-demo-*"))), delay,
                                    signal.SIGINT, env={**os.environ, "TMPDIR": str(tmp_path)})
        # 0: it had finished; -SIGINT: the signal came as the interpreter exited
        assert rc in (0, 130, -signal.SIGINT), err
        assert "Traceback" not in err, err
        deadline = time.monotonic() + 10
        while list(tmp_path.glob("vfsdrv-demo-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m for m in mount_points() if m.startswith(f"{tmp_path}/")] == []
        assert list(tmp_path.glob("vfsdrv-demo-*")) == []
    finally:  # leave the machine clean for the next test, pass or fail
        for m in mount_points():
            if m.startswith(f"{tmp_path}/"):
                subprocess.run(["umount", "-l", m], check=False)


@pytest.mark.parametrize("argv", [
    ["check", "--vhost-user", "/nonexistent.sock", "--request-queues", "99999999999999999999"],
    ["check", "--vhost-user", "/nonexistent.sock", "--timeout", "inf"],
    ["mount", "--vhost-user", "/nonexistent.sock", "--request-queues", "0", "/nonexistent"],
    ["mount", "--vhost-user", "/nonexistent.sock", "--timeout", "4294967295", "/nonexistent"],
    ["mount", "--vhost-user", "/nonexistent.sock", "--timeout", "nan", "/nonexistent"],
    ["mount", "--vhost-user", "/nonexistent.sock", "--notify-lock-code", "0", "/nonexistent"],
    ["audit", "--request-queues", "65"],
    ["refdev", "--socket", "/nonexistent/s", "--source", "/", "--notify-buf-size", "4294967296"],
    ["refdev", "--socket", "/nonexistent/s", "--source", "/", "--request-queues", "-1"],
    ["bench", "--seconds", "0"],
])
def test_numbers_out_of_range_are_usage_errors(argv: list[str]) -> None:
    """Refused by the argument parser with the option named: no traceback, nothing run."""
    r = subprocess.run([*VFSDRV, *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    option = argv[-2] if argv[0] != "mount" else argv[-3]
    assert f"error: argument {option}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_check_junit_path_is_checked_before_the_device(tmp_path) -> None:
    for path in (tmp_path / "missing" / "j.xml", tmp_path):
        r = subprocess.run([*VFSDRV, "check", "--vhost-user", str(tmp_path / "none.sock"),
                            "--junit", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "not a file in an existing directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
