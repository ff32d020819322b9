"""What only the relay does: its -d request log, its answer to the kernel's
FUSE_INIT (filtered both ways), and lock requests (GETLK, SETLK, SETLKW, flock) and
INTERRUPT forwarded to the device. Locks need a device that grants them: virtiofsd
with -o posix_lock -o flock (and a thread pool, so a blocked flock does not stop
the queue)."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mount_helpers import FRONTENDS, Mounted, in_threads, require, serving
from vfsdrv.frontends.relay import (
    NEVER_OFFERED,
    RELAY_FLAGS,
    init_reply_fields,
    readahead_size,
)
from vfsdrv.fs.abi import InitFlag

MiB = 1 << 20
LOCKING_VIRTIOFSD = ("-o", "posix_lock", "-o", "flock", "--thread-pool-size=4")
INIT_LINE = re.compile(
    r"unique \d+ INIT -> 7\.(\d+) flags (0x[0-9a-f]+) \(kernel offered (0x[0-9a-f]+), "
    r"device (0x[0-9a-f]+)\)"
)


def wait_for_log(m: Mounted, pattern: str, timeout: float = 5) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, m.log_text())
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the request log:\n{m.log_text()[-3000:]}")
        time.sleep(0.05)


def test_debug_logs_every_request(tmp_path: Path, device_name: str) -> None:
    with serving(tmp_path, "relay", debug=True, backend=device_name) as m:
        (m.mnt / "f").write_text("data")
        with pytest.raises(FileNotFoundError):
            (m.mnt / "missing").stat()
        assert (m.mnt / "f").read_text() == "data"
        wait_for_log(m, r"unique \d+ LOOKUP nodeid 1 -> -2 \(ENOENT\)")
        wait_for_log(m, r"unique \d+ CREATE nodeid 1 -> ok, \d+ bytes")
        wait_for_log(m, r"unique \d+ WRITE nodeid \d+ -> ok, 8 bytes")
        wait_for_log(m, r"unique \d+ READ nodeid \d+ -> ok, 4 bytes")
        wait_for_log(m, r"unique \d+ (RELEASE|FLUSH) nodeid \d+ -> ok")
    # unmounted by SIGTERM: the session with the device ended with FUSE_DESTROY
    assert re.search(r"unique \d+ DESTROY \(the relay's own\) -> ok", m.log_text())


def test_init_is_filtered_both_ways(tmp_path: Path, device_name: str) -> None:
    with serving(tmp_path, "relay", debug=True, backend=device_name) as m:
        minor, flags, kernel, device = wait_for_log(m, INIT_LINE.pattern).groups()
    flags, kernel, device = int(flags, 16), int(kernel, 16), int(device, 16)
    # virtiofsd 7.2 speaks 7.36, the Rust one 7.38; the kernel more, the relay 7.38
    assert int(minor) == {"virtiofsd": 36, "virtiofsd-rs": 38}[device_name]
    assert flags & InitFlag.INIT_EXT
    granted = flags & ~InitFlag.INIT_EXT
    assert granted & ~(kernel & device) == 0, "granted the kernel what one side lacks"
    assert granted & ~RELAY_FLAGS == 0
    assert flags & NEVER_OFFERED == 0
    assert kernel & InitFlag.SPLICE_READ  # offered by the kernel, dropped by the relay
    # without -o posix_lock/flock (the C one) or at all (the Rust one) the device grants
    # no locks: the kernel locks locally
    assert not granted & (InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS)
    assert granted & InitFlag.MAX_PAGES and granted & InitFlag.DO_READDIRPLUS


def test_init_reply_clamps_sizes() -> None:
    dev = SimpleNamespace(max_readahead=1 << 20, max_background=0xFFFF,
                          congestion_threshold=0xBFFD, time_gran=1, max_pages=1024)
    f = init_reply_fields(minor=36, device=dev, kernel_max_readahead=128 << 10,
                          granted=InitFlag.MAX_PAGES, max_io=1 << 20,
                          device_max_write=4 << 20)
    assert f["max_pages"] == 256 and f["max_write"] == 1 << 20
    assert f["max_readahead"] == 128 << 10
    f = init_reply_fields(minor=36, device=dev, kernel_max_readahead=1 << 20, granted=0,
                          max_io=1 << 20, device_max_write=1 << 20)
    assert f["max_pages"] == 0  # without MAX_PAGES the kernel keeps its default (32 pages)


# -- locks and interrupts ------------------------------------------------------------------
HOLDER = r"""
import fcntl, os, struct, sys, time
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind.startswith("posix"):
    length = 0 if kind == "posix-whole" else 100
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, length, 0))
else:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(params=FRONTENDS)
def locking_mount(request, tmp_path: Path):
    require(request.param, "locks")
    with serving(tmp_path, request.param, vfsd_args=LOCKING_VIRTIOFSD,
                 debug=request.param == "relay") as m:
        (m.export / "lk").write_text("0123456789" * 100)
        yield m


