"""What every frontend offers: `serve(fs, mountpoint, options=..., debug=..., ready=...,
source=...)`.

A frontend mounts the file system served by a started `VirtioFs`, calls `ready()`
once the mount is usable, runs until it is unmounted (umount, fusermount3 -u) or
receives SIGTERM/SIGINT/SIGHUP, unmounts, sends FUSE_DESTROY to the device and returns.
The caller owns the device and closes it afterwards. On any failure the frontend
leaves nothing mounted and raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from ..errors import VfsdrvError
from ..fs.device import VirtioFs

#: frontend name -> module in vfsdrv.frontends that has `serve`
FRONTENDS = {
    "relay": "relay",
    "pyfuse3": "pyfuse3_frontend",
}
DEFAULT_FRONTEND = "relay"


class FrontendError(VfsdrvError):
    """A frontend could not mount or serve."""


class ServeFunction(Protocol):
    def __call__(
        self,
        fs: VirtioFs,
        mountpoint: str,
        *,
        options: list[str],
        debug: bool = False,
        ready: Callable[[], None] | None = None,
        source: str | None = None,  # what the mount table shows (default: the tag)
    ) -> None: ...


def get_frontend(name: str) -> ServeFunction:
    """The `serve` function of a frontend, by name ("relay", "pyfuse3")."""
    module = FRONTENDS.get(name)
    if module is None:
        raise FrontendError(f"unknown frontend {name!r} (known: {', '.join(FRONTENDS)})")
    try:
        mod = importlib.import_module(f"vfsdrv.frontends.{module}")
    except ImportError as exc:
        raise FrontendError(f"frontend {name!r} is not available: {exc}") from exc
    serve = getattr(mod, "serve", None)
    if serve is None:
        raise FrontendError(f"frontend {name!r} has no serve()")
    return serve
