"""`vfsdrv list`, `vfsdrv bind`, `vfsdrv unbind`: the virtio-fs PCI functions of this
machine and who drives them.

    vfsdrv list [--json]
    vfsdrv bind (BDF | --tag TAG)      hand the function to vfio-pci (for vfsdrv)
    vfsdrv unbind (BDF | --tag TAG)    give it back to its kernel driver (virtio-pci)

`list` shows every virtio-fs function (1af4:105a): address, tag, current driver
(and the virtio device the kernel made of it), IOMMU group and the group's other
members with their drivers, and where the file system is mounted (kernel
`virtiofs` mounts and vfsdrv FUSE mounts, both by tag). The tag comes from the
kernel when it knows it (/sys/fs/virtiofs, Linux 6.10+), else from the device's
config space (read-only, through sysfs; works whoever drives the function).

`bind` refuses a function the kernel has mounted; `unbind` refuses one a process
still holds open through VFIO (a running `vfsdrv mount`), naming the process.
The driver a function had before `bind` is remembered (in /run/vfsdrv) and
restored by `unbind`, also from another process. A function that a `vfsdrv mount`
bound and whose server was killed (SIGKILL: it gave nothing back) is noted in
`list` with that mount point (vfsdrv.tools.claims).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cliargs import fs_tag
from ..errors import VfsdrvError
from ..pci.errors import DeviceBusyError
from ..pci.sysfs import VFIO_PCI, Sysfs, normalize_bdf, require_root
from ..virtio import pci as vpci
from . import claims
from . import pci_functions as pf

SYS_FS_VIRTIOFS = Path("/sys/fs/virtiofs")
MOUNTINFO = "/proc/self/mountinfo"
FUSE_TYPE = "fuse.vfsdrv"


@dataclass
class GroupMember:
    bdf: str
    driver: str | None


@dataclass
class Mount:
    mountpoint: str
    type: str  # "virtiofs" (the kernel's driver) or "fuse.vfsdrv" (this driver)


@dataclass
class DeviceInfo:
    bdf: str
    tag: str | None
    tag_source: str | None  # "kernel" | "device" | None (unreadable: see error)
    driver: str | None
    virtio_device: str | None  # virtioN, when virtio-pci drives it
    virtio_driver: str | None  # normally "virtiofs"
    iommu_group: int | None
    group_members: list[GroupMember] = field(default_factory=list)  # the others
    mounts: list[Mount] = field(default_factory=list)
    error: str | None = None
    # on vfio-pci still, bound by a `vfsdrv mount` whose server is gone: its pid and
    # mount point (`vfsdrv umount` there, or `vfsdrv unbind`, gives it back)
    left_bound_by: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# -- gathering ----------------------------------------------------------------------------------


def kernel_tags(base: Path = SYS_FS_VIRTIOFS) -> dict[str, str]:
    """virtioN -> tag from the kernel's virtiofs sysfs (Linux 6.10+; empty before)."""
    out: dict[str, str] = {}
    if not base.is_dir():
        return out
    for d in base.iterdir():
        try:
            tag = (d / "tag").read_text().rstrip("\n")
            dev = os.path.basename(os.readlink(d / "device"))
        except OSError:
            continue
        out[dev] = tag
    return out


def virtio_child(sysfs: Sysfs, bdf: str) -> tuple[str | None, str | None]:
    """(virtioN, its driver) of a function virtio-pci drives."""
    for child in sorted(sysfs.device_dir(bdf).glob("virtio[0-9]*")):
        link = child / "driver"
        drv = os.path.basename(os.readlink(link)) if link.is_symlink() else None
        return child.name, drv
    return None, None


def mounts_of(tag: str | None, mountinfo: str = MOUNTINFO, *,
              bdf: str | None = None) -> list[Mount]:
    """Kernel virtiofs mounts and vfsdrv FUSE mounts of a function: whose source is
    its `tag`, or (vfsdrv mount --device) pci:ADDRESS naming `bdf` however spelled."""
    from ..frontends.fuse_dev import mount_table

    try:
        table = mount_table(mountinfo)
    except OSError:
        return []

    def names_it(source: str, fstype: str) -> bool:
        if tag is not None and source == tag:
            return True
        if bdf is None or fstype != FUSE_TYPE or not source.startswith("pci:"):
            return False
        try:
            return normalize_bdf(source[len("pci:"):]) == bdf
        except VfsdrvError:
            return False

    return [Mount(mp, fstype) for mp, fstype, source in table
            if fstype in ("virtiofs", FUSE_TYPE) and names_it(source, fstype)]


