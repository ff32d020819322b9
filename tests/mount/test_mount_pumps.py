"""The relay's native pumps (issue 9): one per request queue, in parallel on a device
with several request queues, capped by --threads; and write payloads page-aligned in
DMA memory, so a device that honours O_DIRECT takes O_DIRECT writes."""

from __future__ import annotations

import json
import mmap
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mount_helpers import VFSDRV, Mounted, in_threads, serving, stop_server
from mounting import kernel_allows_io_uring, wait_mounted
from vfsdrv.tools.nulldev import NullDevice


def status_of(mnt: Path) -> dict:
    """The server's own figures (a foreground server's status socket opens a moment
    after its mount appears: asked again until it answers)."""
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run([*VFSDRV, "status", "--json"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        mine = [m for m in json.loads(out)["mounts"]
                if os.path.realpath(m.get("mountpoint", "")) == os.path.realpath(mnt)]
        if mine or time.monotonic() > deadline:
            (one,) = mine
            return one
        time.sleep(0.05)


def busy(mnt: Path, workers: int = 8, files: int = 40) -> None:
    """Metadata and small I/O from several threads at once."""
    def work(k: int) -> None:
        for i in range(files):
            p = mnt / f"w{k}-{i}"
            p.write_bytes(os.urandom(512))
            assert len(p.read_bytes()) == 512
            os.stat(p)

    in_threads(work, workers, 120)


@pytest.mark.parametrize("threads,pumps", [(None, 3), (2, 2), (1, 1)])
def test_one_pump_per_request_queue(tmp_path: Path, threads: int | None, pumps: int) -> None:
    """The reference device with 3 request queues: one pump each, every one serving,
    unless --threads caps them."""
    args = ("--threads", str(threads)) if threads else ()
    with serving(tmp_path, "relay", backend="refdev", vfsd_args=("--request-queues", "3"),
                 mount_args=args) as m:
        busy(m.mnt)
        st = status_of(m.mnt)
        served = [q["served"] for q in st["queues"] if q["name"].startswith("request")]
    assert st["pumps"] == pumps and len(served) == pumps
    assert all(n > 0 for n in served), served  # the kernel's requests spread over all


def test_a_direct_append_keeps_its_order_over_several_queues(tmp_path: Path) -> None:
    """One 4 MiB O_DIRECT|O_APPEND write goes out as 1 MiB WRITEs at once, with the
    offsets the kernel worked out; the pumps of 3 request queues hand them to the
    device in any order, and each must land at its own offset."""
    import mmap

    with serving(tmp_path, "relay", backend="refdev", vfsd_args=("--request-queues", "3"),
                 mount_args=()) as m:
        mib = 1 << 20
        buf = mmap.mmap(-1, 4 * mib)  # page-aligned, as O_DIRECT wants
        for i in range(4):
            buf[i * mib:(i + 1) * mib] = bytes([65 + i]) * mib
        path = m.mnt / "log"
        for _ in range(8):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DIRECT, 0o644)
            try:
                assert os.write(fd, buf) == 4 * mib
            finally:
                os.close(fd)
        data = path.read_bytes()
        assert len(data) == 32 * mib
        assert "".join(chr(data[k * mib]) for k in range(32)) == "ABCD" * 8


def test_fewer_large_slots_than_queues_is_said(tmp_path: Path) -> None:
    """A pump needs a large slot: --large-slots 1 on a device with 3 request queues
    runs one pump, and the log says why the other queues idle."""
    with serving(tmp_path, "relay", backend="refdev", vfsd_args=("--request-queues", "3"),
                 mount_args=("--large-slots", "1")) as m:
        busy(m.mnt, workers=2, files=5)
        assert status_of(m.mnt)["pumps"] == 1
        assert "1 large slot(s) for 3 request queue(s): 1 pump(s) run" in m.log_text()


#: run a command with the given syscalls refused (EPERM) by a seccomp filter, as a
#: container's profile or a hardened service may refuse io_uring
DENY = """import ctypes, os, sys
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(lib.seccomp_init(ctypes.c_uint32(0x7fff0000)))  # allow the rest
for nr in sys.argv[1].split(","):
    # SCMP_ACT_ERRNO(EPERM)
    assert lib.seccomp_rule_add(ctx, ctypes.c_uint32(0x00050001), int(nr), 0) == 0
assert lib.seccomp_load(ctx) == 0
os.execvp(sys.argv[2], sys.argv[2:])
"""


def reads_over_the_null_device(tmp_path: Path, *mount_args: str,
                               prefix: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    """16 threads keep 16 O_DIRECT reads in flight through a mount of the null device,
    which answers a batch of requests with one publish, and check every byte (its
    file "pattern": byte o is o % 251). The request queues' status and the log."""
    mnt, log = tmp_path / "mnt", tmp_path / "serve.log"
    mnt.mkdir()
    with NullDevice(tmp_path / "null.sock") as dev:
        with open(log, "wb") as lf:
            proc = subprocess.Popen([*prefix, *VFSDRV, "mount", "-f", "--vhost-user",
                                     str(dev.socket_path), *mount_args, str(mnt)],
                                    stdout=lf, stderr=subprocess.STDOUT)
        m = Mounted("relay", tmp_path, mnt, proc, log, "nulldev")
        try:
            wait_mounted(mnt, proc, log)
            pattern = bytes(range(251)) * 20
            buf = [mmap.mmap(-1, 4096) for _ in range(16)]  # page-aligned for O_DIRECT

            def reads(k: int) -> None:
                fd = os.open(mnt / "pattern", os.O_RDONLY | os.O_DIRECT)
                try:
                    for i in range(300):
                        off = ((k * 7919 + i * 104729) % 16384) * 4096
                        got = os.preadv(fd, [memoryview(buf[k])], off)
                        assert got == 4096
                        assert buf[k][:] == pattern[off % 251:off % 251 + 4096], (k, off)
                finally:
                    os.close(fd)

            in_threads(reads, 16, 120)
            queues = [q for q in status_of(mnt)["queues"] if q["name"].startswith("request")]
        finally:
            stop_server(m)
    assert sum(q["served"] for q in queues) >= 16 * 300, queues
    return queues, log.read_text(errors="replace")


@pytest.mark.parametrize("io_uring", [None, "0"], ids=["default", "io_uring=0"])
def test_replies_of_a_round_go_out_together(tmp_path: Path, io_uring: str | None) -> None:
    """Each round's replies reach /dev/fuse in one io_uring_enter (a writev each with
    -o io_uring=0)."""
    args = ("-o", f"io_uring={io_uring}") if io_uring else ()
    queues, _ = reads_over_the_null_device(tmp_path, *args)
    batches = sum(q["reply_batches"] for q in queues)
    batched = sum(q["batched_replies"] for q in queues)
    if io_uring == "0" or not kernel_allows_io_uring():
        # asked not to, or refused (io_uring_disabled, seccomp): a writev each
        assert not any(q["io_uring"] for q in queues) and batches == batched == 0, queues
    else:
        assert all(q["io_uring"] for q in queues), queues
        assert batches > 0 and batched >= 2 * batches, queues


@pytest.mark.parametrize("refused", ["425", "426"], ids=["io_uring_setup", "io_uring_enter"])
def test_replies_when_the_kernel_refuses_io_uring(tmp_path: Path, refused: str) -> None:
    """A seccomp filter refuses io_uring_setup (no ring at all) or io_uring_enter (the
    ring is made, its first submission refused, mid-run): every reply still goes
    out, by writev; status says io_uring is off and counts no batch; a refusal
    mid-run is logged once per request queue."""
    if platform.machine() not in ("x86_64", "aarch64"):  # 425, 426 everywhere since 5.1
        pytest.skip(f"syscall numbers not checked on {platform.machine()}")
    deny = tmp_path / "deny.py"
    deny.write_text(DENY)
    queues, log = reads_over_the_null_device(
        tmp_path, prefix=(sys.executable, str(deny), refused))
    assert not any(q["io_uring"] for q in queues), queues
    assert sum(q["reply_batches"] for q in queues) == 0, queues
    warned = log.count("the kernel refused io_uring_enter: replies are written one by one")
    assert warned == (len(queues) if refused == "426" else 0), log[-3000:]


def test_o_direct_write_through_a_device_that_honours_it(tmp_path: Path) -> None:
    """virtiofsd -o allow_direct_io opens files with O_DIRECT: the data must start
    page-aligned in DMA memory (it follows the 80 bytes of headers otherwise)."""
    with serving(tmp_path, "relay", vfsd_args=("-o", "allow_direct_io")) as m:
        r = subprocess.run(["dd", "if=/dev/urandom", f"of={m.mnt}/d", "bs=64k", "count=16",
                            "oflag=direct"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["dd", f"if={m.mnt}/d", "of=/dev/null", "bs=64k", "iflag=direct"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (m.export / "d").read_bytes() == (m.mnt / "d").read_bytes()


def test_forget_storm_after_a_cache_drop(tmp_path: Path) -> None:
    """Dropping the kernel's caches after a big listing makes it send FORGET and
    BATCH_FORGETs of up to a read buffer's size (a MiB); the hiprio sender splits
    them into its buffers and the mount serves on (it once died here)."""
    with serving(tmp_path, "relay") as m:
        d = m.mnt / "many"
        d.mkdir()
        for i in range(3000):
            (d / f"f{i}").touch()
        assert len(os.listdir(d)) == 3000
        for p in d.iterdir():
            os.stat(p)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes
        assert len(os.listdir(d)) == 3000
        st = status_of(m.mnt)
        assert st["counters"].get("relay_forgets", 0) > 0
        # the pumps sent them to the hiprio queue themselves (the native sender)
        (hiprio,) = [q for q in st["queues"] if q["name"] == "hiprio"]
        assert hiprio["sent"] > 0 and hiprio["kicks"] <= hiprio["flushes"] <= hiprio["sent"]
        assert m.proc.poll() is None


def test_split_batch_forget() -> None:
    import struct

    from vfsdrv.fs.hiprio import split_hiprio as split_batch_forget

    count = 3000
    body = b"".join(struct.pack("<QQ", n, 1) for n in range(1, count + 1))
    data = (struct.pack("<IIQQIIIHH", 40 + 8 + len(body), 42, 77, 0, 0, 0, 0, 0, 0)
            + struct.pack("<II", count, 0) + body)
    parts = split_batch_forget(data, 16384)
    assert len(parts) == 3 and all(len(p) <= 16384 for p in parts)
    nodeids = []
    for p in parts:
        length, opcode, unique = struct.unpack_from("<IIQ", p)
        n = struct.unpack_from("<I", p, 40)[0]
        assert (length, opcode, unique) == (len(p), 42, 77) and len(p) == 48 + 16 * n
        nodeids += [struct.unpack_from("<Q", p, 48 + 16 * i)[0] for i in range(n)]
    assert nodeids == list(range(1, count + 1))
    assert split_batch_forget(data[:48 + 160], 16384) == [data[:48 + 160]]


def test_forgets_the_pumps_send_are_traced(tmp_path: Path) -> None:
    """With -d a FORGET is logged though the pump sent it to hiprio itself (the
    control plane only sees its trace event), and the mount's figures count it."""
    import re
    import time

    with serving(tmp_path, "relay", debug=True) as m:
        for i in range(20):
            (m.mnt / f"g{i}").touch()
        for i in range(20):
            (m.mnt / f"g{i}").unlink()  # the kernel forgets each inode it drops
        deadline = time.monotonic() + 10
        pattern = r"unique \d+ (BATCH_)?FORGET nodeid \d+ \(hiprio, no reply\)"
        while not re.search(pattern, m.log_text()):
            assert time.monotonic() < deadline, m.log_text()[-3000:]
            time.sleep(0.05)
        st = status_of(m.mnt)
        (hiprio,) = [q for q in st["queues"] if q["name"] == "hiprio"]
        assert hiprio["sent"] > 0 and st["counters"]["relay_forgets"] > 0


def test_a_bad_used_entry_on_hiprio_fails_the_mount(tmp_path: Path, monkeypatch) -> None:
    """A device that answers a FORGET with a used entry naming another buffer breaks
    the hiprio sender; the relay then fails like a dead FUSE server (ENOTCONN), and
    says why."""
    import dataclasses
    import errno
    import re
    import time

    from mount_helpers import inprocess_refdev_mount
    from vfsdrv.refdev.device_queue import DeviceQueue
    from vfsdrv.refdev.vhost_session import VhostUserSession

    real_serve, real_push = VhostUserSession._serve_chain, DeviceQueue.push

    def serve(self, q, chain, hiprio: bool) -> None:
        if not hiprio:
            return real_serve(self, q, chain, hiprio)
        # the used entry names the next buffer, not the one it used
        wrong = dataclasses.replace(chain, head=(chain.head + 1) % q.size)
        q.push = lambda _chain, written: real_push(q, wrong, written)
        try:
            real_serve(self, q, chain, hiprio)
        finally:
            del q.push

    monkeypatch.setattr(VhostUserSession, "_serve_chain", serve)
    with inprocess_refdev_mount(tmp_path) as (mnt, log, _dev):
        deadline = time.monotonic() + 30
        failed = None
        while failed is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                p = mnt / "g"
                p.touch()
                p.unlink()  # a FORGET each time the kernel drops the inode
            except OSError as exc:
                failed = exc
        # a call in flight when the connection was aborted gets ECONNABORTED
        assert failed.errno in (errno.ENOTCONN, errno.ECONNABORTED), failed
        with pytest.raises(OSError) as later:
            (mnt / "f").stat()
        assert later.value.errno == errno.ENOTCONN
        while not re.search(r"the device failed: hiprio queue: .*used id \d+ .*is not in "
                            r"flight", log.read_text()):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)


def test_a_device_that_stalls_hiprio_blocks_no_thread(tmp_path: Path, monkeypatch) -> None:
    """A device that never takes what is on hiprio: the sender fills up, the pumps
    hand further forgets to the control thread, whose backlog holds them, and every
    other request is still served (nobody waits for hiprio room)."""
    from mount_helpers import inprocess_refdev_mount
    from vfsdrv.refdev.vhost_session import Role, VhostUserSession

    real_run = VhostUserSession._run_queue

    def run_queue(self, q) -> None:
        if self.role(q.index) is not Role.HIPRIO:
            real_run(self, q)

    monkeypatch.setattr(VhostUserSession, "_run_queue", run_queue)
    with inprocess_refdev_mount(tmp_path) as (mnt, _log, _dev):
        for i in range(300):  # a FORGET each: far more than the sender's buffers
            p = mnt / f"h{i}"
            p.write_text("x")
            p.unlink()
        assert (mnt / "f").read_text() == "x"
        import time

        deadline = time.monotonic() + 10
        while True:  # the control thread takes the pumps' hand-overs in its own time
            st = status_of(mnt)
            (hiprio,) = [q for q in st["queues"] if q["name"] == "hiprio"]
            if hiprio["backlog"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert hiprio["in_flight"] == hiprio["sent"] > 0  # none given back
        assert hiprio["full"] > 0 and hiprio["backlog"] > 0
