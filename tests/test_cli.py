"""The command line: help, the main job (`vfsdrv demo`) and the benchmark's report."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def demo_mounts() -> set[str]:
    """The demo's own mounts (in its vfsdrv-demo-* directory): other programs may mount
    and unmount elsewhere meanwhile."""
    return {m for m in mount_points() if "/vfsdrv-demo-" in m}


def test_demo_runs_end_to_end_and_leaves_nothing_mounted() -> None:
    before = demo_mounts()
    r = run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("demo: OK")
    assert "sha256 matches host: True" in r.stdout
    assert "checksums through the mount match the host's files: True" in r.stdout
    assert demo_mounts() == before


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
    assert [m for m in mount_points() if m.startswith(f"{tmp_path}/")] == []


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
        assert r.returncode == 2 and "not a file in an existing directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _processes_mentioning(text: str) -> dict[tuple[int, str], str]:
    """The live processes whose command line mentions `text`: (pid, start time) ->
    command line (the start time tells a pid used again from the same process)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if text in cmdline and fields[0] != "Z":
            found[(int(entry), fields[19])] = cmdline
    return found


def _alive(pid: int, start: str) -> bool:
    """Whether process `pid` started at `start` (not another one with its pid) runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


@pytest.mark.parametrize(("sig", "group", "delays"), [
    (signal.SIGTERM, False, (0.3, 0.45, 0.6, 0.75, 1.0, 1.5)),
    (signal.SIGINT, False, (0.3, 0.45, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0, 1.5)),
    (signal.SIGTERM, True, (0.3, 0.45, 0.6, 0.75, 1.0)),
    (signal.SIGHUP, False, (0.45, 0.75)),
], ids=["SIGTERM", "SIGINT", "SIGTERM-to-the-group", "SIGHUP"])
def test_a_signal_at_any_moment_of_the_demo_leaves_nothing(sig: int, group: bool,
                                                           delays: tuple[float, ...]) -> None:
    """SIGTERM (kill, timeout(1), systemd), SIGINT (kill -INT) or SIGHUP (a closed
    terminal) to the demo alone or to its process group, `delay` s after it started
    (the typed client, the mount, the programs using it, the unmount: all within about
    1 s): it unwinds as for Ctrl-C and exits 128+signal (or 0: it had finished), with
    nothing left mounted, no process it started still running and no temporary
    directory, without a traceback."""
    failures = []
    for delay in delays:
        # not under tmp_path: its long name would make the sockets' too long
        tmp = Path(tempfile.mkdtemp(prefix="demo-signal-"))
        seen: dict[tuple[int, str], str] = {}
        proc = subprocess.Popen([*VFSDRV, "demo"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(tmp)})
        try:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and proc.poll() is None:
                seen.update(_processes_mentioning(f"{tmp}/"))  # what it started, by pid
                time.sleep(0.002)
            if proc.poll() is None:
                (os.killpg if group else os.kill)(proc.pid, sig)
            _out, err = proc.communicate(timeout=120)
            rc = proc.returncode
            # what it started must be gone once it has exited (a moment for a process
            # of a stopped group to finish dying)
            left: dict[tuple[int, str], str] = {}
            stop = time.monotonic() + 3
            while time.monotonic() < stop:
                left = {**{k: v for k, v in seen.items() if _alive(*k)},
                        **_processes_mentioning(f"{tmp}/")}
                if not left:
                    break
                time.sleep(0.05)
            mounts = [m for m in mount_points() if m.startswith(f"{tmp}/")]
            dirs = [p.name for p in tmp.glob("vfsdrv-demo-*")]
            if rc not in (0, 128 + sig, -sig) or "Traceback" in err or left or mounts or dirs:
                failures.append(f"at {delay} s: rc {rc}, still mounted {mounts}, still running "
                                f"{sorted(left.values())}, directories {dirs}, "
                                f"stderr {err.strip()[-300:]!r}")
        finally:  # leave the machine clean for the next run, pass or fail
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for (pid, _start) in _processes_mentioning(f"{tmp}/"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for m in mount_points():
                if m.startswith(f"{tmp}/"):
                    subprocess.run(["umount", "-l", m], check=False)
            shutil.rmtree(tmp, ignore_errors=True)
    assert failures == [], "\n".join(failures)


def test_status_lines_keep_a_newline_in_a_path_on_one_line() -> None:
    """A mount point or source with a newline (legal) does not split status's lines."""
    from vfsdrv.tools.status import format_mount

    text = format_mount({"mountpoint": "/m\nx", "source": "vhost-user:/s\tk", "pid": 7})
    assert text.splitlines()[0] == "/m\\012x: vhost-user:/s\\011k (pid 7)"


