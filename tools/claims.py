"""Which `vfsdrv mount` bound a PCI function to vfio-pci, so that a binding outlives
no server by surprise.

A mount that binds the function itself records a claim in the state directory
(/run/vfsdrv/BDF.mount: the serving process's pid and start time, and the mount
point) and gives the function back when it ends. A server killed with SIGKILL (or
crashed) gives nothing back: its claim then names a process that is gone, and

  * `vfsdrv umount` of that mount point gives the function back,
  * a later `vfsdrv mount` of the function takes the binding over (and gives it
    back when it ends),
  * `vfsdrv list` says who left it bound,
  * `vfsdrv bind` (the administrator wants it on vfio-pci) and `vfsdrv unbind`
    drop the claim.

A function bound by `vfsdrv bind` carries no claim: nothing gives it back but
`vfsdrv unbind`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VfsdrvError
from ..pci.errors import BadAddressError
from ..pci.sysfs import VFIO_PCI, Sysfs

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with
    the pid it names one process, even after the pid is reused. None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after its end
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class Claim:
    bdf: str
    pid: int
    start: str
    mountpoint: str

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def _path(sysfs: Sysfs, bdf: str) -> Path:
    return sysfs.state_dir / f"{bdf}.mount"


def record(sysfs: Sysfs, bdf: str, mountpoint: str) -> None:
    """This process (the server of `mountpoint`) bound `bdf` and will give it back."""
    pid = os.getpid()
    body = {"pid": pid, "start": _start_time(pid), "mountpoint": os.path.abspath(mountpoint)}
    try:
        sysfs.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = _path(sysfs, bdf).with_suffix(".mount.tmp")
        tmp.write_text(json.dumps(body) + "\n")
        tmp.replace(_path(sysfs, bdf))
    except OSError as exc:  # best effort: only a SIGKILL'd server needs it
        log.warning("could not record that this mount bound %s (%s): if it is killed, "
                    "`vfsdrv unbind %s` gives the function back", bdf, exc, bdf)


def read(sysfs: Sysfs, bdf: str) -> Claim | None:
    """The claim on `bdf`, if any (an unreadable or malformed record is none)."""
    try:
        body = json.loads(_path(sysfs, bdf).read_text())
        return Claim(bdf, int(body["pid"]), str(body["start"]), str(body["mountpoint"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drop(sysfs: Sysfs, bdf: str) -> None:
    try:
        _path(sysfs, bdf).unlink()
    except OSError:
        pass


def orphaned(sysfs: Sysfs, bdf: str) -> Claim | None:
    """The claim of a server that is gone, on a function still bound to vfio-pci."""
    claim = read(sysfs, bdf)
    if claim is None or claim.alive():
        return None
    try:
        if sysfs.driver(bdf) != VFIO_PCI:
            return None
    except BadAddressError:
        return None
    return claim


def give_back_orphans(mountpoint: str, sysfs: Sysfs | None = None) -> list[str]:
    """After `mountpoint` was unmounted: give back each function its dead server left
    on vfio-pci. Returns messages for the user (what was given back, what failed)."""
    sysfs = sysfs or Sysfs()
    mountpoint = os.path.abspath(mountpoint)
    try:
        names = sorted(p.name for p in sysfs.state_dir.glob("*.mount"))
    except OSError:
        return []
    out = []
    for name in names:
        bdf = name[: -len(".mount")]
        claim = orphaned(sysfs, bdf)
        if claim is None or claim.mountpoint != mountpoint:
            continue
        from .devices import vfio_users

        users = vfio_users(sysfs, bdf)
        if users:  # vfio-pci's unbind would wait for them: leave it to `vfsdrv unbind`
            out.append(f"{bdf} stays on vfio-pci: {', '.join(users)} uses it through VFIO")
            continue
        try:
            now = sysfs.unbind_vfio(bdf)
        except VfsdrvError as exc:
            out.append(f"{bdf} stays on vfio-pci (its server, pid {claim.pid}, is gone): "
                       f"{exc}; `vfsdrv unbind {bdf}` gives it back")
            continue
        drop(sysfs, bdf)
        out.append(f"{bdf}: given back to {now or 'no driver'} (its server, pid "
                   f"{claim.pid}, had ended without doing so)")
    return out