def hold(path: Path, kind: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def release(p: subprocess.Popen) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(10)


def test_posix_locks_reach_the_device(locking_mount: Mounted) -> None:
    m = locking_mount
    holder = hold(m.mnt / "lk", "posix")
    try:
        fd = os.open(m.mnt / "lk", os.O_RDWR)
        try:
            got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 50, 10, 0))
            assert struct.unpack("hhqqi", got)[0] == fcntl.F_WRLCK  # the holder's lock
            with pytest.raises(BlockingIOError):
                fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0))
            # a range nobody holds
            fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 200, 10, 0))
            try:
                # a blocking lock: virtiofsd 7.2 answers it (it does not wait), the
                # relay forwards its answer
                fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0))
                pytest.fail("SETLKW on a held range succeeded")
            except OSError as exc:
                assert exc.errno in (95, 38, 11), exc  # EOPNOTSUPP, ENOSYS, EAGAIN
        finally:
            os.close(fd)
    finally:
        release(holder)
    if m.frontend == "relay":
        for op in ("GETLK", "SETLK", "SETLKW"):
            wait_for_log(m, rf"unique \d+ {op} nodeid \d+ ->")


def test_flock_reaches_the_device(locking_mount: Mounted) -> None:
    m = locking_mount
    holder = hold(m.mnt / "lk", "flock")
    try:
        fd = os.open(m.mnt / "lk", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: SETLKW with FUSE_LK_FLOCK
                pytest.fail("a blocking flock on a held file succeeded")
            except OSError as exc:
                assert exc.errno in (95, 38), exc  # virtiofsd 7.2 does not wait
        finally:
            os.close(fd)
    finally:
        release(holder)
    fd = os.open(m.mnt / "lk", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the holder is gone
    finally:
        os.close(fd)
    if m.frontend == "relay":
        wait_for_log(m, r"unique \d+ SETLK nodeid \d+ -> -11 \(EAGAIN\)")
        wait_for_log(m, r"unique \d+ SETLKW nodeid \d+ -> -95")


INTERRUPTED_WRITER = r"""
import os, signal, sys
signal.signal(signal.SIGALRM, lambda *a: None)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
block = bytes(range(256)) * 4096
for i in range(int(sys.argv[2])):
    assert os.pwrite(fd, block, i * len(block)) == len(block)
signal.setitimer(signal.ITIMER_REAL, 0)
os.close(fd)
"""


def test_interrupts_of_ordinary_requests_are_ignored(tmp_path: Path, device_name: str) -> None:
    """Signals delivered while requests are with the device make the kernel send
    FUSE_INTERRUPT (unique = the request's | 1). For anything but a pending SETLKW
    the relay ignores it, as FUSE allows (virtiofsd 7.2 dies on an INTERRUPT of a
    request it already finished); the interrupted requests complete correctly."""
    with serving(tmp_path, "relay", debug=True, backend=device_name) as m:
        for _attempt in range(5):
            r = subprocess.run([sys.executable, "-c", INTERRUPTED_WRITER, str(m.mnt / "w"), "64"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            if "INTERRUPT" in m.log_text():
                break
        log = m.log_text()
        assert (m.export / "w").read_bytes() == bytes(range(256)) * 4096 * 64
        os.listdir(m.mnt)  # the device is still there
    ignored = re.findall(r"unique (\d+) INTERRUPT of (\d+) ignored", log)
    assert ignored, "no FUSE_INTERRUPT seen in 5 runs of 64 interrupted 1 MiB writes"
    requests = {int(u) for u in re.findall(r"unique (\d+) [A-Z]+ nodeid \d+ ->", log)}
    assert all(int(i) == int(t) | 1 and int(t) in requests for i, t in ignored)
    assert "device gone" not in log


LOCK_WAITER = r"""
import fcntl, os, signal, struct, sys, time
class Alarm(Exception):
    pass
def on_alarm(*_):
    raise Alarm  # stops Python from retrying the interrupted fcntl (PEP 475)
fd = os.open(sys.argv[1], os.O_RDWR)
print("asking", flush=True)
t0 = time.monotonic()
try:
    if sys.argv[2] == "interrupt":
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
    fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    print("granted %.2f" % (time.monotonic() - t0), flush=True)
except Alarm:
    print("interrupted %.2f" % (time.monotonic() - t0), flush=True)
"""


def test_blocking_lock_and_its_interrupt_reach_the_device(tmp_path: Path) -> None:
    """On the reference device (notification queue, blocking locks): a SETLKW waits
    on the device and is granted when the holder lets go; a signal to a waiter
    makes the kernel send FUSE_INTERRUPT, which the relay forwards (the SETLKW is
    pending) and the device answers by ending the wait with EINTR."""
    with serving(tmp_path, "relay", debug=True, backend="refdev") as m:
        (m.export / "lk").write_text("locked file")
        holder = hold(m.mnt / "lk", "posix-whole")
        try:
            waiter = subprocess.Popen([sys.executable, "-c", LOCK_WAITER, str(m.mnt / "lk"),
                                       "wait"], stdout=subprocess.PIPE, text=True)
            assert waiter.stdout is not None and waiter.stdout.readline() == "asking\n"
            time.sleep(0.7)
            assert waiter.poll() is None, "SETLKW did not wait for the holder"
        finally:
            release(holder)
        out, _ = waiter.communicate(timeout=10)
        assert out.startswith("granted") and float(out.split()[1]) >= 0.5, out
        holder = hold(m.mnt / "lk", "posix-whole")
        try:
            r = subprocess.run([sys.executable, "-c", LOCK_WAITER, str(m.mnt / "lk"),
                                "interrupt"], capture_output=True, text=True, timeout=10)
            assert r.stdout.startswith("asking\ninterrupted"), (r.stdout, r.stderr)
            interrupted = wait_for_log(m, r"unique (\d+) SETLKW nodeid \d+ -> -4 \(EINTR\)")
            unique = int(interrupted.group(1))
            wait_for_log(m, rf"unique {unique | 1} INTERRUPT nodeid 0 \(no reply\)")
        finally:
            release(holder)
        granted = re.findall(r"unique \d+ SETLKW nodeid \d+ -> ok", m.log_text())
        assert len(granted) == 1


def test_device_notifications_go_to_the_kernel_with_unique_0() -> None:
    """_on_notify writes the device's message with unique 0 and error = code (from
    its writer thread); the lock notification code (7) stays with the device."""
    from vfsdrv.frontends.relay import Relay

    r, w = os.pipe()
    relay = Relay(SimpleNamespace(), "/nonexistent", options=[])  # type: ignore[arg-type]
    relay.fuse_fd = w
    try:
        body = struct.pack("<QqQ", 42, 0, 4096)  # fuse_notify_inval_inode_out
        msg = struct.pack("<IiQ", 16 + len(body), 2, 999) + body
        relay._on_notify(7, memoryview(struct.pack("<IiQ", 16, 7, 0)))
        relay._on_notify(2, memoryview(msg))
        got = os.read(r, 4096)
        assert got == struct.pack("<IiQ", 16 + len(body), 2, 0) + body
        relay._notify_q.put(None)
        relay._notify_thread.join(5)  # type: ignore[union-attr]
        assert relay.stats["notifications"] == 1
    finally:
        os.close(r)
        os.close(w)


def test_mounted_like_kernel_virtiofs_allow_other_default_permissions() -> None:
    """Every user may enter the mount (allow_other) and the kernel checks
    permissions from the attributes (default_permissions), as on a kernel
    virtio-fs mount."""
    base = Path(tempfile.mkdtemp(prefix="vfsdrv-perm-"))  # pytest's tmp is root-only
    base.chmod(0o755)
    try:
        _check_other_user(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_other_user(base: Path) -> None:
    with serving(base, "relay") as m:
        (m.export / "public").write_text("for everyone\n")
        (m.export / "public").chmod(0o644)
        (m.export / "private").write_text("root only\n")
        (m.export / "private").chmod(0o600)
        os.chmod(m.export, 0o755)
        ok = subprocess.run(["cat", str(m.mnt / "public")], capture_output=True, text=True,
                            user=65534, timeout=10)
        assert ok.returncode == 0 and ok.stdout == "for everyone\n", ok.stderr
        denied = subprocess.run(["cat", str(m.mnt / "private")], capture_output=True,
                                text=True, user=65534, timeout=10)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_back_pressure_with_few_slots(tmp_path: Path, device_name: str) -> None:
    """With 2 small and 2 large DMA slots, 16 threads of big O_DIRECT reads, big
    writes and metadata calls keep more requests coming than slots exist: the relay
    stops reading /dev/fuse while no large slot is free, and every result is right."""
    with serving(tmp_path, "relay", mount_args=("--small-slots", "2", "--large-slots", "2"),
                 debug=True, backend=device_name) as m:
        blob = os.urandom(8 * MiB)
        (m.export / "src").write_bytes(blob)
        def worker(k: int) -> None:
            fd = os.open(m.mnt / "src", os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, MiB)
            try:
                for i in range(8):
                    off = ((k + i) % 8) * MiB
                    assert os.preadv(fd, [buf], off) == MiB
                    assert buf[:] == blob[off:off + MiB]
            finally:
                os.close(fd)
                buf.close()
            data = blob[k * 256 * 1024:(k + 1) * 256 * 1024] * 2
            (m.mnt / f"out{k}").write_bytes(data)
            for j in range(20):
                (m.mnt / f"meta{k}-{j}").touch()
                os.stat(m.mnt / f"meta{k}-{j}")

        in_threads(worker, 16, 120)
        for k in range(16):
            expect = blob[k * 256 * 1024:(k + 1) * 256 * 1024] * 2
            assert (m.export / f"out{k}").read_bytes() == expect
        assert len(os.listdir(m.mnt)) == 1 + 16 + 16 * 20
    stalls = re.search(r"stopped reading /dev/fuse (\d+) times", m.log_text())
    assert stalls and int(stalls.group(1)) > 0, m.log_text()[-2000:]


def test_init_reply_sizes_the_background_queue_to_the_slots() -> None:
    """max_background is what the pumps can have on their rings; congestion at 3/4;
    either, and max_readahead, can be chosen with -o (kept within FUSE's limits)."""
    dev = SimpleNamespace(max_readahead=1 << 20, max_background=0, congestion_threshold=0,
                          time_gran=1, max_pages=256)
    f = init_reply_fields(minor=36, device=dev, kernel_max_readahead=128 << 10, granted=0,
                          max_io=1 << 20, device_max_write=1 << 20, slots=72)
    assert (f["max_background"], f["congestion_threshold"]) == (72, 54)
    f = init_reply_fields(minor=36, device=dev, kernel_max_readahead=1 << 20, granted=0,
                          max_io=1 << 20, device_max_write=1 << 20, slots=72,
                          chosen={"max_background": 1 << 20, "congestion_threshold": 5,
                                  "max_readahead": 64 << 10})
    assert (f["max_background"], f["congestion_threshold"]) == (0xFFFF, 5)
    assert f["max_readahead"] == 64 << 10


def test_readahead_is_sized_to_whole_requests() -> None:
    """Default: the largest READ (max_pages pages); -o max_readahead wins; the device's
    own limit caps both."""
    assert readahead_size(device_max_readahead=0xFFFFFFFF, max_pages=256,
                          max_io=1 << 20) == 1 << 20
    assert readahead_size(device_max_readahead=0, max_pages=0, max_io=512 << 10) == 512 << 10
    assert readahead_size(device_max_readahead=0xFFFFFFFF, max_pages=256, max_io=1 << 20,
                          chosen={"max_readahead": 64 << 10}) == 64 << 10
    assert readahead_size(device_max_readahead=256 << 10, max_pages=256, max_io=1 << 20,
                          chosen={"max_readahead": 4 << 20}) == 256 << 10


@pytest.mark.parametrize("opt,limits", [
    ("max_readahead=4294967296", "0 to 4294967295"), ("max_readahead=abc", "0 to 4294967295"),
    ("max_background=\u00b2", "1 to 65535"), ("max_read=-1", "4096 to 4294967295"),
    ("max_read=0", "4096 to 4294967295"), ("max_read=4095", "4096 to 4294967295"),
    ("blksize=", "0 to 4294967295"), ("congestion_threshold=1e3", "1 to 65535"),
    # FUSE_INIT's 16-bit fields, where 0 would leave the kernel's default
    ("max_background=65536", "1 to 65535"), ("max_background=0", "1 to 65535"),
    ("congestion_threshold=99999", "1 to 65535")])
def test_numeric_session_and_fuse_options_are_checked(opt: str, limits: str) -> None:
    """A value FUSE's field cannot hold, or that is not ASCII digits, is a clear
    error before anything is mounted (it used to reach FUSE_INIT)."""
    from vfsdrv.frontends.fuse_dev import MountError, MountOptions

    mo = MountOptions.parse([opt])
    with pytest.raises(MountError, match=f"whole number from {limits}"):
        mo.check()
    assert MountOptions.parse(["max_readahead=4294967295"]).session == {
        "max_readahead": 4294967295}


def test_the_mount_reads_ahead_whole_requests(tmp_path: Path) -> None:
    """The kernel's readahead (its bdi's read_ahead_kb, which FUSE_INIT can only lower
    from 128 KiB) is raised to the largest READ, 1 MiB over virtiofsd; -o
    max_readahead=N sets it; a sequential read then goes out in 1 MiB READs."""
    for opts, expect_kib in (((), 1024), (("-o", "max_readahead=65536"), 64),
                             (("-o", "max_readahead=4194304"), 4096)):
        base = tmp_path / str(expect_kib)
        base.mkdir()
        with serving(base, "relay", mount_args=opts, debug=not opts) as m:
            st = os.stat(m.mnt)
            knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                        "/read_ahead_kb")
            assert int(knob.read_text()) == expect_kib
            if not opts:
                (m.export / "seq").write_bytes(os.urandom(8 << 20))
                with open(m.mnt / "seq", "rb") as f:
                    while f.read(1 << 20):
                        pass
                reads = re.findall(r"READ nodeid \d+ -> ok, (\d+) bytes", m.log_text())
                sizes = [int(x) for x in reads]
                assert sizes and max(sizes) == 1 << 20, sizes[:20]


def test_session_options_reach_the_kernel(tmp_path: Path) -> None:
    """-o max_background=N, congestion_threshold=N: the kernel's connection shows them
    (fusectl), and a mount without them shows the slot-sized defaults."""
    ctl = Path("/sys/fs/fuse/connections")
    if not os.path.ismount(ctl):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(ctl)], check=False)
    assert os.path.ismount(ctl), "fusectl could not be mounted at /sys/fs/fuse/connections"
    for opts, expect in ((("-o", "max_background=10,congestion_threshold=7"), (10, 7)),
                         ((), None)):
        (tmp_path / str(len(opts))).mkdir()
        with serving(tmp_path / str(len(opts)), "relay", mount_args=opts) as m:
            conn = ctl / str(os.stat(m.mnt).st_dev)  # anonymous device: major 0
            got = (int((conn / "max_background").read_text()),
                   int((conn / "congestion_threshold").read_text()))
        if expect is not None:
            assert got == expect
        else:
            assert got[0] > 12 and got[1] == got[0] * 3 // 4  # sized to the slots


@pytest.mark.parametrize("backend,local", [("virtiofsd", True), ("refdev", False)])
def test_the_log_says_when_locks_stay_local(tmp_path: Path, backend: str, local: bool) -> None:
    """virtiofsd's default grants neither FUSE_POSIX_LOCKS nor FUSE_FLOCK_LOCKS: the
    kernel then keeps locks to the mount, unseen by other mounts of the device, and
    the server's log says so (-v: an ordinary mount warns about nothing); the
    reference device takes both, and nothing is said."""
    with serving(tmp_path, "relay", backend=backend, mount_args=("-v",)) as m:
        (m.mnt / "f").write_text("x")
        text = m.log_text()
    said = "the device does not take fcntl and flock locks" in text
    assert said == local, text[-3000:]