def describe(bdf: str, sysfs: Sysfs, *, ktags: dict[str, str] | None = None,
             mountinfo: str = MOUNTINFO, read_tag=None) -> DeviceInfo:
    bdf = normalize_bdf(bdf)
    driver = sysfs.driver(bdf)
    vdev, vdrv = virtio_child(sysfs, bdf)
    group = sysfs.iommu_group(bdf)
    members = [GroupMember(m, sysfs.driver(m)) for m in sysfs.group_members(group)
               if m != bdf] if group is not None else []
    tag = source = error = None
    ktags = kernel_tags() if ktags is None else ktags
    if vdev is not None and vdev in ktags:
        tag, source = ktags[vdev], "kernel"
    else:
        try:
            tag, source = (read_tag or pf.function_tag)(bdf, sysfs), "device"
        except (VfsdrvError, OSError) as exc:
            error = str(exc)
    left = claims.orphaned(sysfs, bdf)
    return DeviceInfo(bdf, tag, source, driver, vdev, vdrv, group, members,
                      mounts_of(tag, mountinfo, bdf=bdf), error,
                      {"pid": left.pid, "mountpoint": left.mountpoint} if left else None)


def list_devices(sysfs: Sysfs | None = None, **kw) -> list[DeviceInfo]:
    sysfs = sysfs or Sysfs()
    fns = sysfs.functions(vpci.VIRTIO_PCI_VENDOR, vpci.VIRTIO_FS_PCI_DEVICE)
    return [describe(bdf, sysfs, **kw) for bdf in fns]


def with_holders(exc: DeviceBusyError, sysfs: Sysfs, bdf: str) -> DeviceBusyError:
    """A busy open of `bdf`, saying which processes hold it through VFIO (as unbind
    says it), when any can be named."""
    users = vfio_users(sysfs, bdf)
    return DeviceBusyError(f"{exc} (held by {', '.join(users)})") if users else exc


def vfio_users(sysfs: Sysfs, bdf: str, proc: Path = Path("/proc")) -> list[str]:
    """'PID (command)' of processes holding the function's VFIO group or device node."""
    nodes = set()
    group = sysfs.iommu_group(bdf)
    if group is not None:
        nodes |= {f"/dev/vfio/{group}", f"/dev/vfio/noiommu-{group}"}
    vdev = sysfs.vfio_dev_name(bdf)
    if vdev:
        nodes.add(f"/dev/vfio/devices/{vdev}")
    users = []
    for p in proc.iterdir() if nodes else []:
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            targets = {os.readlink(fd) for fd in (p / "fd").iterdir()}
        except OSError:
            continue
        if targets & nodes:
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                cmd = "?"
            users.append(f"{p.name} ({cmd})")
    return users


