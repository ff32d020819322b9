"""`vfsdrv mount` / `vfsdrv umount` as a user runs them: daemonizing, every way of
unmounting (vfsdrv umount, umount, fusermount3 -u, SIGTERM, SIGINT, SIGHUP), the mount(8)
helper, and failures, each of which must leave nothing mounted. Every test that
serves a mount runs on each real device (`device_name`: the C and the Rust virtiofsd)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backends import device
from mount_helpers import FRONTENDS, VFSDRV, Mounted, serving, stop_server
from mounting import force_unmount, is_mounted, mount_points, wait_mounted

#: the lifecycle through each frontend; failures found before any frontend runs
#: (device, options, mount point) are tested once
each_frontend = pytest.mark.parametrize("frontend", FRONTENDS)


def mounts_under(path: Path) -> list[str]:
    """Mount points below `path` (other tests may mount elsewhere meanwhile)."""
    return [p for p in mount_points() if p.startswith(f"{path}/")]


def vfsdrv(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSDRV, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def backend(tmp_path: Path, *extra: str,
            device_name: str = "virtiofsd") -> Iterator[tuple[Path, Path, subprocess.Popen]]:
    export, mnt, sock = tmp_path / "export", tmp_path / "mnt", tmp_path / "vfsd.sock"
    export.mkdir()
    mnt.mkdir()
    (export / "hello").write_text("hello\n")
    with device(device_name, export, sock, *extra) as dev:
        try:
            yield mnt, sock, dev.proc
        finally:
            force_unmount(mnt)


def wait_exit(proc: subprocess.Popen, timeout: float = 10) -> int:
    """Both virtiofsds serve one connection: they exit once the driver let go of it."""
    return proc.wait(timeout)


@each_frontend
def test_mount_daemonizes_then_vfsdrv_umount(tmp_path: Path, frontend: str,
                                             device_name: str) -> None:
    with backend(tmp_path, device_name=device_name) as (mnt, sock, proc):
        t0 = time.monotonic()
        r = vfsdrv("mount", "--vhost-user", sock, "--frontend", frontend, mnt)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 15
        assert is_mounted(mnt)  # usable as soon as the command returned
        assert (mnt / "hello").read_text() == "hello\n"
        line = [ln for ln in open("/proc/self/mounts") if f" {mnt} " in ln][0]
        # both frontends record the spec (what an fstab line says)
        assert " fuse.vfsdrv " in line and line.startswith(f"vhost-user:{sock} ")
        r = vfsdrv("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        wait_exit(proc)  # the daemon ended the session and closed the device


def test_background_server_logs_everything_to_its_log_and_leaves_the_cwd(
        tmp_path: Path) -> None:
    """--log FILE takes every message of a background server, the bring-up's too
    (not only what comes after the mount is ready); the server pins no directory."""
    log = tmp_path / "server.log"
    with backend(tmp_path) as (mnt, sock, proc):
        r = subprocess.run([*VFSDRV, "-v", "mount", "--vhost-user", "vfsd.sock", "--log",
                            "server.log", "mnt"], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)  # relative paths: resolved before the chdir
        assert r.returncode == 0, r.stderr
        assert "bringing up" not in r.stderr, r.stderr
        text = log.read_text()
        assert "bringing up" in text and "mounted vhost-user:" in text, text
        pid = next(x["pid"] for x in json.loads(vfsdrv("status", "--json").stdout)["mounts"]
                   if x.get("mountpoint") == str(mnt))
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert (mnt / "hello").read_text() == "hello\n"
        assert vfsdrv("umount", mnt).returncode == 0
        wait_exit(proc)


@each_frontend
@pytest.mark.parametrize("how", ["umount", "fusermount3"])
def test_plain_umount_and_fusermount(tmp_path: Path, frontend: str,
                                     device_name: str, how: str) -> None:
    with backend(tmp_path, device_name=device_name) as (mnt, sock, proc):
        r = vfsdrv("mount", "--vhost-user", sock, "--frontend", frontend, mnt)
        assert r.returncode == 0, r.stderr
        (mnt / "new").write_text("x")
        cmd = ["umount", str(mnt)] if how == "umount" else ["fusermount3", "-u", str(mnt)]
        r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r2.returncode == 0, r2.stderr
        assert not is_mounted(mnt)
        wait_exit(proc)
        assert (tmp_path / "export" / "new").read_text() == "x"


@each_frontend
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(tmp_path: Path, frontend: str, device_name: str, sig: int) -> None:
    with serving(tmp_path, frontend, backend=device_name) as m:
        assert (m.mnt / "anything").exists() is False
        assert m.proc is not None
        m.proc.send_signal(sig)
        assert m.proc.wait(15) == 0, m.log_text()
        assert not is_mounted(m.mnt)


@each_frontend
def test_sigterm_while_busy_detaches_and_exits(tmp_path: Path, frontend: str,
                                               device_name: str) -> None:
    with serving(tmp_path, frontend, backend=device_name) as m:
        f = open(m.mnt / "held", "w")  # keeps the file system busy
        try:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(20) == 0, m.log_text()
            assert not is_mounted(m.mnt)
        finally:
            try:
                f.close()
            except OSError:
                pass  # the connection was aborted under it: expected


@each_frontend
def test_sigterm_while_busy_writes_back_what_programs_wrote(tmp_path: Path,
                                                            frontend: str) -> None:
    """Writeback caching: write() returned, the pages are dirty, the file is still
    open. SIGTERM must write them to the device before the busy mount is detached
    and its connection aborted, or what write() accepted is lost."""
    with serving(tmp_path, frontend, vfsd_args=("-o", "writeback", "-o", "cache=always")) as m:
        data = os.urandom(8 << 20)
        fd = os.open(m.mnt / "dirty", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, data) == len(data)
            if frontend == "relay":  # the relay takes writeback caching when offered
                assert (m.export / "dirty").stat().st_size < len(data), \
                    "no dirty pages: the test would prove nothing"
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(45) == 0, m.log_text()
            assert not is_mounted(m.mnt)
            assert (m.export / "dirty").read_bytes() == data
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the connection was aborted under it: expected


def test_second_signal_stops_a_write_back_that_hangs(tmp_path: Path) -> None:
    """The device stops answering while SIGTERM writes back dirty pages: a second
    signal ends the server at once (the first one alone would wait FLUSH_LIMIT).
    The relay: pyfuse3 has no writeback caching, so no dirty pages to hang on."""
    with serving(tmp_path, "relay", vfsd_args=("-o", "writeback", "-o", "cache=always")) as m:
        fd = os.open(m.mnt / "dirty", os.O_WRONLY | os.O_CREAT, 0o644)
        device_pid = int(subprocess.run(["pgrep", "-f", str(tmp_path / "vfsd.sock")],
                                        capture_output=True, text=True).stdout.split()[0])
        try:
            assert os.write(fd, os.urandom(1 << 20)) == 1 << 20
            os.kill(device_pid, signal.SIGSTOP)
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            assert m.proc.poll() is None, "the write-back did not wait for the device"
            start = time.monotonic()
            m.proc.send_signal(signal.SIGTERM)
            m.proc.wait(20)
            assert time.monotonic() - start < 10, m.log_text()
            assert "asked again to stop" in m.log_text()
            # the abort took the mount away: no error about unmounting what is gone
            assert "ERROR" not in m.log_text(), m.log_text()
        finally:
            os.kill(device_pid, signal.SIGCONT)
            try:
                os.close(fd)
            except OSError:
                pass


@each_frontend
@pytest.mark.parametrize("how", ["umount -l", "SIGTERM", "umount -l, then SIGTERM"])
def test_a_server_never_unmounts_what_was_mounted_after_it(tmp_path: Path, frontend: str,
                                                           how: str) -> None:
    """The mount is detached while a program uses it (umount -l, or SIGTERM on a busy
    mount), then a tmpfs is mounted at the same path: when the server ends (its last
    user gone, or told to stop), the tmpfs and what was written to it stay (the server
    unmounts only its own mount)."""
    with serving(tmp_path, frontend) as m:
        assert m.proc is not None
        holder = subprocess.Popen(["sleep", "60"], cwd=m.mnt)  # keeps the mount busy
        tmpfs = False
        try:
            if how == "SIGTERM":
                m.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while is_mounted(m.mnt) and time.monotonic() < deadline:
                    time.sleep(0.02)  # detached once its dirty pages are written back
            else:
                subprocess.run(["umount", "-l", str(m.mnt)], check=True, timeout=30)
            assert not is_mounted(m.mnt)
            subprocess.run(["mount", "-t", "tmpfs", "later", str(m.mnt)], check=True,
                           timeout=30)
            tmpfs = True
            (m.mnt / "data").write_text("important")
            if how.endswith("then SIGTERM"):
                m.proc.send_signal(signal.SIGTERM)
                m.proc.wait(45)
            holder.kill()
            holder.wait()
            m.proc.wait(20)  # the detached mount's last user is gone: the server ends
            assert is_mounted(m.mnt), "the server unmounted the tmpfs mounted after it"
            assert (m.mnt / "data").read_text() == "important"
        finally:
            holder.kill()
            holder.wait()
            if tmpfs:
                subprocess.run(["umount", "-l", str(m.mnt)], timeout=30)


def _device_pids(tmp_path: Path) -> list[int]:
    """The virtiofsd processes serving tmp_path/vfsd.sock (it forks a worker); not
    the mount server, whose command line names the socket too."""
    out = subprocess.run(["pgrep", "-f", f"socket-path={tmp_path / 'vfsd.sock'}"],
                         capture_output=True, text=True).stdout.split()
    assert out, "no virtiofsd found"
    return [int(x) for x in out]


@each_frontend
def test_stop_with_a_stalled_device_frees_every_program(tmp_path: Path,
                                                        frontend: str) -> None:
    """The device stops answering, a program waits on the mount, the server is told
    twice to stop: it ends within seconds and the program gets an error (it is not
    left in uninterruptible sleep for good)."""
    with serving(tmp_path, frontend) as m:
        assert m.proc is not None
        pids = _device_pids(tmp_path)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            waiter = subprocess.Popen(["stat", str(m.mnt / "no-such-file")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            assert waiter.poll() is None, "the stat did not wait for the stopped device"
            m.proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            start = time.monotonic()
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(20)
            except subprocess.TimeoutExpired:
                raise AssertionError(m.log_text()) from None
            assert waiter.wait(20) != 0
            assert time.monotonic() - start < 15, m.log_text()
            assert "Traceback" not in m.log_text(), m.log_text()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


@each_frontend
def test_a_request_in_flight_when_the_device_dies_is_not_eio(tmp_path: Path,
                                                             frontend: str) -> None:
    """docs/frontends.rst: every request in flight fails with ENOTCONN (or
    ECONNABORTED) when the device dies, never EIO, which reads as a disk error."""
    with serving(tmp_path, frontend) as m:
        pids = _device_pids(tmp_path)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        waiter = subprocess.Popen(
            [sys.executable, "-c", "import os, sys\ntry:\n    os.stat(sys.argv[1])\n"
             "except OSError as e:\n    print(e.errno)", str(m.mnt / "no-such-file")],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, _ = waiter.communicate(timeout=30)
        assert int(out) in (errno.ENOTCONN, errno.ECONNABORTED), out


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_sigterm_on_a_busy_mount_serves_it_a_grace_period(tmp_path: Path,
                                                          frontend: str) -> None:
    """README: a busy mount is detached and served STOP_GRACE (3 s) more before its
    connection is aborted: a program writing to it keeps working meanwhile."""
    with serving(tmp_path, frontend) as m:
        assert m.proc is not None
        writer = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nf = open(sys.argv[1], 'a')\n"
             "while True:\n    f.write('x\\n'); f.flush(); print(time.monotonic(), "
             "flush=True); time.sleep(0.05)", str(m.mnt / "log")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(1)
            signalled = time.monotonic()
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(20) == 0, m.log_text()
            out, _ = writer.communicate(timeout=20)
        finally:
            writer.kill()
        last = max(float(x) for x in out.split())
        assert last - signalled > 2.0, (last - signalled, m.log_text())
        assert "busy" in m.log_text(), m.log_text()


def assert_disconnected(mnt: Path) -> None:
    """A dead server's mount: still mounted, every access ENOTCONN, nothing written
    lands in the directory underneath; `vfsdrv umount` removes it."""
    assert is_mounted(mnt), "the mount went away with its device"
    with pytest.raises(OSError) as err:
        os.listdir(mnt)
    assert err.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as err:
        (mnt / "written-after-death").write_text("lost?")
    assert err.value.errno == errno.ENOTCONN
    r = vfsdrv("mount", "--vhost-user", "/nonexistent.sock", mnt, timeout=15)
    # the kernel may answer the stat of the root from its cache (busy) or not (ENOTCONN)
    assert r.returncode == 1 and f"`vfsdrv umount {mnt}`" in r.stderr, r.stderr
    r = vfsdrv("umount", mnt, timeout=15)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == [], "a write reached the directory underneath"


@each_frontend
def test_device_gone_leaves_a_disconnected_mount(tmp_path: Path, frontend: str,
                                                 device_name: str) -> None:
    export, sock = tmp_path / "export", tmp_path / "vfsd.sock"
    export.mkdir()
    (tmp_path / "mnt").mkdir()
    with device(device_name, export, sock) as dev:
        vproc = dev.proc
        cmd = [*VFSDRV, "mount", "-f", "--vhost-user", str(sock), "--frontend", frontend,
               str(tmp_path / "mnt")]
        log = tmp_path / "serve.log"
        with open(log, "wb") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        m = Mounted(frontend, export, tmp_path / "mnt", proc, log)
        try:
            wait_mounted(m.mnt, proc, log)
            os.killpg(vproc.pid, signal.SIGKILL)  # the backend dies
            vproc.wait()
            try:
                os.listdir(m.mnt)  # noticed at the latest with this request
            except OSError:
                pass
            assert proc.wait(15) != 0
            assert "gone" in m.log_text() or "closed" in m.log_text()
            # both frontends say what is left and how to remove it
            assert f"stays mounted and answers ENOTCONN until it is unmounted (vfsdrv umount " \
                f"{m.mnt})" in m.log_text(), m.log_text()
            assert_disconnected(m.mnt)
        finally:
            stop_server(m)


# -- failures leave nothing mounted ------------------------------------------------------
@each_frontend
def test_busy_mount_point(tmp_path: Path, frontend: str, device_name: str) -> None:
    with serving(tmp_path, frontend, backend=device_name) as m:
        other = tmp_path / "other.sock"
        with device(device_name, tmp_path / "export", other):
            r = vfsdrv("mount", "--vhost-user", other, "--frontend", frontend, m.mnt)
        assert r.returncode == 1
        assert "busy" in r.stderr and "already mounted" in r.stderr
        assert mounts_under(tmp_path) == [str(m.mnt)]
        assert os.listdir(m.mnt) is not None  # the first mount still serves


def test_missing_socket(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = vfsdrv("mount", "--vhost-user", tmp_path / "nope.sock", tmp_path / "mnt")
    assert r.returncode == 1
    assert "nope.sock does not exist" in r.stderr
    assert mounts_under(tmp_path) == []


def test_socket_nobody_listens(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "dead.sock"))
    s.close()  # the file stays, nobody listens
    r = vfsdrv("mount", "--vhost-user", tmp_path / "dead.sock", tmp_path / "mnt")
    assert r.returncode == 1
    assert "error" in r.stderr
    assert mounts_under(tmp_path) == []


@pytest.mark.parametrize("problem", ["missing", "file", "option"])
def test_bad_mount_point_or_option(tmp_path: Path, problem: str) -> None:
    with backend(tmp_path) as (mnt, sock, _proc):
        target, opts = mnt, []
        if problem == "missing":
            target = tmp_path / "does-not-exist"
        elif problem == "file":
            target = tmp_path / "export" / "hello"
        else:
            opts = ["-o", "ro,frobnicate"]
        r = vfsdrv("mount", "--vhost-user", sock, *opts, target)
        assert r.returncode == (2 if problem == "option" else 1)  # 2: a bad command line
        expect = {"missing": "does not exist", "file": "not a directory",
                  "option": "unknown mount option(s): frobnicate"}[problem]
        assert expect in r.stderr
        assert mounts_under(tmp_path) == []


def test_not_root(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(
        [*VFSDRV, "mount", "--vhost-user", "/nonexistent.sock", str(tmp_path / "mnt")],
        capture_output=True, text=True, timeout=30, user=65534,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert r.returncode == 1
    assert "needs root" in r.stderr


@each_frontend
def test_mount_helper_for_mount8_read_only(tmp_path: Path, frontend: str, device_name: str) -> None:
    with backend(tmp_path, device_name=device_name) as (mnt, sock, proc):
        r = subprocess.run(
            [sys.executable, "-m", "vfsdrv.tools.mount", str(sock), str(mnt), "-o",
             f"ro,tag=helper-tag,frontend={frontend}"],
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 0, r.stderr
        line = [ln for ln in open("/proc/self/mounts") if f" {mnt} " in ln][0]
        # the spec as given, by both frontends
        assert line.startswith(f"{sock} ") and " ro," in line
        assert (mnt / "hello").read_text() == "hello\n"
        with pytest.raises(OSError) as exc:
            (mnt / "w").write_text("x")
        assert exc.value.errno == errno.EROFS
        assert vfsdrv("umount", mnt).returncode == 0
        wait_exit(proc)


@pytest.mark.parametrize("how", ["device", "tag"])
def test_no_such_pci_function(tmp_path: Path, how: str) -> None:
    (tmp_path / "mnt").mkdir()
    arg = ["--device", "0000:00:1f.7"] if how == "device" else ["--tag", "no-such-tag"]
    r = vfsdrv("mount", *arg, tmp_path / "mnt")
    assert r.returncode == 1
    expect = "no PCI function 0000:00:1f.7" if how == "device" else \
        "no virtio-fs PCI function has tag 'no-such-tag'"
    assert expect in r.stderr
    assert mounts_under(tmp_path) == []


def test_more_request_queues_than_the_backend_has(tmp_path: Path) -> None:
    with backend(tmp_path) as (mnt, sock, _proc):
        r = vfsdrv("mount", "--vhost-user", sock, "--request-queues", "4", mnt)
        assert r.returncode == 1
        assert "--request-queues 4 is too many, at most 1" in r.stderr
        assert mounts_under(tmp_path) == []


@each_frontend
def test_background_server_logs_when_the_device_dies(tmp_path: Path, frontend: str,
                                                     device_name: str) -> None:
    log = tmp_path / "server.log"
    with backend(tmp_path, device_name=device_name) as (mnt, sock, proc):
        r = vfsdrv("mount", "--vhost-user", sock, "--frontend", frontend, "--log", log, mnt)
        assert r.returncode == 0, r.stderr
        assert (mnt / "hello").read_text() == "hello\n"
        os.killpg(proc.pid, signal.SIGKILL)  # the backend dies under the mount
        proc.wait()
        deadline = time.monotonic() + 15
        text = ""
        while "at exit" not in text and time.monotonic() < deadline:
            try:
                os.listdir(mnt)  # noticed at the latest with this request
            except OSError:
                pass
            time.sleep(0.1)
            text = log.read_text()
        assert "gone" in text or "closed" in text, text
        assert_disconnected(mnt)


def test_mount_t_vfsdrv_through_mount8(tmp_path: Path) -> None:
    """`mount -t vfsdrv SOCKET DIR` finds /sbin/mount.vfsdrv. The helper is put there
    only inside a private mount namespace (a directory bound over /usr/sbin), so the
    host's /sbin is never touched; the whole exchange runs in that namespace."""
    helper = Path(sys.executable).with_name("mount.vfsdrv")
    assert helper.exists(), "pip install -e . creates the mount.vfsdrv console script"
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "mount.vfsdrv").symlink_to(helper)
    with backend(tmp_path) as (mnt, sock, proc):
        script = f"""
            set -e
            mount --make-rprivate /
            mount --bind {sbin} /usr/sbin
            mount -t vfsdrv {sock} {mnt} -o tag=via-mount8
            grep " {mnt} " /proc/self/mounts
            cat {mnt}/hello
            umount {mnt}
            ! grep -q " {mnt} " /proc/self/mounts
        """
        r = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith(f"{sock} {mnt} fuse.vfsdrv ")  # the spec as given
        assert r.stdout.rstrip().endswith("hello")
        assert wait_exit(proc) == 0  # the serving process ended the session and let go


