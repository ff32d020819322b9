"""Command line of the reference device: `python -m vfsdrv.refdev` and `vfsdrv refdev`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from ..cliargs import fs_tag, int_range, notify_code
from ..fs.abi import DEFAULT_NOTIFY_LOCK_CODE
from .device import RefDevice, SocketError
from .vhost_session import LOCK_NOTIFY_LEN, MAX_REQUEST_QUEUES


def build_parser(prog: str = "vfsdrv refdev") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Reference vhost-user virtio-fs device with a notification queue "
        "and blocking POSIX/flock locks (FUSE_NOTIFY_LOCK).",
    )
    p.add_argument("--socket", required=True, help="vhost-user unix socket to listen on")
    p.add_argument("--source", required=True, help="host directory to share")
    p.add_argument("--tag", type=fs_tag, default="refdev", help="file system tag (config space)")
    p.add_argument("--request-queues", type=int_range(1, MAX_REQUEST_QUEUES), default=1,
                   metavar="N", help="request queues offered (config space "
                   "num_request_queues; default 1)")
    # a u32 in the config space
    p.add_argument("--notify-buf-size", type=int_range(LOCK_NOTIFY_LEN, 0xFFFFFFFF), default=64,
                   metavar="N", help="notify_buf_size in the config space: the smallest "
                   "notification queue buffer the driver must post (bytes; default 64)")
    p.add_argument("--max-waiting-locks", type=int_range(0, 1 << 20), default=64, metavar="N",
                   help="blocking lock requests parked at once, device-wide; more are refused "
                   "with ENOLCK "
                   "(default 64)")
    p.add_argument(
        "--notify-lock-code",
        type=notify_code,
        default=DEFAULT_NOTIFY_LOCK_CODE,
        metavar="N",
        help="notify code of FUSE_NOTIFY_LOCK (default %(default)s, the 2021 proposal)",
    )
    p.add_argument(
        "--no-notification",
        action="store_true",
        help="do not offer VIRTIO_FS_F_NOTIFICATION (blocking locks then fail, EOPNOTSUPP)",
    )
    p.add_argument(
        "--audit",
        action="store_true",
        help="auditing mode: check the driver-normative statements the device can observe "
        "and print the report on exit (exit status 1 if a MUST was violated)",
    )
    p.add_argument(
        "--audit-probe",
        action="append",
        default=[],
        metavar="NAME",
        help="auditing mode (implies --audit) that departs from the normal behaviour to "
        "test the driver: "
        "unknown-feature (offer an undefined virtio-fs feature bit), refuse-features-ok "
        "(never keep FEATURES_OK)",
    )
    p.add_argument("--ring", choices=("split", "packed"), default=None,
                   help="virtqueue layout: split (do not offer VIRTIO_F_RING_PACKED) or "
                   "packed (refuse drivers without it); default: offer packed, the driver "
                   "chooses")
    p.add_argument("--access-platform", action="store_true",
                   help="offer VIRTIO_F_ACCESS_PLATFORM: a driver that accepts it passes I/O "
                   "virtual addresses, translated through the IOTLB its vhost-user frontend "
                   "fills with IOTLB_MSG updates (needs the BACKEND_REQ protocol feature)")
    p.add_argument("-d", "--debug", action="store_true", help="log every session event")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # under `vfsdrv refdev` logging is already configured: set our level anyway
    logging.getLogger("vfsdrv.refdev").setLevel(level)
    try:
        device = RefDevice(
            args.socket,
            args.source,
            tag=args.tag,
            request_queues=args.request_queues,
            notify_buf_size=args.notify_buf_size,
            max_waiting_locks=args.max_waiting_locks,
            notification=not args.no_notification,
            notify_lock_code=args.notify_lock_code,
            audit=args.audit or bool(args.audit_probe),
            audit_probes=frozenset(args.audit_probe),
            ring=args.ring,
            access_platform=args.access_platform,
        )
    except ValueError as exc:
        print(f"refdev: {exc}", file=sys.stderr)
        return 2

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        device.serve_forever()
    except KeyboardInterrupt:
        pass
    except SocketError as exc:
        print(f"refdev: {exc}", file=sys.stderr)
        return 1
    if device.auditor is not None:  # --audit, or an --audit-probe (which implies it)
        report = device.audit_report()
        print(report.format_table(), flush=True)
        return 0 if report.ok else 1
    return 0