# -- commands -------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="virtio-fs PCI functions: tag, driver, IOMMU group, mounts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="a JSON list, one object per function")
    p.set_defaults(func=run_list)

    b = sub.add_parser("bind", help="hand a virtio-fs function to vfio-pci (for vfsdrv)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("bdf", nargs="?", metavar="BDF", help="PCI address, e.g. 0000:00:03.0")
    b.add_argument("--tag", type=fs_tag, help="the virtio-fs function with this tag")
    b.set_defaults(func=run_bind)

    u = sub.add_parser("unbind", help="give a function back to its kernel driver",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("bdf", nargs="?", metavar="BDF", help="PCI address, e.g. 0000:00:03.0")
    u.add_argument("--tag", type=fs_tag, help="the virtio-fs function with this tag")
    u.set_defaults(func=run_unbind)


def format_table(devs: list[DeviceInfo]) -> str:
    if not devs:
        return "no virtio-fs PCI function (1af4:105a) found"
    lines = []
    for d in devs:
        drv = d.driver or "none"
        if d.virtio_device:
            drv += f" ({d.virtio_device}: {d.virtio_driver or 'no driver'})"
        tag = repr(d.tag) + f" (from the {d.tag_source})" if d.tag else f"? ({d.error})"
        group = "none (no IOMMU)" if d.iommu_group is None else str(d.iommu_group)
        if d.group_members:
            group += " with " + ", ".join(f"{m.bdf} ({m.driver or 'no driver'})"
                                          for m in d.group_members)
        elif d.iommu_group is not None:
            group += " (alone)"
        mounted = ", ".join(f"{m.mountpoint} ({m.type})" for m in d.mounts) or "not mounted"
        lines += [d.bdf, f"  tag:         {tag}", f"  driver:      {drv}",
                  f"  IOMMU group: {group}", f"  mounted:     {mounted}"]
        if d.left_bound_by:
            left = d.left_bound_by
            lines.append(f"  note:        left on vfio-pci by a vfsdrv mount whose server "
                         f"(pid {left['pid']}) is gone: `vfsdrv unbind {d.bdf}` gives it "
                         f"back, and so does `vfsdrv umount {left['mountpoint']}` (which also "
                         "removes that dead mount, if it is still there)")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    devs = list_devices()
    if args.json:
        print(json.dumps([d.to_dict() for d in devs], indent=2))
    else:
        print(format_table(devs))
    return 0


def bind(bdf: str | None, tag: str | None, sysfs: Sysfs | None = None) -> tuple[str, str | None]:
    """Bind to vfio-pci; returns (bdf, the driver it had: "vfio-pci" if nothing changed)."""
    require_root()
    sysfs = sysfs or Sysfs()
    if bool(bdf) == bool(tag):
        raise VfsdrvError("give the function's address or --tag TAG (one of them)")
    bdf = normalize_bdf(bdf) if bdf else pf.find_by_tag(tag or "", sysfs)
    ident = sysfs.identity(bdf)
    if (ident.vendor, ident.device) != (vpci.VIRTIO_PCI_VENDOR, vpci.VIRTIO_FS_PCI_DEVICE):
        raise VfsdrvError(f"{bdf} is {ident.vendor:04x}:{ident.device:04x}, not a virtio-fs "
                          "function (1af4:105a); `vfsdrv list` shows them")
    with sysfs.owning(bdf):  # not while another command takes or gives it back
        if sysfs.driver(bdf) not in (None, VFIO_PCI):
            pf.check_kernel_not_using(bdf, sysfs)
        before = sysfs.driver(bdf)
        sysfs.bind_vfio(bdf)
        if claims.orphaned(sysfs, bdf) is not None:
            claims.drop(sysfs, bdf)  # bound on purpose now: no umount gives it back
        return bdf, before


def unbind(bdf: str, sysfs: Sysfs | None = None) -> str | None:
    """Give the function back to its kernel driver; returns the driver it now has."""
    require_root()
    sysfs = sysfs or Sysfs()
    bdf = normalize_bdf(bdf)
    with sysfs.owning(bdf):  # not while another command takes it
        driver = sysfs.driver(bdf)
        # no driver but held for vfio-pci (a raw unbind from vfio-pci): given back too
        if driver != VFIO_PCI and not (driver is None and sysfs.overridden_to_vfio(bdf)):
            raise VfsdrvError(f"{bdf} is not bound to vfio-pci (driver: "
                              f"{driver or 'none'}); nothing to give back")
        users = vfio_users(sysfs, bdf) if driver == VFIO_PCI else []
        if users:
            raise DeviceBusyError(
                f"{bdf} is in use through VFIO by {', '.join(users)}: unmount it first "
                "(`vfsdrv umount MOUNTPOINT`) or stop that process")
        now = sysfs.unbind_vfio(bdf)
        claims.drop(sysfs, bdf)
        return now


def run_bind(args: argparse.Namespace) -> int:
    if bool(args.bdf) == bool(args.tag):  # a usage error (status 2), as unbind's missing BDF
        args.command_parser.error("give the function's address or --tag TAG (one of them)")
    bdf, before = bind(args.bdf, args.tag)
    if before == VFIO_PCI:
        print(f"{bdf} is already bound to vfio-pci")
    else:
        print(f"{bdf}: bound to vfio-pci (was {before or 'no driver'})")
    sys.stdout.flush()
    return 0


def run_unbind(args: argparse.Namespace) -> int:
    if bool(args.bdf) == bool(args.tag):  # as bind's
        args.command_parser.error("give the function's address or --tag TAG (one of them)")
    bdf = normalize_bdf(args.bdf) if args.bdf else pf.find_by_tag(args.tag)
    now = unbind(bdf)
    print(f"{bdf}: given back to {now or 'no driver'}")
    return 0
