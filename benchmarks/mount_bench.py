"""A vfsdrv mount next to its floor, in one run.

Starts Debian's virtiofsd on a temporary directory, mounts it with `vfsdrv mount
--vhost-user` (relay by default), and runs the same workloads on the mount and
directly on the exported directory (the floor: the host's own file system, no FUSE,
no virtio):

  * 1 MiB sequential write (then fsync), MiB/s
  * 1 MiB sequential read, MiB/s: on the mount the file's page cache is dropped
    before each pass (fadvise DONTNEED), so every byte crosses the device; the
    floor reads the host's page cache, which is also where virtiofsd reads from
  * 4 KiB random read, ops/s: on the mount with O_DIRECT (every read is a FUSE
    READ); the floor is buffered (host page cache)
  * create, stat, unlink of 10,000 files in one directory, ops/s

Ratios are mount / floor (1.0 = as fast as the host file system itself).

    .venv/bin/python benchmarks/mount_bench.py [--frontend relay|pyfuse3] [--size-mib N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vfsdrv.tools.backends import Virtiofsd

MiB = 1 << 20
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


def seq_write(d: Path, size: int) -> float:
    block = os.urandom(MiB)
    fd = os.open(d / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(size // MiB):
            os.write(fd, block)
        os.fsync(fd)
        return size / MiB / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def seq_read(d: Path, size: int, drop: bool, passes: int = 3) -> float:
    best = 0.0
    buf = bytearray(MiB)
    for _ in range(passes):
        fd = os.open(d / "seq", os.O_RDONLY)
        try:
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            n = 0
            while True:
                got = os.readv(fd, [buf])
                if not got:
                    break
                n += got
            assert n == size, (n, size)
            best = max(best, size / MiB / (time.perf_counter() - t0))
        finally:
            os.close(fd)
    return best


def rand_read(d: Path, size: int, direct: bool, seconds: float) -> float:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(d / "seq", flags)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    rng = random.Random(1)
    pages = size // 4096
    try:
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(64):
                os.preadv(fd, [buf], rng.randrange(pages) * 4096)
            n += 64
            now = time.perf_counter()
            if now >= deadline:
                return n / (now - t0)
    finally:
        os.close(fd)
        buf.close()


def files(d: Path, count: int) -> tuple[float, float, float]:
    base = d / "many"
    base.mkdir()
    names = [base / f"f{i:05d}" for i in range(count)]

    def timed(op: Callable[[Path], object]) -> float:
        t0 = time.perf_counter()
        for p in names:
            op(p)
        return count / (time.perf_counter() - t0)

    def create(p: Path) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))

    rates = timed(create), timed(os.stat), timed(os.unlink)
    base.rmdir()
    return rates


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frontend", default="relay", choices=["relay", "pyfuse3"])
    ap.add_argument("--size-mib", type=int, default=256, help="sequential file size")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=3.0, help="random read duration")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="vfsdrv-mount-bench-"))
    export, mnt, sock = work / "export", work / "mnt", work / "vfsd.sock"
    export.mkdir()
    mnt.mkdir()
    (export / "floor").mkdir()
    (export / "mount").mkdir()
    backend = Virtiofsd(export, sock)
    try:
        r = subprocess.run([*VFSDRV, "mount", "--vhost-user", str(sock), "--frontend",
                            args.frontend, str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"mount failed: {r.stderr}", file=sys.stderr)
            return 1
        try:
            floor_dir, mount_dir = export / "floor", mnt / "mount"
            rows: list[tuple[str, str, float, float]] = []
            w_m = seq_write(mount_dir, size)
            w_f = seq_write(floor_dir, size)
            rows.append(("1 MiB sequential write", "MiB/s", w_m, w_f))
            rows.append(("1 MiB sequential read", "MiB/s", seq_read(mount_dir, size, True),
                         seq_read(floor_dir, size, False)))
            rows.append(("4 KiB random read", "ops/s",
                         rand_read(mount_dir, size, True, args.seconds),
                         rand_read(floor_dir, size, False, args.seconds)))
            fm, ff = files(mount_dir, args.files), files(floor_dir, args.files)
            for i, op in enumerate(("create", "stat", "unlink")):
                rows.append((f"{op} {args.files:,} files", "ops/s", fm[i], ff[i]))
        finally:
            subprocess.run([*VFSDRV, "umount", str(mnt)], capture_output=True)
            if str(mnt) in mount_points():
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        backend.stop()
        subprocess.run(["rm", "-rf", str(work)])
    print(f"vfsdrv mount ({args.frontend}) over vhost-user to virtiofsd vs the exported "
          f"directory itself; file {args.size_mib} MiB")
    print(f"{'workload':<28} {'unit':<6} {'vfsdrv':>12} {'floor':>12} {'ratio':>7}")
    for name, unit, m, f in rows:
        print(f"{name:<28} {unit:<6} {m:>12,.0f} {f:>12,.0f} {m / f:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
