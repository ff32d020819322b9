"""`vfsdrv refdev`: run the reference device (see docs/refdev.rst).

The device has its own argument parser (`vfsdrv.refdev.cli`); this command hands it
everything after `refdev`, so `python -m vfsdrv.refdev` and `vfsdrv refdev` agree.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refdev", add_help=False,
        help="run the reference vhost-user virtio-fs device (notification queue, "
        "blocking locks)",
    )
    # the manual page and completion describe the device's own parser
    p.set_defaults(func=run, pass_through=True, documented_by=_device_parser)


def _device_parser() -> argparse.ArgumentParser:
    from ..refdev.cli import build_parser  # not at every vfsdrv start: it loads the device

    return build_parser()


def run(args: argparse.Namespace) -> int:
    from ..refdev.cli import main

    return main(args.extra)
