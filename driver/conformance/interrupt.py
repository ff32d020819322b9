"""Ctrl-C while the checks work in their scratch directory, taken between requests.

A KeyboardInterrupt raised while a request waits for its reply leaves that request
with the device, and the clean-up that follows (removing the scratch directory)
would share the session with a reply still to come. Inside `deferred()` the first
SIGINT or SIGTERM only asks the checks to stop; they do at the next `checkpoint()`,
between two requests (each bounded by --timeout), and the clean-up runs on a clean
session. A second signal interrupts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_stop = threading.Event()


def checkpoint() -> None:
    """Stop here if a signal asked to."""
    if _stop.is_set():
        raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals go to the main thread: nothing to defer here
        return

    def ask(_signum: int, _frame: object) -> None:
        if _stop.is_set():
            raise KeyboardInterrupt
        _stop.set()

    old = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _stop.clear()
