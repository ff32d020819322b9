"""`vfsdrv mount` and `vfsdrv umount`, and the `mount.vfsdrv` helper for mount(8).

    vfsdrv mount [--tag TAG | --device BDF | --vhost-user SOCKET] [--frontend relay|pyfuse3]
                 [-o OPTIONS] [-f] [-d] MOUNTPOINT
    vfsdrv umount [-l] MOUNTPOINT
    mount -t vfsdrv SPEC MOUNTPOINT -o OPTIONS     (SPEC: a vhost-user socket path,
        vhost-user:PATH, pci:BDF, or a tag; vfsdrv options in -o: tag=, request_queues=,
        threads=, frontend=, timeout=, ring=, iommu=, log=, fsname=, poll,
        force_4k_noiommu, debug (as vfsdrv mount's options of those names); the relay's
        options as with vfsdrv mount -o, e.g. poll_us=N; -f checks the line and mounts
        nothing; -s drops unknown options with a warning; -N NAMESPACE mounts in that
        mount namespace (a pid or a path); exit status 1 for a bad line, 32 for a
        failed mount, as mount(8))

`mount` returns once the file system is usable: it forks, the child brings the
device up, mounts and serves; the parent waits for the child's word on a pipe and
exits 0, or prints the child's error and exits 1. With -f it serves in the
foreground; -d logs every request (and implies -f). SIGTERM/SIGINT/SIGHUP unmount cleanly
(a busy mount: its dirty pages written back first, up to 30 s, a second signal stops
that wait; then detached and served 3 s more); so do `vfsdrv umount`, `umount` and
`fusermount3 -u`. A failure at any step leaves
nothing mounted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import logging.handlers
import os
import re
import select
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..cliargs import broken_pipe_exit, fs_tag, int_range, nonempty_path, notify_code, seconds
from ..errors import VfsdrvError
from ..frontends.base import DEFAULT_FRONTEND, FRONTENDS, get_frontend
from ..frontends.fuse_dev import (
    DEV_FUSE,
    FLAG_OPTIONS,
    FS_SUBTYPE,
    MountError,
    MountOptions,
    check_mountpoint,
    is_ignored,
    libfuse_refused,
    mount_entry,
    mount_flags_of,
    mount_present,
    mount_table,
    option_words,
    remount,
    require_root,
    umount,
)
from ..fs.abi import DEFAULT_NOTIFY_LOCK_CODE
from ..fs.config import MAX_REQUEST_QUEUES, encode_config
from ..fs.device import VirtioFs
from ..virtio.device import RING_LAYOUTS

log = logging.getLogger(__name__)

DEFAULT_VHOST_USER_TAG = "vfsdrv"
#: how long `mount` waits for the serving process to report the mount usable
READY_TIMEOUT = 60.0
BDF_RE = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


T = TypeVar("T")
#: --iommu / -o iommu=: how a PCI function's DMA is set up through VFIO
IOMMU_MODES = ("auto", "type1", "iommufd", "noiommu")
#: --small-slots/--large-slots at most: no ring has more entries than 32768, so more
#: buffers than twice that can never all be in flight
MAX_SLOTS = 65536

@dataclass
class MountRequest:
    mountpoint: str
    vhost_user: str | None = None
    device: str | None = None
    tag: str | None = None
    #: None: 1 without config space, all the device has with it
    request_queues: int | None = None
    #: native pumps (one per request queue) at most; None: one per queue
    threads: int | None = None
    frontend: str = DEFAULT_FRONTEND
    options: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    poll: bool = False
    small_slots: int = 64
    large_slots: int = 16
    notify_lock_code: int = DEFAULT_NOTIFY_LOCK_CODE
    no_notification: bool = False
    log_file: str | None = None
    #: seconds each exchange with the device may take (None: the transport's default)
    timeout: float | None = None
    #: the source recorded in the mount table: the spec as the user gave it
    source: str | None = None
    bound_here: str | None = None  # a PCI function this command bound to vfio-pci
    iommu: str = "auto"  # VFIO backend for a PCI function (pci/device.py BACKENDS)
    #: no-IOMMU DMA on 4 KiB pages that the kernel may migrate: only when forced
    force_4k_noiommu: bool = False
    ring: str | None = None  # virtqueue layout forced: split|packed (None: packed if offered)
    fake: bool = False  # mount.vfsdrv -f: check the command line, mount nothing
    namespace: str | None = None  # mount.vfsdrv -N: the mount namespace to mount in
    #: mount -o remount: the flag options given (ro, nosuid, ...) for the mount that is
    #: there, applied over its present ones (None: a mount, not a remount)
    remount: list[str] | None = None
    nofail: bool = False  # fstab's nofail: a device that is not there is no error

    def spec(self) -> str:
        """The mount's source: what mount(8) finds in fstab for this mount."""
        if self.source:
            return self.source
        if self.vhost_user is not None:
            return f"vhost-user:{os.path.abspath(self.vhost_user)}"
        if self.device is not None:
            return f"pci:{self.device}"
        return self.tag or DEFAULT_VHOST_USER_TAG


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount", help="mount a virtio-fs device through FUSE (relay or pyfuse3)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("device (one of)")
    src.add_argument("--vhost-user", metavar="SOCKET", type=nonempty_path,
                     help="a vhost-user-fs backend's socket (virtiofsd, vfsdrv refdev)")
    src.add_argument("--device", metavar="BDF", help="a virtio-fs PCI function, through VFIO")
    src.add_argument("--tag", type=fs_tag, help="the virtio-fs PCI function with this tag; with "
                     "--vhost-user: the tag to use when the backend has no config space")
    p.add_argument("--request-queues", type=int_range(1, MAX_REQUEST_QUEUES), default=None,
                   metavar="N",
                   help="request queues to use: with --vhost-user and no config space the "
                   "backend's count (default 1); with config space at most N of the device's")
    p.add_argument("--threads", type=int_range(1, MAX_REQUEST_QUEUES), default=None,
                   metavar="N",
                   help="relay: at most N worker threads (one native pump per request "
                   "queue; default: one per queue)")
    p.add_argument("--frontend", choices=sorted(FRONTENDS), default=DEFAULT_FRONTEND,
                   help=f"how the mount is served (default {DEFAULT_FRONTEND})")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma separated (ro, nosuid, noexec, max_read=N, "
                   "noallow_other, nodefault_permissions, ...); relay: max_background=N, "
                   "congestion_threshold=N, max_readahead=N (bytes; default: the largest READ,"
                   " 1 MiB over virtiofsd, set on the mount's bdi after FUSE_INIT), and "
                   "poll_us=N (0-1000, default 0: off): with 1-4 requests in flight each pump "
                   "spins on its ring up to N microseconds before it sleeps, and with none it "
                   "reads /dev/fuse without blocking that long before it sleeps there, which "
                   "saves a fast device's completion (and a program's next request) a sleep "
                   "and wake-up but burns that pump's CPU while it spins (up to N us per "
                   "request, backing off after misses); io_uring=0|1 (default 1): each pump "
                   "writes the replies it harvested together in one io_uring_enter where the "
                   "kernel allows io_uring (0: a writev each); "
                   "request_timeout=SECONDS (decimal digits such as 30 or 2.5, from 1 to "
                   "4294967295, or 0: off; default 120): a request "
                   "queue with requests in flight and nothing completed for that long, or one "
                   "request left unanswered that long while later ones are answered, means "
                   "the device is dead: waiting programs get an error, the mount stays and "
                   "answers ENOTCONN until it is unmounted (a SETLKW waiting for its lock, "
                   "an FSYNC or FSYNCDIR do not count, nor do requests while an FSYNC is in "
                   "flight on their queue)")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("-d", "--debug", action="store_true",
                   help="log every request (opcode, unique, nodeid, result); implies -f")
    p.add_argument("--poll", action="store_true",
                   help="poll the device's rings instead of waiting for interrupts")
    p.add_argument("--small-slots", type=int_range(1, MAX_SLOTS), default=64, metavar="N",
                   help="DMA buffers for small requests (bounds requests in flight; default 64)")
    p.add_argument("--large-slots", type=int_range(1, MAX_SLOTS), default=16, metavar="N",
                   help="DMA buffers of 1 MiB + 12 KiB for big reads/writes (default 16)")
    p.add_argument("--notify-lock-code", type=notify_code, default=DEFAULT_NOTIFY_LOCK_CODE,
                   metavar="N", help="notify code of FUSE_NOTIFY_LOCK (default %(default)s, "
                   "the virtio-fs proposal; mainline FUSE's RESEND shares 7 and is told "
                   "apart by length)")
    p.add_argument("--no-notification", action="store_true",
                   help="do not negotiate VIRTIO_FS_F_NOTIFICATION (no blocking locks)")
    p.add_argument("--log", metavar="FILE", type=nonempty_path,
                   help="append the server's messages to FILE (also with -f and -d; without "
                   "it a background server logs to syslog/the journal)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="how long the device may take to answer each setup message and "
                   "FUSE_INIT (default: the transport's, 10 s for vhost-user; FUSE_INIT 10 s "
                   "over PCI); the mount fails naming the device")
    p.add_argument("--force-4k-noiommu", action="store_true",
                   help="without an IOMMU, use 4 KiB pages for DMA even though the kernel may "
                   "move them (memory corruption); reserve huge pages instead "
                   "(echo N > /proc/sys/vm/nr_hugepages)")
    p.add_argument("--iommu", choices=IOMMU_MODES, default="auto",
                   help="how a PCI function's DMA is set up through VFIO (default: iommufd "
                   "when the kernel has it, else the group's type1 or no-IOMMU container)")
    p.add_argument("--ring", choices=RING_LAYOUTS, default=None,
                   help="virtqueue layout (default: packed when the device offers "
                   "VIRTIO_F_RING_PACKED, else split)")
    p.add_argument("mountpoint", type=nonempty_path)
    p.set_defaults(func=run_mount)

    u = sub.add_parser("umount", help="unmount a vfsdrv mount",
                       description="Unmount a vfsdrv FUSE mount (the serving process then "
                       "ends the device session and exits).")
    u.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if busy; the file system goes when no longer used")
    u.add_argument("mountpoint", type=nonempty_path,
                   help="the mount point (or the mount's source, as the mount table shows it)")
    u.set_defaults(func=run_umount)


