"""A lock holder/waiter process for the lock tests, driven by lines on stdin.

    lock W|R START LEN     fcntl F_SETLKW (blocks); prints "locked"
    try W|R START LEN      fcntl F_SETLK; prints "locked" or "busy ERRNO"
    unlock                 F_UNLCK of the whole file; prints "unlocked"
    flock                  flock(LOCK_EX) (blocks); prints "flocked"
    funlock                flock(LOCK_UN); prints "funlocked"
    lock-intr              like "lock W 0 0", but SIGUSR1 aborts the wait: prints
                           "locked" or "interrupted ERRNO"
    rounds N LOG TAG       N times: lock the whole file, append "TAG+" and "TAG-"
                           lines to LOG (a file outside the mount, so page caches do
                           not matter), unlock; prints "done"
    getlk                  prints "free" or "held TYPE PID"
    exit
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import sys


class Interrupted(Exception):
    pass


def _raise(_sig: int, _frame: object) -> None:
    raise Interrupted


def main(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    types = {"W": fcntl.LOCK_EX, "R": fcntl.LOCK_SH}  # lockf() takes LOCK_* values
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "lock":
            fcntl.lockf(fd, types[args[0]], int(args[2]), int(args[1]))
            print("locked", flush=True)
        elif cmd == "try":
            try:
                fcntl.lockf(fd, types[args[0]] | fcntl.LOCK_NB, int(args[2]), int(args[1]))
                print("locked", flush=True)
            except OSError as exc:
                print(f"busy {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
        elif cmd == "unlock":
            fcntl.lockf(fd, fcntl.LOCK_UN)
            print("unlocked", flush=True)
        elif cmd == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("flocked", flush=True)
        elif cmd == "funlock":
            fcntl.flock(fd, fcntl.LOCK_UN)
            print("funlocked", flush=True)
        elif cmd == "lock-intr":
            old = signal.signal(signal.SIGUSR1, _raise)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
            except Interrupted:
                print("interrupted EINTR", flush=True)
            except OSError as exc:
                print(f"interrupted {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
            finally:
                signal.signal(signal.SIGUSR1, old)
        elif cmd == "rounds":
            log = os.open(args[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            enter, leave = f"{args[2]}+\n".encode(), f"{args[2]}-\n".encode()
            for _ in range(int(args[0])):
                fcntl.lockf(fd, fcntl.LOCK_EX)
                os.write(log, enter)
                os.write(log, leave)
                fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(log)
            print("done", flush=True)
        elif cmd == "getlk":
            raw = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
            out = fcntl.fcntl(fd, fcntl.F_GETLK, raw)
            typ, _, _, _, pid = struct.unpack("hhqqi", out)
            print("free" if typ == fcntl.F_UNLCK else f"held {typ} {pid}", flush=True)
        elif cmd == "exit":
            return


if __name__ == "__main__":
    main(sys.argv[1])
