"""`python -m vfsdrv.refdev`: arguments, serving a frontend, clean stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev.cli import build_parser
from vfsdrv.virtio.vhost_user import VhostUserTransport


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="refdev-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_parser_defaults_and_options() -> None:
    args = build_parser().parse_args(["--socket", "s", "--source", "d"])
    assert (args.tag, args.request_queues, args.notify_buf_size) == ("refdev", 1, 64)
    assert (args.max_waiting_locks, args.notify_lock_code, args.no_notification) == (64, 7, False)
    args = build_parser().parse_args(
        ["--socket", "s", "--source", "d", "--tag", "x", "--request-queues", "3",
         "--notify-buf-size", "128", "--max-waiting-locks", "2", "--no-notification", "-d"]
    )
    assert (args.tag, args.request_queues, args.notify_buf_size) == ("x", 3, 128)
    assert args.max_waiting_locks == 2 and args.no_notification and args.debug


def test_bad_source_is_a_usage_error(sock_dir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vfsdrv.refdev", "--socket", f"{sock_dir}/s", "--source",
         f"{sock_dir}/missing"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "not a directory" in proc.stderr


@dataclass
class Served:
    fs: VirtioFs
    returncode: int | None = None
    out: str = ""
    err: str = ""


@contextmanager
def session_with_refdev(sock_dir: str, source: Path, *args: str) -> Iterator[Served]:
    """`python -m vfsdrv.refdev ARGS` serving `source` and one FUSE session with it
    (FUSE_INIT done); at the end of the block the session closes and the device gets
    SIGTERM: its status and output are then in the Served (killed if it hangs)."""
    sock = os.path.join(sock_dir, "dev.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfsdrv.refdev", "--socket", sock, "--source", str(source),
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        served = Served(VirtioFs(VhostUserTransport(sock)).start())
        try:
            served.fs.init()
            yield served
        finally:
            served.fs.close()
        proc.send_signal(signal.SIGTERM)
        served.out, served.err = proc.communicate(timeout=10)
        served.returncode = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_module_serves_until_sigterm(sock_dir: str, tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("hi")
    with session_with_refdev(sock_dir, tmp_path, "--tag", "clitag", "--request-queues",
                             "2") as served:
        fs = served.fs
        assert fs.config.tag == "clitag" and fs.config.num_request_queues == 2
        assert FuseClient(fs).lookup(ROOT_ID, "hello").attr.size == 2
    assert served.returncode == 0, served.err
    assert not os.path.exists(os.path.join(sock_dir, "dev.sock"))  # removed on the way out


def test_audit_with_packed_rings_only_is_refused(sock_dir: str) -> None:
    """Auditing mode offers split rings only; --ring packed refuses drivers without
    packed rings: together no driver could use the device."""
    proc = subprocess.run(
        [sys.executable, "-m", "vfsdrv.refdev", "--socket", f"{sock_dir}/s", "--source",
         sock_dir, "--audit", "--ring", "packed"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "offers split rings only" in proc.stderr, proc.stderr
    assert not os.path.exists(f"{sock_dir}/s")


def test_an_audit_probe_alone_prints_the_report(sock_dir: str, tmp_path: Path) -> None:
    """--audit-probe implies --audit: the report comes on exit, with its status."""
    with session_with_refdev(sock_dir, tmp_path, "--audit-probe", "unknown-feature") as \
            served:
        pass
    assert served.returncode == 0, served.err  # the driver left the unknown bit alone
    assert "covered" in served.out and "held" in served.out, served.out
