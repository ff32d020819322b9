"""`vfsdrv check`: conformance checks of a virtio-fs device from the driver's side.

    vfsdrv check (--tag TAG | --device BDF | --vhost-user SOCKET) [--json] [--junit FILE]
                 [--request-queues N] [--timeout S] [--no-notification] [--read-only]
                 [--ring split|packed]

Each check is tied to the items it observes in the device-normative checklist
(D1..D89: every device MUST/SHOULD of virtio 1.3 chapter 2, §4.1, §5.11 and the
reserved feature bits, docs/conformance.rst) and ends pass, fail or skip with the
value observed; a pass marked * is a known deviation of common devices. The last
line (and `coverage` in --json) says how many items were covered and which are not
observable, with the reason. Exit status 0 only when no check failed (1: a check
failed or the device could not be reached).

The FUSE checks work in a scratch directory (.vfsdrv-check-PID) created in the
export's root and removed at the end; --read-only skips them.

PCI (--device/--tag): the capabilities are read through sysfs, then the
function is opened through VFIO (bound to vfio-pci for the check and given
back to its kernel driver afterwards). A function the kernel has mounted is
refused. vhost-user: --tag and --request-queues supply the config for a
backend without config space (virtiofsd); those config checks are then skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..cliargs import fs_tag, int_range, nonempty_path, notify_code, seconds
from ..conformance import CheckOptions, Report, run_checks
from ..conformance.runner import check_pci_function
from ..errors import VfsdrvError
from ..fs.abi import DEFAULT_NOTIFY_LOCK_CODE
from ..fs.config import MAX_REQUEST_QUEUES

DEFAULT_TAG = "vfsdrv"
log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help="conformance checks of a virtio-fs device (table or --json)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("device (one of)")
    src.add_argument("--vhost-user", metavar="SOCKET", type=nonempty_path,
                     help="a vhost-user-fs backend's socket")
    src.add_argument("--device", metavar="BDF", help="a virtio-fs PCI function (VFIO)")
    src.add_argument("--tag", type=fs_tag, help="the virtio-fs PCI function with this tag; with "
                     "--vhost-user: the tag to assume when the backend has no config space")
    p.add_argument("--request-queues", type=int_range(1, MAX_REQUEST_QUEUES), default=1,
                   metavar="N",
                   help="with --vhost-user and no config space: request queues (default 1)")
    p.add_argument("--timeout", type=seconds, default=5.0, metavar="S",
                   help="seconds to wait for each answer and each reset (default 5)")
    p.add_argument("--no-notification", action="store_true",
                   help="do not negotiate VIRTIO_FS_F_NOTIFICATION even when offered")
    p.add_argument("--read-only", action="store_true",
                   help="create nothing in the export (the checks that need a scratch "
                   "directory are skipped)")
    p.add_argument("--ring", choices=("split", "packed"), default=None,
                   help="virtqueue layout (default: packed when offered, else split)")
    p.add_argument("--notify-lock-code", type=notify_code, default=DEFAULT_NOTIFY_LOCK_CODE,
                   metavar="N", help="notify code the device sends FUSE_NOTIFY_LOCK with "
                   "(default %(default)s, the virtio-fs proposal), as vfsdrv mount's")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: {device, transport, ok, summary, negotiated, "
                   "ring_layout, coverage: {covered, not_observable, not_reached, "
                   "checklist_size}, incomplete, checks: [{id, statement, result, observed, "
                   "refs, deviation?}]}; when the check cannot run at all: "
                   "{device, ok: false, error}")
    p.add_argument("--junit", metavar="FILE",
                   help="also write the results as JUnit XML to FILE (for a CI system)")
    p.set_defaults(func=run_check)


class CheckUsageError(VfsdrvError):
    pass


def run_check(args: argparse.Namespace) -> int:
    try:
        return _run_check(args)
    except CheckUsageError as exc:
        usage = getattr(args, "command_parser", None)
        if usage is not None:  # a bad command line (also one found once the device
            usage.error(str(exc))  # answered): status 2, as argparse's own
        raise


def _run_check(args: argparse.Namespace) -> int:
    if args.vhost_user and args.device:
        raise CheckUsageError("give one of --vhost-user SOCKET, --device BDF or --tag TAG")
    if not (args.vhost_user or args.device or args.tag):
        raise CheckUsageError("which device? give --vhost-user SOCKET, --device BDF or --tag TAG")
    if args.junit and (os.path.isdir(args.junit)
                       or not os.path.isdir(os.path.dirname(os.path.abspath(args.junit)))):
        raise CheckUsageError(f"--junit {args.junit}: not a file in an existing directory")
    opts = CheckOptions(timeout=args.timeout, notification=not args.no_notification,
                        read_only=args.read_only, ring=args.ring,
                        notify_lock_code=args.notify_lock_code)
    try:
        if args.vhost_user:
            report = check_vhost_user(args.vhost_user, opts, tag=args.tag,
                                      request_queues=args.request_queues)
        else:
            report = check_pci(args.device, args.tag, opts)
    except VfsdrvError as exc:
        if args.json:  # a program reading stdout gets an answer it can parse
            print(json.dumps({"device": args.vhost_user or args.device or args.tag,
                              "ok": False, "error": str(exc)}, indent=2))
            sys.stdout.flush()
        raise
    print(report.to_json() if args.json else report.table())
    sys.stdout.flush()
    if args.junit:  # after the report: a path that cannot be written loses nothing
        try:
            with open(args.junit, "w", encoding="utf-8") as f:
                f.write(report.junit())
        except OSError as exc:
            raise VfsdrvError(f"cannot write the JUnit report to {args.junit}: "
                              f"{exc.strerror}") from None
    return 0 if report.ok else 1


def check_vhost_user(socket_path: str, opts: CheckOptions, *, tag: str | None = None,
                     request_queues: int = 1) -> Report:
    from ..fs.config import encode_config
    from ..virtio.vhost_user import VhostUserTransport
    from .mount import accepted_keywords

    transport = VhostUserTransport(
        socket_path, config=encode_config(tag or DEFAULT_TAG, request_queues),
        num_queues=1 + request_queues,
        **accepted_keywords(VhostUserTransport, timeout=opts.timeout),  # per message
    )
    try:
        opts.config_supplied = not transport.has_config_space
        if transport.has_config_space and (tag is not None or request_queues != 1):
            # as vfsdrv mount says it: the device's own config space is what is checked
            log.warning("--tag/--request-queues ignored: the device has a config space "
                        "of its own (its tag and num_request_queues are checked)")
        offered = transport.backend_queue_num
        if not transport.has_config_space and offered is not None and offered >= 2 \
                and 1 + request_queues > offered:  # (fewer than 2: the device's fault)
            # the count is ours, not the device's: a bad command line, not a failed check
            raise CheckUsageError(
                f"--request-queues {request_queues}: the backend has {offered} queue(s), "
                f"so at most {offered - 1} request queue(s) besides hiprio")
        report = Report(device=socket_path, transport="vhost-user")
        return run_checks(transport, report, opts)
    finally:
        transport.close()


def check_pci(bdf: str | None, tag: str | None, opts: CheckOptions) -> Report:
    from ..pci.errors import DeviceBusyError
    from ..pci.resource import SysfsFunction
    from ..pci.sysfs import Sysfs, normalize_bdf, require_root
    from . import pci_functions as pf
    from .devices import with_holders

    require_root()
    sysfs = Sysfs()
    bdf = normalize_bdf(bdf) if bdf else pf.find_by_tag(tag or "", sysfs)
    report = Report(device=bdf, transport="virtio-pci (VFIO)")
    with SysfsFunction(bdf, sysfs) as sfn:
        usable = check_pci_function(report, sfn, opts)
    if not usable:
        return report
    def give_back() -> None:
        # to the driver it had (virtio-pci), also after a failure
        with sysfs.owning(bdf):
            if before != "vfio-pci" and sysfs.driver(bdf) == "vfio-pci":
                sysfs.unbind_vfio(bdf)

    with sysfs.owning(bdf):  # one taker at a time (see vfsdrv mount)
        before = sysfs.driver(bdf)
        try:
            transport = pf.open_fs_function(bdf)
        except BaseException as exc:
            give_back()
            if isinstance(exc, DeviceBusyError):
                raise with_holders(exc, sysfs, bdf) from None
            raise
    try:
        return run_checks(transport, report, opts)
    finally:
        transport.close()
        give_back()
