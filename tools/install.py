"""`vfsdrv install` / `vfsdrv uninstall`: make this installation a system tool.

    vfsdrv install [--root DIR] [--no-reload]
    vfsdrv uninstall [--root DIR] [--no-reload]

install writes, under --root (default /):
  sbin/mount.vfsdrv                  so that `mount -t vfsdrv` and fstab lines work
                                     (mount(8) looks for helpers in /sbin)
  usr/local/sbin/vfsdrv              when `vfsdrv` is not already on the system PATH
  etc/udev/rules.d/70-vfsdrv.rules   } as `vfsdrv udev install`
  etc/systemd/system/vfsdrv@.service }
  etc/vfsdrv.conf.example            }
  usr/local/share/man/man8/*.8       manual pages, generated from the command line
  usr/share/bash-completion/completions/{vfsdrv,mount.vfsdrv}   bash completion

The two commands are small shell scripts that run this installation's entry points
(a venv's or a system-wide one); they carry a marker line, and uninstall removes
only files that carry it (or are the templates' output), never /etc/vfsdrv.conf.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path

from ..errors import VfsdrvError
from . import udev

MARKER = "# installed by `vfsdrv install`; removed by `vfsdrv uninstall`"
HELPER = "sbin/mount.vfsdrv"
COMMAND = "usr/local/sbin/vfsdrv"
MAN_DIR = "usr/local/share/man/man8"
COMPLETION_DIR = "usr/share/bash-completion/completions"
#: directories on every login's PATH: a `vfsdrv` there needs no wrapper
SYSTEM_BIN = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")


def entry_point(name: str) -> str:
    """Absolute path of a console script of this installation (next to its Python,
    or on PATH)."""
    if name == "vfsdrv":
        return udev.vfsdrv_command()
    here = Path(udev.vfsdrv_command()).with_name(name)
    if os.access(here, os.X_OK):
        return str(here)
    raise VfsdrvError(f"the `{name}` entry point is not installed next to `vfsdrv` ({here})")


def wrapper(target: str) -> str:
    return f'#!/bin/sh\n{MARKER}\nexec {shlex.quote(target)} "$@"\n'


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.vfsdrv-new")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)  # never a half-written helper for a concurrent mount(8)
    return path


def _ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def install(root: str = "/", reload: bool = True) -> list[Path]:
    base = Path(root)
    written = []
    helper = base / HELPER
    if helper.exists() and not _ours(helper):
        raise VfsdrvError(f"{helper} exists and was not written by `vfsdrv install`: "
                          "remove it first")
    written.append(_write(helper, wrapper(entry_point("mount.vfsdrv")), 0o755))
    vfsdrv = entry_point("vfsdrv")
    if str(Path(vfsdrv).parent) not in SYSTEM_BIN:
        written.append(_write(base / COMMAND, wrapper(vfsdrv), 0o755))
    written += udev.install(root, reload=reload, command=vfsdrv)
    from . import manpages

    for name, text in manpages.man_pages().items():
        written.append(_write(base / MAN_DIR / name, text))
    for name, text in manpages.completions().items():
        written.append(_write(base / COMPLETION_DIR / name, text))
    return written


def uninstall(root: str = "/", reload: bool = True) -> list[Path]:
    from . import manpages

    base = Path(root)
    removed = []
    for rel in (HELPER, COMMAND):
        path = base / rel
        if _ours(path):
            path.unlink()
            removed.append(path)
    for name in manpages.man_pages():
        path = base / MAN_DIR / name
        if path.exists() and manpages.GENERATED in path.read_text(errors="replace"):
            path.unlink()
            removed.append(path)
    for name in manpages.completions():
        path = base / COMPLETION_DIR / name
        if path.exists() and manpages.GENERATED in path.read_text(errors="replace"):
            path.unlink()
            removed.append(path)
    removed += udev.uninstall(root, reload=reload)
    return removed


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, helptext in (
        ("install", run_install, "put mount.vfsdrv where mount(8) looks, the udev rule, the "
         "systemd unit, manual pages and completion"),
        ("uninstall", run_uninstall, "remove what `vfsdrv install` wrote"),
    ):
        p = sub.add_parser(name, help=helptext, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--root", default="/", help="under this directory (default /)")
        p.add_argument("--no-reload", action="store_true",
                       help="do not tell udev and systemd to reload")
        p.set_defaults(func=func)


def run_install(args: argparse.Namespace) -> int:
    if args.root == "/" and os.geteuid() != 0:
        raise VfsdrvError("installing into / needs root")
    for path in install(args.root, reload=not args.no_reload):
        print(f"wrote {path}")
    if shutil.which("mount") is None:
        print("note: mount(8) is not installed (util-linux's mount package)")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    if args.root == "/" and os.geteuid() != 0:
        raise VfsdrvError("uninstalling from / needs root")
    for path in uninstall(args.root, reload=not args.no_reload):
        print(f"removed {path}")
    return 0