def run_mount(args: argparse.Namespace) -> int:
    usage = args.command_parser.error  # a bad command line: status 2, with the usage
    chosen = [n for n in ("vhost_user", "device") if getattr(args, n)]
    if len(chosen) > 1:
        usage("give one of --vhost-user, --device (or --tag alone)")
    if not chosen and not args.tag:
        usage("which device? give --vhost-user SOCKET, --device BDF or --tag TAG")
    if args.device and args.tag:
        usage("give --device BDF or --tag TAG, not both (--tag with --vhost-user names a "
              "backend that has no config space)")
    req = MountRequest(
        mountpoint=args.mountpoint, vhost_user=args.vhost_user, device=args.device,
        tag=args.tag, request_queues=args.request_queues, threads=args.threads,
        frontend=args.frontend,
        options=args.options, foreground=args.foreground or args.debug, debug=args.debug,
        poll=args.poll, small_slots=args.small_slots, large_slots=args.large_slots,
        notify_lock_code=args.notify_lock_code, no_notification=args.no_notification,
        log_file=args.log, timeout=args.timeout, iommu=args.iommu, ring=args.ring,
        force_4k_noiommu=args.force_4k_noiommu,
    )
    try:
        check_request(req)
    except MountError as exc:
        usage(str(exc))
    for opt in (o for group in req.options for o in group.split(",")):
        if opt and is_ignored(opt.partition("=")[0]):  # mount.vfsdrv drops these itself
            log.warning("-o %s is for fstab and mount(8) (mount.vfsdrv); vfsdrv mount "
                        "ignores it", opt)
    return mount(req)


