"""Signal a command's whole process group at a chosen moment, as a terminal's Ctrl-C
reaches everything the command runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def signal_group_when(argv: list[str], ready: Callable[[], bool], delay: float, sig: int,
                      env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start `argv` in a session of its own, wait (30 s at most) until `ready()` or its
    exit, wait `delay` s more, send `sig` to its process group (unless it has
    exited): its exit status and standard error. Nothing of it outlives the call."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, f"{argv[:4]}: never ready"
            time.sleep(0.0005)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        _out, err = proc.communicate(timeout=60)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
