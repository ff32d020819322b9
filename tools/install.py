"""`vfsdrv install` / `vfsdrv uninstall`: make this installation a system tool.

    vfsdrv install [--root DIR] [--no-reload]
    vfsdrv uninstall [--root DIR] [--no-reload]

install writes, under --root (default /):
  sbin/mount.vfsdrv                  so that `mount -t vfsdrv` and fstab lines work
                                     (mount(8) looks for helpers in /sbin)
  sbin/mount.fuse.vfsdrv             the same helper for the type the mount table
                                     shows (fuse.vfsdrv): `mount -o remount,ro`, a
                                     line copied from /proc/mounts
  usr/local/sbin/vfsdrv              when `vfsdrv` is not already on the system PATH
  etc/udev/rules.d/70-vfsdrv.rules   } as `vfsdrv udev install`
  etc/systemd/system/vfsdrv@.service }
  etc/vfsdrv.conf.example            }
  usr/local/share/man/man8/*.8       manual pages, generated from the command line
  usr/share/bash-completion/completions/{vfsdrv,mount.vfsdrv}   bash completion

The two commands are small shell scripts that run this installation's entry points
(a venv's or a system-wide one); they carry a marker line, as the manual pages and
completion do, and the udev and systemd files end with a stamp (the digest of the
text above it). install overwrites only such files, and refuses, before it writes
anything, when one of its targets is somebody else's; uninstall removes only such
files (an edited udev or systemd file is kept, and named), never /etc/vfsdrv.conf.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from ..errors import VfsdrvError
from . import udev

MARKER = "# installed by `vfsdrv install`; removed by `vfsdrv uninstall`"
HELPER = "sbin/mount.vfsdrv"
#: mount(8) runs mount.TYPE for the type in the mount table, fuse.vfsdrv, before it
#: falls back to mount.fuse (which would run `vfsdrv SOURCE DIR -o ...`)
FUSE_HELPER = "sbin/mount.fuse.vfsdrv"
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


def _ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def _generated(path: Path) -> bool:
    from . import manpages

    try:
        return manpages.GENERATED in path.read_text(errors="replace")
    except OSError:
        return False


def targets(root: str = "/") -> list[udev.Target]:
    """Every file install writes, with how to recognize one it wrote before."""
    from . import manpages

    base = Path(root)
    helper = wrapper(entry_point("mount.vfsdrv"))
    out = [udev.Target(base / name, helper, 0o755, _ours) for name in (HELPER, FUSE_HELPER)]
    vfsdrv = entry_point("vfsdrv")
    if str(Path(vfsdrv).parent) not in SYSTEM_BIN:
        out.append(udev.Target(base / COMMAND, wrapper(vfsdrv), 0o755, _ours))
    out += udev.targets(root, command=vfsdrv)
    for name, text in manpages.man_pages().items():
        out.append(udev.Target(base / MAN_DIR / name, text, 0o644, _generated))
    for name, text in manpages.completions().items():
        out.append(udev.Target(base / COMPLETION_DIR / name, text, 0o644, _generated))
    return out


def install(root: str = "/", reload: bool = True) -> list[Path]:
    todo = targets(root)
    udev.check(todo, "`vfsdrv install`")  # all of them first: nothing half-installed
    written = udev.write_all(todo, f"vfsdrv uninstall --root {shlex.quote(root)}")
    if reload and root == "/":
        udev._reload()
    return written


def uninstall(root: str = "/", reload: bool = True,
              kept: list[Path] | None = None) -> list[Path]:
    """Remove what install wrote; a file there that it did not write, or (udev, systemd)
    that was edited since, stays and is added to `kept`."""
    from . import manpages

    base = Path(root)
    removed = []
    mine = [(base / HELPER, _ours), (base / FUSE_HELPER, _ours), (base / COMMAND, _ours)]
    mine += [(base / MAN_DIR / name, _generated) for name in manpages.man_pages()]
    mine += [(base / COMPLETION_DIR / name, _generated) for name in manpages.completions()]
    for path, ours in mine:
        if not (path.exists() or path.is_symlink()):
            continue
        if ours(path):
            path.unlink()
            removed.append(path)
        elif kept is not None:
            kept.append(path)
    removed += udev.uninstall(root, reload=reload, kept=kept)
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
    args.root = udev.check_root(args.root)
    if args.root == "/" and os.geteuid() != 0:
        raise VfsdrvError("installing into / needs root")
    for path in install(args.root, reload=not args.no_reload):
        print(f"wrote {path}")
    conf = Path(args.root) / udev.DEFAULT_CONF.lstrip("/")
    if not conf.exists():
        print(f"nothing is opted in to auto-binding until {conf} names functions "
              f"(see {conf.with_name(conf.name + '.example')})")
    if shutil.which("mount") is None:
        print("note: mount(8) is not installed (util-linux's mount package)")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    args.root = udev.check_root(args.root)
    if args.root == "/" and os.geteuid() != 0:
        raise VfsdrvError("uninstalling from / needs root")
    kept: list[Path] = []
    removed = uninstall(args.root, reload=not args.no_reload, kept=kept)
    for path in removed:
        print(f"removed {path}")
    if not removed and not kept:
        print(f"nothing of vfsdrv's is installed under {args.root}")
    for path in kept:
        print(f"vfsdrv: kept {path}: not written by `vfsdrv install`, or changed since "
              "(remove it yourself if it is not needed)", file=sys.stderr)
    return 0