def run_umount(args: argparse.Namespace) -> int:
    from .status import forget_dead, forget_ending

    require_root("unmounting")
    try:
        mp, fstype = find_mount(args.mountpoint)
    except MountError:
        by_source = [m for m, t, source in mount_table()
                     if t == f"fuse.{FS_SUBTYPE}" and source == args.mountpoint]
        if len(by_source) == 1:  # the source, as umount(8) takes it (vhost-user:PATH)
            mp, fstype = by_source[0], f"fuse.{FS_SUBTYPE}"
        elif by_source:
            raise MountError(f"{len(by_source)} vfsdrv mounts have the source "
                             f"{args.mountpoint}: name the mount point") from None
        else:
            # no mount there (it was removed with plain umount, or never made): a PCI
            # function its killed server left bound is still given back
            given = _give_back_orphans(args.mountpoint)
            if not given:
                raise
            forget_dead()
            return 0
    if fstype != f"fuse.{FS_SUBTYPE}":
        raise MountError(f"{args.mountpoint} is a {fstype} mount, not a vfsdrv one")
    try:
        umount(mp, lazy=args.lazy)
    except OSError as exc:
        hint = " (files are open there; -l detaches it anyway)" if exc.errno == 16 else ""
        raise MountError(f"cannot unmount {args.mountpoint}: {exc.strerror}{hint}") from None
    # a server killed with SIGKILL left its PCI function on vfio-pci (give it back)
    # and its status socket (remove it)
    _give_back_orphans(mp)
    forget_dead()
    if mp not in {m for m, _t, _s in mount_table()}:  # (a mount below keeps its record)
        forget_ending(mp)
    return 0


def _give_back_orphans(mountpoint: str) -> list[str]:
    try:
        from . import claims
    except ImportError:  # no PCI support: nothing was bound
        return []
    lines = claims.give_back_orphans(os.path.realpath(mountpoint))
    for line in lines:
        print(f"vfsdrv: {line}", file=sys.stderr)
    return lines


