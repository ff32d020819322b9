"""`vfsdrv` command line: one sub-command per module in vfsdrv.tools.

Each command module defines `NAME`s it serves through `register(subparsers)`,
which adds its parsers and sets `func` on them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..cliargs import broken_pipe_exit
from ..errors import VfsdrvError

#: modules of vfsdrv.tools that provide commands, in --help order
COMMAND_MODULES = [
    "mount",
    "status",
    "demo",
    "bench",
    "refdev",
    "devices",
    "check",
    "udev",
    "audit",
    "install",
]


def version() -> str:
    """The installed distribution's version (a checkout not installed says so)."""
    from importlib import metadata

    try:
        return metadata.version("vfsdrv")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _verbose_option(parser: argparse.ArgumentParser, default: int | None) -> None:
    # SUPPRESS on the sub-commands: without a -v there, what `vfsdrv -v` set stays
    parser.add_argument("-v", "--verbose", action="count",
                        default=default if default is not None else argparse.SUPPRESS,
                        help="more logging (-v info, -vv debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfsdrv",
        description="Userspace virtio-fs driver: VFIO/PCI and vhost-user transports, "
        "notification queue and blocking POSIX locks, FUSE relay.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    _verbose_option(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vfsdrv.tools.{name}").register(sub)
    _add_verbose_everywhere(sub)
    return parser


def _add_verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """-v after the sub-command (and after a sub-sub-command) too; and each command
    parser remembers itself, so that its own usage goes with an error about it."""
    for p in sub.choices.values():
        p.set_defaults(command_parser=p)  # a sub-sub-command's own default wins
        if not any("-v" in a.option_strings for a in p._actions):
            _verbose_option(p, None)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbose_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the commands' modules are still loading
        return 130
    except BrokenPipeError:
        return broken_pipe_exit()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # a command may hand its arguments to a parser of its own (refdev does)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="vfsdrv: %(levelname)s: %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise  # main() ends quietly: not an error of the command
    except VfsdrvError as exc:
        print(f"vfsdrv: error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"vfsdrv: error: {exc} (most commands need root)", file=sys.stderr)
        return 1
    except OSError as exc:
        # one line, as for the errors above; -v shows where it came from
        logging.getLogger("vfsdrv").info("the failure", exc_info=True)
        print(f"vfsdrv: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
