"""The null device (benchmarks/nulldev.c): build it into a cache directory and run it.

A multi-queue vhost-user-fs backend in C that answers every request with a canned
reply and does no file I/O, so what a benchmark measures against it is the driver
(as SPDK's null bdev and Linux's null_blk do for block drivers). It is a benchmark
fixture and not part of the installed package: its source is found next to this
source tree (or at $VFSDRV_NULLDEV_SOURCE) and compiled with the system's C compiler
($CC, default cc) on first use, into $XDG_CACHE_HOME/vfsdrv (~/.cache/vfsdrv).

    python3 -m vfsdrv.tools.nulldev --socket PATH [--queues N] ...   (builds, then runs)
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from ..errors import VfsdrvError

CFLAGS = ("-O2", "-g", "-pthread", "-Wall", "-Wextra")
#: --stats FILE: five u64 counters per queue, for this many queues
STATS = struct.Struct("<5Q")
STATS_QUEUES = 65


class Counters(NamedTuple):
    requests: int
    kicks: int  # eventfd writes of the driver (the device reads their sum)
    wakes: int  # times a queue thread woke for a kick
    interrupts: int
    batches: int  # used index publications

    def __sub__(self, other: tuple) -> Counters:  # type: ignore[override]
        return Counters(*(a - b for a, b in zip(self, other, strict=True)))


def source_path() -> Path:
    env = os.environ.get("VFSDRV_NULLDEV_SOURCE")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks" / "nulldev.c"
    if not path.is_file():
        raise VfsdrvError(
            f"the null device's source {path} is not there: it ships in the source tree "
            "(benchmarks/nulldev.c), not in the installed package; set VFSDRV_NULLDEV_SOURCE"
        )
    return path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vfsdrv"


def build(source: Path | None = None) -> Path:
    """The compiled null device, built once per source text and flags."""
    source = source or source_path()
    cc = shlex.split(os.environ.get("CC", "cc"))
    key = hashlib.sha256(source.read_bytes() + " ".join([*cc, *CFLAGS]).encode()).hexdigest()
    binary = cache_dir() / f"nulldev-{key[:16]}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    try:
        r = subprocess.run([*cc, *CFLAGS, "-o", str(tmp), str(source)], capture_output=True,
                           text=True)
    except FileNotFoundError as exc:
        raise VfsdrvError(f"no C compiler ({cc[0]}) to build the null device: "
                          "apt-get install gcc") from exc
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VfsdrvError(f"building the null device failed:\n{r.stderr[-3000:]}")
    os.replace(tmp, binary)  # atomic: a concurrent build finds a whole binary or none
    return binary


class NullDevice:
    """One null device process serving on `socket_path` (connection after connection);
    its stderr (start-up line, per-queue statistics, ring faults) goes to a log file
    next to the socket."""

    def __init__(self, socket_path: Path, *, queues: int = 1, tag: str = "null",
                 event_idx: bool = True, extra: tuple[str, ...] = (),
                 timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.tag = tag
        self.queues = queues
        self.stats_path = socket_path.with_suffix(".stats")
        cmd = [str(build()), "--socket", str(socket_path), "--queues", str(queues),
               "--tag", tag, "--stats", str(self.stats_path), "--die-with-parent",
               *([] if event_idx else ["--no-event-idx"]), *extra]
        self.log_path = socket_path.with_suffix(".log")
        socket_path.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not socket_path.exists():
            if self.proc.poll() is not None:
                raise VfsdrvError(f"the null device exited at start: {self.log()[-1000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise VfsdrvError(f"the null device did not listen within {timeout:g} s")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace").strip()

    def counters(self) -> Counters:
        """Requests, kicks, wakes, interrupts and batches over all queues so far (the
        device's running totals, readable at any time)."""
        with open(self.stats_path, "rb") as f:
            data = f.read(STATS_QUEUES * STATS.size)
        total = [0] * 5
        for fields in STATS.iter_unpack(data[: len(data) - len(data) % STATS.size]):
            for i, v in enumerate(fields):
                total[i] += v
        return Counters(*total)

    def queue_requests(self) -> dict[int, int]:
        """Requests served per queue, from the statistics the device logs when a
        connection ends (the last connection's line for each queue wins)."""
        out: dict[int, int] = {}
        for line in self.log().splitlines():
            words = line.split()
            if line.startswith("nulldev: queue ") and len(words) > 4 and words[4] == "requests,":
                out[int(words[2].rstrip(":"))] = int(words[3])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> NullDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    binary = build()
    if args == ["--build-only"]:
        print(binary)
        return 0
    os.execv(binary, [str(binary), *args])
    return 1  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VfsdrvError as exc:
        print(f"nulldev: {exc}", file=sys.stderr)
        sys.exit(1)