def find_mount(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the mount on `path`, found in /proc/self/mountinfo by
    its name. The mount point itself is never looked at: with a stuck device a stat
    of it would wait forever. Only the directories above it may be resolved (for a
    path through a symlink), and only when the name as given is not in the table."""
    if not path:  # abspath("") is the current directory
        raise MountError("the mount point is an empty path")
    table = mount_table()

    def lookup(candidate: str) -> str | None:
        types = [t for m, t, _s in table if m == candidate]
        return types[-1] if types else None

    given = os.path.normpath(os.path.abspath(path))
    fstype = lookup(given)
    for _ in range(40):  # symlinks followed at most (the kernel's own limit)
        if fstype is not None:
            break
        parent, name = os.path.split(given)
        resolved = os.path.join(os.path.realpath(parent), name)
        fstype = lookup(resolved)
        given = resolved
        if fstype is None:
            # a symlink to the mount point: read the link itself (not a mount point,
            # since its name is not in the table, so this touches no mount)
            try:
                target = os.readlink(resolved)
            except OSError:
                break
            given = os.path.normpath(os.path.join(os.path.dirname(resolved), target))
            fstype = lookup(given)
    if fstype is None:
        raise MountError(f"{path} is not mounted")
    return given, fstype


# -- checks, device, serving -------------------------------------------------------------
def check_request(req: MountRequest) -> None:
    """The request's own checks (options and how they combine), nothing looked up on
    the machine: a failure here is a bad command line."""
    _take_fsname(req)
    for group in req.options:
        for opt in group.split(","):
            key = opt.partition("=")[0]
            if key in HELPER_OWN_KEYS:
                # mount.vfsdrv's spelling of a vfsdrv mount option (fstab has no --)
                raise MountError(f"-o {opt}: that is how fstab and mount.vfsdrv spell it; "
                                 f"vfsdrv mount takes --{key.replace('_', '-')}")
            if key == "blksize":
                raise MountError("blksize= is for block-device FUSE mounts (fuseblk) only; the "
                                 "kernel refuses it on a vfsdrv mount: leave it out")
    options = MountOptions.parse(req.options)
    options.check()
    if req.frontend not in FRONTENDS:
        raise MountError(f"unknown frontend {req.frontend!r}")
    if req.frontend == "pyfuse3" and (why := libfuse_refused(options)):
        raise MountError(why)  # before the device is connected (virtiofsd serves once)
    if req.threads is not None and req.frontend != "relay":
        raise MountError("--threads sets the relay's native pumps; the pyfuse3 frontend "
                         "serves on one thread: use the relay frontend, or leave it out")
    if req.vhost_user is not None and req.iommu != "auto":
        raise MountError("--iommu is for a PCI function (--tag, --device) through VFIO; "
                         "a vhost-user backend has no IOMMU to choose: leave it out")
    if req.vhost_user is not None and req.force_4k_noiommu:
        raise MountError("--force-4k-noiommu is for a PCI function in no-IOMMU mode; a "
                         "vhost-user backend shares memory, it does not DMA: leave it out")
    if req.device is not None and not BDF_RE.match(req.device):
        raise MountError(f"{req.device!r} is not a PCI address (like 0000:00:04.0)")


def precheck(req: MountRequest) -> None:
    """Everything that can be told before forking, with a clear message."""
    require_root()
    check_request(req)
    if not os.path.exists(DEV_FUSE):
        raise MountError(f"{DEV_FUSE} is missing: load the fuse module (`modprobe fuse`)")
    req.mountpoint = check_mountpoint(req.mountpoint)
    get_frontend(req.frontend)  # importable?
    if req.vhost_user is not None:
        req.vhost_user = os.path.abspath(req.vhost_user)  # the server leaves the cwd
        try:
            st = os.stat(req.vhost_user)
        except FileNotFoundError:
            raise DeviceNotFoundError(
                f"vhost-user socket {req.vhost_user} does not exist (is the backend running?)"
            ) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise MountError(f"{req.vhost_user} is not a socket")
    if req.request_queues is not None and req.request_queues < 1:
        raise MountError("--request-queues must be at least 1")
    if req.threads is not None and req.threads < 1:
        raise MountError("--threads must be at least 1")
    if req.small_slots < 1 or req.large_slots < 1:
        raise MountError("--small-slots and --large-slots must be at least 1")
    if req.vhost_user is None:
        _pci_function_there(req)


def _pci_function_there(req: MountRequest) -> None:
    """A PCI function named by address or tag exists (looked up before forking, so that
    fstab's nofail can tell "not there" from a failure; the server looks again)."""
    try:
        from ..pci.errors import BadAddressError
        from ..pci.sysfs import normalize_bdf
        from . import pci_functions as pf
    except ImportError:
        return  # no PCI support here: the server says so
    try:
        if req.device is not None:
            bdf = normalize_bdf(req.device)
            if not os.path.exists(f"/sys/bus/pci/devices/{bdf}"):
                raise DeviceNotFoundError(f"no PCI function {bdf} (`lspci -D` lists them)")
        elif req.tag is not None:
            pf.find_by_tag(req.tag)
    except BadAddressError as exc:
        if req.device is not None:  # a malformed address: a bad line, not "not there"
            raise MountError(str(exc)) from None
        raise DeviceNotFoundError(str(exc)) from None


def _take_fsname(req: MountRequest) -> None:
    """-o fsname=NAME: the source shown in the mount table (taken out of the options)."""
    kept = []
    for group in req.options:
        rest = []
        for opt in group.split(","):
            key, _, value = opt.partition("=")
            if key == "fsname" and value:
                req.source = value
            elif opt:
                rest.append(opt)
        if rest:
            kept.append(",".join(rest))
    req.options = kept


def open_device(req: MountRequest) -> VirtioFs:
    """The started virtio-fs device the request names."""
    log.info("bringing up %s%s", req.spec(),
             f" (each message may take {req.timeout:g} s)" if req.timeout is not None else "")
    if req.vhost_user is not None:
        from ..virtio.vhost_user import VhostUserTransport

        tag = req.tag or DEFAULT_VHOST_USER_TAG
        # used only when the backend has no config space (virtiofsd): read it otherwise
        extra = accepted_keywords(VhostUserTransport, timeout=req.timeout)
        wanted = req.request_queues or 1
        transport = VhostUserTransport(
            req.vhost_user, config=encode_config(tag, wanted), num_queues=1 + wanted, **extra,
        )
        backend_queues = transport.num_queues()
        if not transport.has_config_space and 1 + wanted > backend_queues:
            transport.close()
            raise MountError(
                f"the backend has {backend_queues} queues (hiprio + request queues): "
                f"--request-queues {wanted} is too many, at most "
                f"{max(1, backend_queues - 1)}"
            )
    else:
        transport = _pci_transport(req)
    try:
        fs = VirtioFs(transport, poll=req.poll, small_slots=req.small_slots,
                      large_slots=req.large_slots, notify_lock_code=req.notify_lock_code,
                      notification=not req.no_notification,
                      request_queues=req.request_queues)
        fs.dev.ring = req.ring
        fs.start()
        _warn_config_space(req, fs)
        return fs
    except BaseException:
        transport.close()
        _give_back(req)
        raise


def _warn_config_space(req: MountRequest, fs: VirtioFs) -> None:
    """A device with config space names its own tag and queue count: say so when the
    command line asked for something else (it cannot apply)."""
    if req.vhost_user is None or not getattr(fs.transport, "has_config_space", False):
        return
    cfg = fs.config
    assert cfg is not None
    if req.tag and req.tag != cfg.tag:
        log.warning("--tag %r ignored: the device's config space names it %r", req.tag,
                    cfg.tag)
    if req.request_queues and req.request_queues != cfg.num_request_queues:
        log.warning("--request-queues %d: the device has %d request queue(s); using %d",
                    req.request_queues, cfg.num_request_queues, len(fs.request_queues))


def accepted_keywords(func: Callable, **kwargs: object) -> dict[str, object]:
    """The keywords `func` takes, of those given (not None): options that need a
    newer transport are passed only when it has them."""
    import inspect

    params = inspect.signature(func).parameters
    given = {k: v for k, v in kwargs.items() if v is not None}
    dropped = [k for k in given if k not in params]
    if dropped:
        log.debug("%s does not take %s yet: ignored", getattr(func, "__name__", func),
                    ", ".join(dropped))
    return {k: v for k, v in given.items() if k in params}


def _pci_transport(req: MountRequest):
    """A VFIO transport for --device BDF or --tag TAG. A function this command binds
    to vfio-pci goes back to its driver when the command ends (or fails)."""
    try:
        from ..pci.errors import DeviceBusyError
        from ..pci.sysfs import Sysfs, normalize_bdf
        from . import claims
        from . import pci_functions as pf
    except ImportError as exc:
        raise MountError(f"the VFIO/PCI transport is not available: {exc}") from exc
    sysfs = Sysfs()
    bdf = normalize_bdf(req.device) if req.device is not None else pf.find_by_tag(req.tag)
    # one taker at a time (another vfsdrv, a udev autobind): the loser finds the
    # function bound and busy, and gives back nothing it did not bind
    with sysfs.owning(bdf):
        if sysfs.driver(bdf) != "vfio-pci":
            req.bound_here = bdf
        elif (left := claims.orphaned(sysfs, bdf)) is not None and \
                not _vfio_users(sysfs, bdf):
            # (held through VFIO by someone, it is theirs now: the open below says busy)
            log.info("%s was left on vfio-pci by a vfsdrv mount that is gone (pid %d, %s): "
                     "this one takes the binding over", bdf, left.pid, left.mountpoint)
            req.bound_here = bdf
        if req.bound_here is not None:
            claims.record(sysfs, bdf, req.mountpoint)
        try:
            t = pf.open_fs_function(bdf, poll=req.poll, backend=req.iommu,
                                    allow_unpinned_4k=req.force_4k_noiommu)
            t.timeout = req.timeout  # FUSE_INIT's, as over vhost-user
            return t
        except BaseException as exc:
            _give_back(req)
            if isinstance(exc, DeviceBusyError):
                from .devices import with_holders

                raise with_holders(exc, sysfs, bdf) from None
            raise


def _vfio_users(sysfs, bdf: str) -> list[str]:
    from .devices import vfio_users

    return vfio_users(sysfs, bdf)


def _give_back(req: MountRequest) -> None:
    if req.bound_here is None:
        return
    from ..pci.errors import BadAddressError
    from ..pci.sysfs import Sysfs
    from . import claims

    bdf, req.bound_here = req.bound_here, None
    sysfs = Sysfs()
    with sysfs.owning(bdf):
        try:
            if sysfs.driver(bdf) == "vfio-pci":
                sysfs.unbind_vfio(bdf)
        except BadAddressError:
            log.info("%s is gone (removed): nothing to give back", bdf)
            sysfs.forget(bdf)
        except VfsdrvError as exc:
            log.error("could not give %s back to its driver: %s", bdf, exc)
            return  # the claim stays: `vfsdrv list` names the binding nobody serves
        claims.drop(sysfs, bdf)


def serve(req: MountRequest, ready: Callable[[], None] | None = None) -> None:
    """Bring the device up, mount, serve until unmounted; close the device. Once the
    mount is usable: the control socket of `vfsdrv status` opens, systemd hears
    READY=1 (Type=notify), then `ready` runs. The figures are logged at exit."""
    from .status import StatusServer

    fs = open_device(req)
    started = time.monotonic()
    server: StatusServer | None = None
    runner: object = None
    mounted: list[tuple[str, str, str] | None] = [None]  # our mountinfo entry, once ready
    figures = lambda: mount_figures(req, fs, runner, started, mounted[0])  # noqa: E731

    def on_ready() -> None:
        nonlocal server
        mounted[0] = mount_entry(req.mountpoint)
        from .status import forget_ending

        forget_ending(req.mountpoint)  # why an earlier mount here ended: not this one's
        try:
            server = StatusServer(figures, identity=mount_identity(req)).start()
        except OSError as exc:
            log.warning("no status socket (vfsdrv status lists this mount without its "
                        "figures): %s", exc)
        sd_notify(f"READY=1\nSTATUS=serving {req.spec()} on {req.mountpoint}")
        if ready is not None:
            ready()  # a background server logs to its log from here on
        log.info("mounted %s on %s (pid %d)", req.spec(), req.mountpoint, os.getpid())

    try:
        if req.frontend == "relay":
            from ..frontends.relay import Relay

            # the source in the mount table is the spec, so that mount(8) sees an fstab
            # line as mounted
            relay = Relay(fs, req.mountpoint, options=req.options, debug=req.debug,
                          ready=on_ready, source=req.spec(), threads=req.threads)
            runner, run = relay, relay.run
        else:
            def run() -> None:
                get_frontend(req.frontend)(fs, req.mountpoint, options=req.options,
                                           debug=req.debug, ready=on_ready, source=req.spec())
        try:
            run()
        except VfsdrvError as exc:
            # a failed device leaves the mount, as a dead daemon's: say why there
            if mounted[0] is not None and mount_present(mounted[0]):
                from .status import record_ending

                record_ending(req.mountpoint, req.spec(), str(exc))
            raise
    finally:
        if server is not None:  # it was mounted and served
            sd_notify("STOPPING=1")
            server.stop()
            try:
                final = figures()
                final.pop("detached", None)  # the mount is gone by now, whichever way
                log.info("at exit: %s", json.dumps(final, default=str))
            except Exception as exc:  # noqa: BLE001 - must not mask the real outcome
                log.warning("no figures at exit: %s", exc)
        fs.close()
        _give_back(req)


def _log_info() -> None:
    """In a log (file, syslog), mount, unmount and the exit figures are there at INFO
    whatever -v says."""
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def mount_identity(req: MountRequest) -> dict[str, object]:
    """Which mount this server serves: the head of its status figures, and what its
    status identity file says when it does not answer."""
    return {"mountpoint": req.mountpoint, "source": req.spec(), "pid": os.getpid(),
            "frontend": req.frontend}


def mount_figures(req: MountRequest, fs: VirtioFs, runner: object, started: float,
                  mounted: tuple[str, str, str] | None = None) -> dict[str, object]:
    """What `vfsdrv status` shows for this mount. The relay's own status() when it has
    one; otherwise what can be read from the device and the relay's counters.
    `mounted`: the mount's mountinfo entry at ready time; "detached" says it is no
    longer in this server's mount table (unmounted lazily, still served)."""
    out: dict[str, object] = mount_identity(req)
    if mounted is not None:
        try:
            out["detached"] = not mount_present(mounted)
        except OSError:
            pass
    status = getattr(runner, "status", None)
    if callable(status):
        figures = status()
        out.update(figures)
        out.setdefault("uptime", round(time.monotonic() - started, 3))
        return out
    from ..virtio.constants import feature_names

    stats = dict(getattr(runner, "stats", {}) or {})
    dev_stats = dict(getattr(fs, "stats", {}) or {})
    queues = []
    if fs.hiprio is not None:
        queues.append({"name": "hiprio", "index": fs.hiprio.vq.index, "size": fs.hiprio.vq.size,
                       "in_flight": fs.hiprio.vq.in_flight})
    if fs.notify_vq is not None:
        queues.append({"name": "notification", "index": fs.notify_vq.index,
                       "size": fs.notify_vq.size, "buffers_posted": fs.notify_vq.in_flight})
    for q in fs.request_queues:  # named by virtqueue index, as the relay names them
        queues.append({"name": f"request{q.vq.index}", "index": q.vq.index,
                       "size": q.vq.size, "in_flight": q.vq.in_flight,
                       "waiting": len(q.pending)})
    features = feature_names(fs.dev.features, {0: "VIRTIO_FS_F_NOTIFICATION"})
    out.update({
        "device": fs.config.tag if fs.config is not None else None,
        "transport": getattr(fs.transport, "name", type(fs.transport).__name__),
        "features": [f for f in features.split(", ") if f != "none"],
        "queues": queues,
        # a frontend without counters of its own (pyfuse3): the device's
        "served": stats.get("requests", dev_stats.get("replies", 0)),
        "in_flight": getattr(runner, "inflight",
                             sum(q.vq.in_flight for q in fs.request_queues)),
        "errors": sum(v for k, v in dev_stats.items() if k.startswith("bad_")),
        "notifications": stats.get("notifications", 0),
        "lock_waiters": fs.lock_waiters,
        "uptime": round(time.monotonic() - started, 3),
        "counters": {**dev_stats, **{f"relay_{k}": v for k, v in stats.items()}},
    })
    return out


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about the service, if it asked ($NOTIFY_SOCKET)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc)
        return False
    return True


def mount(req: MountRequest) -> int:
    precheck(req)
    if req.foreground:
        if req.log_file is not None:
            # -f/-d with --log: every message (the -d request log, tracebacks) goes there
            fd = _open_log(req.log_file)
            print(f"vfsdrv: logging to {req.log_file}", file=sys.stderr, flush=True)
            os.dup2(fd, 2)
            os.close(fd)
            _log_info()
            _stamp_lines()
        serve(req)
        return 0
    return _daemonize(req)


def ready_timeout(req: MountRequest) -> float:
    """How long `mount` waits for the serving process: setup takes a handful of
    exchanges with the device, each bounded by --timeout."""
    return READY_TIMEOUT if req.timeout is None else max(5.0, 4 * req.timeout)


def _open_log(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise MountError(f"cannot open the log file {path}: {exc.strerror}") from None


def _daemonize(req: MountRequest) -> int:
    log_fd = _open_log(req.log_file) if req.log_file is not None else None
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child serves
        os.close(r)
        code = 1
        try:
            # a parent killed outright (SIGKILL) cannot stop us: until the mount is
            # ready its death is our SIGTERM (which unwinds like Ctrl-C)
            _parent_death_signal(signal.SIGTERM)
            if os.getppid() != parent:
                raise VfsdrvError("the vfsdrv mount command that started this was killed")
            os.setsid()
            code = _child(req, w, log_fd)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            if isinstance(exc, KeyboardInterrupt):
                msg = "stopped by a signal before the mount was ready"
            elif isinstance(exc, VfsdrvError | OSError | ValueError):
                msg = str(exc)
            else:
                msg = "".join(traceback.format_exception(exc)).strip()
            try:
                os.write(w, f"ERR {msg}\n".encode())
            except OSError:
                pass
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(w)
    if log_fd is not None:
        os.close(log_fd)
    data = b""
    limit = ready_timeout(req)
    deadline = time.monotonic() + limit
    # SIGTERM or SIGHUP (timeout(1), a closed terminal) ends the wait as Ctrl-C does:
    # the server being set up is stopped with us, not left behind
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                _stop_child(pid)
                raise MountError(f"the mount was not ready within {limit:g} s (waiting for "
                                 f"{req.spec()} to come up and FUSE_INIT to be answered)")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    except KeyboardInterrupt:
        _stop_child(pid)  # Ctrl-C: no server may outlive the command that started it
        raise
    finally:
        os.close(r)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    text = data.decode(errors="replace").strip()
    if text == "OK":
        return 0
    os.waitpid(pid, 0)
    if text.startswith("ERR "):
        raise MountError(text[4:])
    raise MountError("the serving process exited before the mount was ready")


def _stop_child(pid: int, grace: float = 10.0) -> None:
    """SIGTERM (it unmounts and gives everything back), SIGKILL after `grace` s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _child(req: MountRequest, w: int, log_fd: int | None) -> int:
    # until the frontend installs its own handlers, SIGTERM (from the parent on Ctrl-C
    # or timeout) unwinds like Ctrl-C: the transport closes, a PCI function goes back
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if log_fd is not None:
        os.dup2(log_fd, 2)  # --log FILE: every message, from the bring-up on (the parent
        # still prints a failure, from the pipe)
        _stamp_lines()
    readied = False

    def ready() -> None:
        nonlocal readied
        # from now on the parent is gone: detach from its terminal and pipes; messages
        # go to --log FILE, else to syslog (the journal)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(log_fd if log_fd is not None and fd == 2 else null, fd)
        os.close(null)
        if log_fd is None:
            _log_to_syslog()
        else:
            _log_info()
        _parent_death_signal(0)  # the parent exits once it reads OK: we stay
        os.chdir("/")  # a daemon pins no file system (every path in use is absolute)
        os.write(w, b"OK\n")
        os.close(w)
        readied = True

    try:
        serve(req, ready)
    except BaseException as exc:
        if not readied:
            if log_fd is not None:  # the parent prints it; the log keeps it too
                log.error("mounting %s on %s failed: %s", req.spec(), req.mountpoint,
                          "stopped by a signal" if isinstance(exc, KeyboardInterrupt) else exc)
            raise  # the parent reports it
        log.error("serving %s on %s failed: %s", req.spec(), req.mountpoint, exc,
                  exc_info=not isinstance(exc, VfsdrvError | OSError | KeyboardInterrupt))
        return 1
    return 0


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): `sig` when the parent dies (0: none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, ctypes.c_ulong(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _stamp_lines() -> None:
    """--log FILE: each line with its time and the server's pid, as in mount.log, so
    that runs appended to one file can be told apart."""
    fmt = logging.Formatter(f"%(asctime)s vfsdrv[{os.getpid()}]: %(levelname)s: %(name)s: "
                            "%(message)s")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler):
            handler.setFormatter(fmt)


#: mount.log's size past which a starting server moves it to mount.log.1 (one kept)
MOUNT_LOG_LIMIT = 1 << 20


def _rotated(path: Path) -> Path:
    """`path`, moved to PATH.1 first when it has grown past MOUNT_LOG_LIMIT: each
    server rotates it only as it starts, so that servers appending to it at once
    never rotate it under one another (the rename is atomic; a server writing on
    keeps its descriptor to the old file)."""
    try:
        if path.stat().st_size > MOUNT_LOG_LIMIT:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass  # no log yet, or not ours to move: append to what is there
    return path


def _log_to_syslog() -> None:
    """A background server's messages to syslog (the journal reads /dev/log); with
    no syslog daemon to /run/vfsdrv/mount.log, so that a dying server leaves a trace."""
    _log_info()
    root = logging.getLogger()
    fmt = logging.Formatter(f"vfsdrv[{os.getpid()}]: %(levelname)s: %(name)s: %(message)s")
    handler: logging.Handler
    try:
        if not os.path.exists("/dev/log"):
            raise OSError("no /dev/log")
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        from .status import run_dir

        try:
            run_dir().mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(_rotated(run_dir() / "mount.log"))
            fmt = logging.Formatter(f"%(asctime)s {fmt._fmt}")
        except OSError:
            return
    handler.setFormatter(fmt)
    root.addHandler(handler)


# -- mount(8) helper -----------------------------------------------------------------------
#: the helper's own options (those of `vfsdrv mount`), as typed: completion lists them
HELPER_OWN_OPTIONS = ("tag=", "request_queues=", "threads=", "frontend=", "timeout=",
                      "ring=", "iommu=", "log=", "fsname=", "poll", "debug",
                      "force_4k_noiommu")
#: those of them that `vfsdrv mount -o` does not take (it has flags for them; fsname=
#: is an -o option of both)
HELPER_OWN_KEYS = frozenset(w.rstrip("=") for w in HELPER_OWN_OPTIONS) - {"fsname"}
#: FUSE's words in the mount table (/proc/mounts) that its server sets itself: a line
#: copied from there mounts with them left out
FUSE_OWN = frozenset({"user_id", "group_id", "rootmode", "fd", "subtype"})
#: what mount(8) passes back on a remount besides those: the mount table's options,
#: and remount itself
REMOUNT_PASSED = FUSE_OWN | {"remount", "blksize", "fsname", "max_read", "nofail", "seclabel",
                              "context", "fscontext", "defcontext", "rootcontext"}


HELPER_USAGE = ("usage: mount.vfsdrv SPEC MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] "
                "[-t TYPE]")
HELPER_DOC = f"""{HELPER_USAGE}

The helper mount(8) runs for `mount -t vfsdrv`, for fstab lines of type vfsdrv, and
(installed as mount.fuse.vfsdrv too) for the type the mount table shows, fuse.vfsdrv:
`mount -o remount,...` and lines copied from /proc/mounts.

SPEC: a vhost-user socket path, vhost-user:PATH, pci:BDF, a PCI address, or a tag
(the PCI function whose virtio-fs tag it is). It is recorded as the mount's source.

-o OPTIONS, comma separated:
  mount flags: ro, rw, nosuid, nodev, noexec, sync, noatime, relatime, ... ;
  remount: change the flags of the mount that is there (its server serves on;
    FUSE takes no other option on a remount);
  fstab and systemd words, accepted and left to them: defaults, auto, noauto, user,
    nouser, users, owner, group, _netdev, comment=, x-*; nofail: a device that is
    not there (no such socket, no PCI function with that tag or address) is
    reported and the mount succeeds (status 0), as for a missing block device;
  vfsdrv's own, as `vfsdrv mount`'s options of those names: tag=, request_queues=,
    threads=, frontend=, timeout=, ring=, iommu=, log=FILE, fsname=, poll,
    force_4k_noiommu, debug;
  the FUSE and relay options of `vfsdrv mount -o`: allow_other, default_permissions,
    max_read=, max_background=, congestion_threshold=, max_readahead=, poll_us=,
    io_uring=, request_timeout=.
-f  check the line, mount nothing;  -s  drop unknown options with a warning;
-N NAMESPACE  mount in that mount namespace (a pid or a path);  -n, -v, -t: nothing
to do (mount(8) passes them).

The server runs in the background once the file system is usable; its messages go
to log=FILE, else to syslog (the journal), else to /run/vfsdrv/mount.log.
Exit status: 0 mounted (or -f: the line is good), 1 a bad command line, 32 a failed
mount, as mount(8) expects."""


def parse_helper_args(argv: list[str]) -> MountRequest:
    """mount(8)'s external helper interface: SPEC DIR [-sfnv] [-N NAMESPACE]
    [-o OPTIONS] [-t TYPE.SUBTYPE]. -f (fake): the line checked, no mount; -s (sloppy):
    unknown options are dropped with a warning; -N: mount in that mount namespace
    (a pid or a /proc/PID/ns/mnt path); -t, -n, -v: nothing to do."""
    positional: list[str] = []
    opts: list[str] = []
    fake = sloppy = False
    namespace: str | None = None
    it = iter(argv)
    for a in it:
        if a in ("-o", "-N", "-t"):
            value = next(it, None)
            if value is None:
                raise HelperUsageError(f"{a} needs a value; {HELPER_USAGE}")
            if a == "-o":
                opts.append(value)
            elif a == "-N":
                namespace = value
        elif a.startswith("-o"):
            opts.append(a[2:])
        elif a.startswith("-N"):
            namespace = a[2:]
        elif a.startswith("-t"):
            continue
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            unknown = set(a[1:]) - set("sfnv")
            if unknown:
                raise HelperUsageError(f"unknown flag -{''.join(sorted(unknown))}; "
                                       f"{HELPER_USAGE}")
            fake = fake or "f" in a
            sloppy = sloppy or "s" in a
        elif a.startswith("--"):
            raise HelperUsageError(f"unknown option {a}; {HELPER_USAGE}")
        else:
            positional.append(a)
    if len(positional) != 2:
        raise HelperUsageError(HELPER_USAGE)
    spec, mountpoint = positional
    if not mountpoint:  # "" would be the current directory
        raise HelperUsageError(f"the mount point is an empty path; {HELPER_USAGE}")
    req = MountRequest(mountpoint=mountpoint)
    req.fake = fake
    req.namespace = namespace
    keys = {o.partition("=")[0] for group in opts for o in group.split(",")}
    req.nofail = "nofail" in keys
    if "remount" in keys:
        # mount(8) passes the mount's present options with the new ones (FUSE's
        # user_id=, rootmode=, ... among them, and the fstab line's): only the mount
        # flags can change, the rest is passed over; a word nobody knows is refused
        known = set(FLAG_OPTIONS) | {w.rstrip("=") for w in option_words()} | \
            HELPER_OWN_KEYS | REMOUNT_PASSED
        unknown = sorted(k for k in keys if k and k not in known and not is_ignored(k))
        if unknown and not sloppy:
            raise HelperUsageError(f"-o remount: unknown option(s) {', '.join(unknown)}")
        req.remount = [o for group in opts for o in group.split(",") if o in FLAG_OPTIONS]
        req.source = spec
        return req
    rest: list[str] = []

    def value_of(key: str, value: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise HelperUsageError(f"-o {key}={value}: {exc}") from None

    def one_of(key: str, value: str, choices: Iterable[str]) -> str:
        if value not in choices:
            raise HelperUsageError(f"-o {key}={value}: give one of {', '.join(choices)}")
        return value

    for group in opts:
        for opt in group.split(","):
            key, _, value = opt.partition("=")
            if key == "tag":
                req.tag = value_of(key, value, fs_tag)
            elif key == "request_queues":
                req.request_queues = value_of(key, value, int_range(1, MAX_REQUEST_QUEUES))
            elif key == "threads":
                req.threads = value_of(key, value, int_range(1, MAX_REQUEST_QUEUES))
            elif key == "frontend":
                req.frontend = one_of(key, value, sorted(FRONTENDS))
            elif key == "debug":
                req.debug = True
            elif key == "poll":
                req.poll = True
            elif key == "timeout":
                req.timeout = value_of(key, value, seconds)
            elif key == "iommu":
                req.iommu = one_of(key, value, IOMMU_MODES)
            elif key == "force_4k_noiommu":
                req.force_4k_noiommu = True
            elif key == "ring":
                if value not in RING_LAYOUTS:
                    raise HelperUsageError(f"-o ring={value}: give {' or '.join(RING_LAYOUTS)}")
                req.ring = value
            elif key == "log":
                req.log_file = value
            elif key == "fsname":
                req.source = value
            elif is_ignored(key):
                continue  # fstab/systemd options: nothing for the file system
            elif key in FUSE_OWN:
                continue  # the mount table's own words, from a copied line: the server sets them
            elif opt:
                rest.append(opt)
    if sloppy and rest:
        unknown = set(MountOptions.parse([",".join(rest)]).unknown)
        for opt in (o for o in rest if o in unknown):
            print(f"mount.vfsdrv: -s: ignoring the unknown option {opt}", file=sys.stderr)
        rest = [o for o in rest if o not in unknown]
    req.options = [",".join(rest)] if rest else []
    # recorded as given: mount(8) compares it with the fstab line (`mount -a` twice)
    req.source = req.source or spec
    for prefix in ("vhost-user:", "pci:"):
        if spec == prefix:
            raise HelperUsageError(f"{spec!r} names no device: {prefix}"
                                   f"{'SOCKET' if prefix[0] == 'v' else 'BDF'}")
    if spec.startswith("vhost-user:"):
        req.vhost_user = spec[len("vhost-user:"):]
    elif spec.startswith("pci:"):
        req.device = spec[len("pci:"):]
    elif "/" in spec or _is_socket(spec):  # a socket named without a /: a path too
        req.vhost_user = spec
    elif BDF_RE.match(spec):
        req.device = spec
    else:
        req.tag = spec
    return req


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class DeviceNotFoundError(MountError):
    """The device the mount names is not there (no such socket, no PCI function with
    that tag or address; precheck tells it from a failure): what fstab's nofail
    forgives."""


class HelperUsageError(MountError):
    """A bad mount.vfsdrv command line: mount(8)'s status 1, not 32 (mount failure)."""


CLONE_NEWNS = 0x00020000


def _enter_mount_namespace(ns: str, *, check_only: bool = False) -> None:
    """-N NAMESPACE: setns(2) into that mount namespace, as mount(8)'s own -N does
    (a pid, or a path such as /proc/PID/ns/mnt). `check_only`: open it, no more."""
    path = f"/proc/{ns}/ns/mnt" if ns.isdigit() else ns
    if not os.path.isabs(path):
        raise HelperUsageError(f"-N {ns}: give a pid or an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HelperUsageError(f"-N {ns}: {path}: {exc.strerror}") from None
    if check_only:
        os.close(fd)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise HelperUsageError(f"-N {ns}: setns: {os.strerror(err)}")
    finally:
        os.close(fd)


def _remount(req: MountRequest) -> int:
    """mount -o remount,...: the kernel changes the flags of the mount that is there
    (its server goes on serving)."""
    if req.namespace is not None:
        _enter_mount_namespace(req.namespace, check_only=req.fake)
    mp, fstype = find_mount(req.mountpoint)
    if fstype != f"fuse.{FS_SUBTYPE}":
        raise HelperUsageError(f"{req.mountpoint} is a {fstype} mount, not a vfsdrv one")
    # over the mount's present flags, as mount(8) does it (the helper may be run by
    # hand with only the flags that change): an unnamed nosuid is kept, not cleared
    assert req.remount is not None
    flags = MountOptions.parse([",".join(mount_flags_of(mp) + req.remount)]).flags
    if not req.fake:
        remount(mp, flags)
    return 0


def mount_helper_main(argv: list[str] | None = None) -> int:
    """mount(8)'s exit statuses: 1 for a bad command line, 32 for a failed mount."""
    try:
        return _mount_helper(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        return broken_pipe_exit()


def _mount_helper(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="mount.vfsdrv: %(message)s")
    req: MountRequest | None = None
    if any(a in ("-h", "--help") for a in argv):
        print(HELPER_DOC)
        return 0
    if "--version" in argv:
        from .cli import version

        print(f"mount.vfsdrv {version()}")
        return 0
    try:
        req = parse_helper_args(argv)
        if req.remount is not None:
            return _remount(req)
        try:
            check_request(req)
        except HelperUsageError:
            raise
        except MountError as exc:  # the line itself is wrong: status 1
            raise HelperUsageError(str(exc)) from None
        if req.namespace is not None:  # once the whole line is known good
            _enter_mount_namespace(req.namespace, check_only=req.fake)
        if req.fake:
            return 0  # -f: the line is checked, nothing is mounted (or looked up)
        return mount(req)
    except HelperUsageError as exc:
        print(f"mount.vfsdrv: {exc}", file=sys.stderr)
        return 1
    except (VfsdrvError, OSError, ValueError) as exc:
        print(f"mount.vfsdrv: {exc}", file=sys.stderr)
        if req is not None and req.nofail and isinstance(exc, DeviceNotFoundError):
            # as libmount's own nofail: a device that is not there is not an error
            print("mount.vfsdrv: nofail: not mounted, no error", file=sys.stderr)
            return 0
        return 32
    except KeyboardInterrupt:  # nothing is left mounted or running (mount() saw to it)
        print("mount.vfsdrv: interrupted", file=sys.stderr)
        return 32


if __name__ == "__main__":
    sys.exit(mount_helper_main())