def test_why_a_mount_ended_is_kept_only_while_its_mount_is_there(tmp_path, monkeypatch) -> None:
    """A record of why a server ended stays while a mount is on its mount point (also
    one still served: its server may be on its way out), goes with the mount, and a
    newline in the mount point stays on the unserved line."""
    from vfsdrv.tools import status

    monkeypatch.setenv("VFSDRV_STATE_DIR", str(tmp_path))
    table = [("/m\nx", "fuse.vfsdrv", "vhost-user:/s"), ("/served", "fuse.vfsdrv", "v:/t")]
    monkeypatch.setattr(status, "_mount_table", lambda: table)
    status.record_ending("/m\nx", "vhost-user:/s", "the device went away")
    status.record_ending("/served", "v:/t", "the device is unresponsive")
    status.record_ending("/gone", "v:/u", "the device went away")
    (orphan,) = status.unserved([{"mountpoint": "/served"}])
    assert orphan["why"] == "the device went away"
    assert status._ending_path("/served").exists()  # served still: kept
    assert not status._ending_path("/gone").exists()  # no mount there: dropped
    assert oct((tmp_path / "mounts").stat().st_mode & 0o777) == "0o700"
    status.forget_ending("/m\nx")
    assert "why" not in status.unserved([])[0]


@pytest.mark.parametrize("command", [[*VFSDRV, "--help"], [*VFSDRV, "mount", "--help"],
                                     [*VFSDRV, "status"],
                                     [sys.executable, "-c", "import sys; from vfsdrv.tools."
                                      "mount import mount_helper_main as m; sys.exit(m())",
                                      "--help"]])
def test_output_to_a_reader_that_went_away_ends_quietly(command: list[str]) -> None:
    """`vfsdrv status | head -1` and the like: no traceback, no "error", status 141 as a
    C tool killed by SIGPIPE shows in a shell."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = subprocess.run(command, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "error" not in p.stderr, p.stderr


def test_a_mount_that_fails_in_the_background_says_why_in_its_log(tmp_path) -> None:
    """--log FILE holds a failed bring-up's reason too, not only the terminal."""
    import socket

    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)  # accepts, never answers
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    try:
        r = subprocess.run([*VFSDRV, "mount", "--vhost-user", str(tmp_path / "silent.sock"),
                            "--timeout", "1", "--log", str(log), str(mnt)],
                           capture_output=True, text=True, timeout=60)
    finally:
        silent.close()
    assert r.returncode == 1 and "no reply to GET_FEATURES within 1 s" in r.stderr, r.stderr
    assert "failed: " in log.read_text() and "no reply to GET_FEATURES" in log.read_text()
    assert str(mnt) not in mount_points()


def test_status_tells_a_stopping_server_from_a_lazy_unmount() -> None:
    from vfsdrv.tools.status import format_mount

    lazy = format_mount({"mountpoint": "/m", "source": "s", "pid": 1, "detached": True})
    assert "detached: unmounted lazily, served until its last user is done" in lazy
    stopping = format_mount({"mountpoint": "/m", "source": "s", "pid": 1, "detached": True,
                             "stopping_in": 2.5})
    assert "stopping (asked by a signal): detached, served at most 2.5 s more" in stopping
    assert "last user" not in stopping
