"""Usage errors of the command line: named by the command they belong to (its own
usage line), status 2 like every argparse error, and a path that is not a socket
is said to be one at once instead of waiting out --timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSDRV, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,usage", [
    (("mount", "--bogus", "/mnt"), "usage: vfsdrv mount "),
    (("udev", "install", "--bogus"), "usage: vfsdrv udev install "),
    (("status", "--bogus"), "usage: vfsdrv status "),
])
def test_an_unknown_option_shows_its_command_usage(args: tuple[str, ...], usage: str) -> None:
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(usage) and "unrecognized arguments: --bogus" in r.stderr, r.stderr


def test_bind_without_a_function_is_a_usage_error_like_unbind() -> None:
    for cmd in ("bind", "unbind"):
        r = run(cmd)
        assert r.returncode == 2 and f"usage: vfsdrv {cmd}" in r.stderr, r.stderr


@pytest.mark.parametrize("what", ["file", "directory"])
def test_check_of_a_path_that_is_not_a_socket_fails_at_once(tmp_path: Path, what: str) -> None:
    path = tmp_path / "x"
    if what == "file":
        path.write_text("not a socket")
    else:
        path.mkdir()
    t0 = time.monotonic()
    r = run("check", "--vhost-user", str(path), "--timeout", "20")
    assert r.returncode == 1 and f"{path} is not a socket" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10, "it waited for --timeout"


def test_mount_with_a_device_and_a_tag_is_refused(tmp_path: Path) -> None:
    r = run("mount", "--device", "0000:00:04.0", "--tag", "x", str(tmp_path))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr


def test_udev_add_reports_a_failure_once(tmp_path: Path) -> None:
    conf = tmp_path / "vfsdrv.conf"
    conf.write_text("[tag:x]\nmount = /mnt/x\n")  # an unknown key: the config is refused
    r = subprocess.run([*VFSDRV, "udev", "add", "0000:99:00.0", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "VFSDRV_STATE_DIR": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("unknown key") == 1, r.stderr
    assert "unknown key" in (tmp_path / "udev.log").read_text()


def test_check_without_a_device_is_a_usage_error_and_json_always_answers(tmp_path) -> None:
    import json

    r = run("check")
    assert r.returncode == 2 and "which device?" in r.stderr, r.stderr
    r = run("check", "--json", "--vhost-user", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    doc = json.loads(r.stdout)  # a program reading stdout gets an answer it can parse
    assert doc["ok"] is False and "cannot connect" in doc["error"], doc


@pytest.mark.parametrize("args", [
    ("mount", "--vhost-user", "/nonexistent.sock", ""),
    ("umount", ""),
    ("mount", "--vhost-user", "", "/mnt"),
    ("check", "--vhost-user", ""),
])
def test_an_empty_path_is_a_usage_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    """"" is not the current directory: no mount over it, no unmount of it."""
    r = subprocess.run([*VFSDRV, *args], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 2 and "an empty path" in r.stderr, r.stderr
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


def test_the_helper_refuses_an_empty_mount_point(tmp_path: Path, capsys) -> None:
    from vfsdrv.tools.mount import mount_helper_main

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert mount_helper_main([str(tmp_path / "x.sock"), ""]) == 1  # a bad line
    finally:
        os.chdir(cwd)
    assert "the mount point is an empty path" in capsys.readouterr().err
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


@pytest.mark.parametrize("opt,flag", [("request_queues=4", "--request-queues"),
                                      ("threads=2", "--threads"), ("ring=packed", "--ring"),
                                      ("debug", "--debug")])
def test_an_fstab_spelling_points_to_the_flag(tmp_path: Path, opt: str, flag: str) -> None:
    r = run("mount", "--vhost-user", str(tmp_path / "s.sock"), "-o", f"ro,{opt}", str(tmp_path))
    assert r.returncode == 2 and f"vfsdrv mount takes {flag}" in r.stderr, r.stderr


@pytest.mark.parametrize("tag", ["", "t" * 37, "é" * 19])
@pytest.mark.parametrize("command", [("mount", "--vhost-user", "/nonexistent.sock"),
                                     ("check", "--vhost-user", "/nonexistent.sock"),
                                     ("refdev", "--socket", "/nonexistent.sock", "--source",
                                      "/")])
def test_a_tag_config_space_cannot_hold_is_a_usage_error(tmp_path: Path, tag: str,
                                                         command: tuple[str, ...]) -> None:
    """An empty tag (it used to become "vfsdrv" silently) or one over 36 bytes of UTF-8."""
    args = [*command, "--tag", tag] + ([str(tmp_path)] if command[0] == "mount" else [])
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "must be 1-36 bytes of UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_the_helper_refuses_an_empty_tag(tmp_path: Path, capsys) -> None:
    from vfsdrv.tools.mount import mount_helper_main

    assert mount_helper_main([str(tmp_path / "x.sock"), str(tmp_path), "-o", "tag="]) == 1
    assert "must be 1-36 bytes of UTF-8" in capsys.readouterr().err


def test_an_fstab_only_option_is_named_as_ignored(tmp_path: Path) -> None:
    """-o nofail means something to mount(8) and mount.vfsdrv, nothing to vfsdrv mount:
    said, not silently dropped (the mount still fails: the socket is not there)."""
    r = run("mount", "--vhost-user", str(tmp_path / "none.sock"), "-o", "nofail,ro",
            str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "-o nofail is for fstab and mount(8) (mount.vfsdrv); vfsdrv mount ignores it" \
        in r.stderr
