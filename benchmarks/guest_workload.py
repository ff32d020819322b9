"""The workloads of guest_mount_bench.py, run inside the guest on one mounted directory.

    python benchmarks/guest_workload.py LABEL DIR [--size-mib N] [--files N] [--seconds S]

Prints one line `RESULT LABEL {json}` with MiB/s and ops/s figures:

  * seq_write: 1 MiB writes of a SIZE file, then fsync
  * seq_read: 1 MiB reads of that file after dropping the guest's page cache
    (best of 2 passes), so every byte crosses the device
  * rand_read: 4 KiB reads at random page-aligned offsets with O_DIRECT (every read
    is a FUSE READ), for S seconds
  * create / stat / unlink of N empty files in one directory

Needs root (drop_caches). Only the standard library: it runs under the guest's
interpreter without the project installed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def seq_write(path: Path, size: int) -> float:
    block = random.Random(1).randbytes(MiB)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(size // MiB):
            os.write(fd, block)
        os.fsync(fd)
        return size / MiB / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def seq_read(path: Path, size: int, passes: int = 2) -> float:
    best = 0.0
    buf = bytearray(MiB)
    for _ in range(passes):
        drop_caches()
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            n = 0
            while got := os.readv(fd, [buf]):
                n += got
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        if n != size:
            raise RuntimeError(f"read {n} bytes of {size}")
        best = max(best, size / MiB / elapsed)
    return best


def rand_read(path: Path, size: int, seconds: float) -> float:
    drop_caches()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    rng = random.Random(2)
    pages = size // 4096
    try:
        n = 0
        t0 = time.perf_counter()
        while True:
            for _ in range(32):
                if os.preadv(fd, [buf], rng.randrange(pages) * 4096) != 4096:
                    raise RuntimeError("short O_DIRECT read")
            n += 32
            now = time.perf_counter()
            if now - t0 >= seconds:
                return n / (now - t0)
    finally:
        os.close(fd)
        buf.close()


def files(base: Path, count: int) -> dict[str, float]:
    base.mkdir()
    names = [str(base / f"f{i:05d}") for i in range(count)]

    def timed(op: Callable[[str], object]) -> float:
        t0 = time.perf_counter()
        for p in names:
            op(p)
        return count / (time.perf_counter() - t0)

    def create(p: str) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))

    out = {"create": timed(create)}
    drop_caches()  # stat asks the device, not the dentry/attribute cache
    out["stat"] = timed(os.stat)
    out["unlink"] = timed(os.unlink)
    base.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("label")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args(argv)
    size = a.size_mib * MiB
    a.dir.mkdir(parents=True, exist_ok=True)
    f = a.dir / "seq"
    res: dict[str, float] = {}
    t0 = time.monotonic()
    res["seq_write"] = seq_write(f, size)
    res["seq_read"] = seq_read(f, size)
    res["rand_read"] = rand_read(f, size, a.seconds)
    f.unlink()
    res.update(files(a.dir / "many", a.files))
    res["elapsed"] = time.monotonic() - t0
    print(f"RESULT {a.label} {json.dumps(res)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