@pytest.mark.parametrize("foreground", [True, False], ids=["-f", "background"])
def test_a_signal_during_fuse_init_ends_the_wait_at_once(tmp_path: Path, monkeypatch,
                                                         foreground: bool) -> None:
    """The device takes its time over FUSE_INIT (here: forever; --timeout 60): a
    SIGTERM to the mount command ends it within seconds, leaving nothing mounted,
    instead of after the INIT deadline."""
    import threading

    from vfsdrv.refdev.device import RefDevice
    from vfsdrv.refdev.fuse_server import FuseServer

    release = threading.Event()

    def init(self, hdr, body):
        release.wait(120)
        raise OSError(errno.EIO, "released")

    monkeypatch.setattr(FuseServer, "init", init)
    export, mnt = tmp_path / "export", tmp_path / "mnt"
    export.mkdir()
    mnt.mkdir()
    dev = RefDevice(str(tmp_path / "d.sock"), str(export))
    dev.start()
    proc = None
    try:
        proc = subprocess.Popen([*VFSDRV, "mount", *(["-f"] if foreground else []),
                                 "--timeout", "60", "--vhost-user", str(tmp_path / "d.sock"),
                                 str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 20
        while not dev.sessions or str(mnt) not in mount_points():
            assert time.monotonic() < deadline and proc.poll() is None, "never got to INIT"
            time.sleep(0.05)
        time.sleep(0.5)  # FUSE_INIT is with the device now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert took < 8, (took, err)
        assert proc.returncode != 0, err
        assert "Traceback" not in err, err
        assert str(mnt) not in mount_points()
    finally:
        release.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)
        dev.stop()
