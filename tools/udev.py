"""`vfsdrv udev`: automatic binding of opted-in virtio-fs functions, with udev and systemd.

    vfsdrv udev install [--root DIR] [--no-reload]   rule, unit template, example config
    vfsdrv udev uninstall [--root DIR] [--no-reload]
    vfsdrv udev show [--config FILE]                 what the config decides, per function
    vfsdrv udev add BDF [--config FILE]              run by the rule when a function appears
    vfsdrv udev mount [--foreground] INSTANCE        ExecStart of vfsdrv@INSTANCE.service

The udev rule (udev/70-vfsdrv.rules.in) runs `vfsdrv udev add BDF` for every
virtio-fs function (1af4:105a) that appears. `add` reads /etc/vfsdrv.conf
(udev/vfsdrv.conf.example documents it; VFSDRV_CONF overrides the path): a
function named there by tag or address is bound to vfio-pci and, when the section
has a mountpoint, `vfsdrv@TAG.service` is started (`systemctl --no-block start`),
which mounts it through vfsdrv. Without systemd as init (containers, minimal
guests) the unit's command is started directly, detached. A function not named in
the config is left alone: it stays with the kernel's virtio-pci. What `add` did
is logged to stderr and to /run/vfsdrv/udev.log.

install overwrites only files it wrote, and uninstall removes only those, unchanged:
each ends with a stamp line (the digest of the text above it), so a file an
administrator edited, or wrote, is refused by install and kept by uninstall.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VfsdrvError
from ..pci.errors import BadAddressError
from ..pci.sysfs import Sysfs, normalize_bdf

DEFAULT_CONF = "/etc/vfsdrv.conf"
RULES_FILE = "etc/udev/rules.d/70-vfsdrv.rules"
UNIT_FILE = "etc/systemd/system/vfsdrv@.service"
CONF_EXAMPLE = "etc/vfsdrv.conf.example"
LOG_FILE = "udev.log"
UNIT_TEMPLATE = "vfsdrv@.service"
#: the last line of every file install writes, followed by the digest of the text above it
STAMP = "# written by `vfsdrv install`; edited, it is yours (uninstall keeps it). sha256 above: "
TEMPLATES = (("70-vfsdrv.rules.in", RULES_FILE), ("vfsdrv@.service.in", UNIT_FILE),
             ("vfsdrv.conf.example", CONF_EXAMPLE))


class UdevConfigError(VfsdrvError):
    pass


@dataclass
class Entry:
    kind: str  # "tag" or "pci"
    key: str  # the tag, or the normalized BDF
    bind: bool = True
    mountpoint: str | None = None
    options: list[str] = field(default_factory=list)
    frontend: str | None = None
    timeout: float | None = None  # seconds per exchange with the device

    @property
    def section(self) -> str:
        return f"{self.kind}:{self.key}"


def conf_path(path: str | None = None) -> Path:
    return Path(path or os.environ.get("VFSDRV_CONF", DEFAULT_CONF))


def load_config(path: str | Path) -> list[Entry]:
    """Parse /etc/vfsdrv.conf; a missing file is an empty config (nothing opted in)."""
    path = Path(path)
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"),
                                       interpolation=None, default_section="\0none")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UdevConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise UdevConfigError(f"{path}: {exc}") from exc
    from ..cliargs import fs_tag
    from ..frontends.base import FRONTENDS
    from ..frontends.fuse_dev import MountError
    from .mount import MountRequest, check_request

    out: list[Entry] = []
    seen: dict[tuple[str, str], str] = {}
    for name in parser.sections():
        kind, sep, key = name.partition(":")
        where = f"{path}: [{name}]"
        if not sep or kind not in ("tag", "pci") or not key:
            raise UdevConfigError(f"{where}: a section is [tag:TAG] or [pci:BDF] "
                                  "(e.g. [tag:shared], [pci:0000:00:04.0])")
        if kind == "pci":
            try:
                key = normalize_bdf(key)
            except BadAddressError as exc:
                raise UdevConfigError(f"{where}: {exc}") from exc
        else:
            try:
                fs_tag(key)
            except argparse.ArgumentTypeError as exc:
                raise UdevConfigError(f"{where}: {exc}") from None
        if (kind, key) in seen:
            raise UdevConfigError(f"{where}: the same function as [{seen[kind, key]}]")
        seen[kind, key] = name
        sec = parser[name]
        unknown = set(sec) - {"bind", "mountpoint", "options", "frontend", "timeout"}
        if unknown:
            raise UdevConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                                  "known: bind, mountpoint, options, frontend, timeout")
        try:
            bind = sec.getboolean("bind", fallback=True)
        except ValueError:
            raise UdevConfigError(f"{where}: bind = {sec['bind']!r}: use yes or no") from None
        mp = sec.get("mountpoint") or None
        if mp is not None and not mp.startswith("/"):
            raise UdevConfigError(f"{where}: mountpoint {mp!r} must be an absolute path")
        if mp is not None and not bind:
            raise UdevConfigError(f"{where}: a mountpoint needs bind = yes (vfsdrv mounts "
                                  "through vfio-pci)")
        opts = [o.strip() for o in (sec.get("options") or "").split(",") if o.strip()]
        frontend = sec.get("frontend") or None
        if frontend is not None and frontend not in FRONTENDS:
            raise UdevConfigError(f"{where}: frontend = {frontend!r}: give one of "
                                  f"{', '.join(sorted(FRONTENDS))}")
        try:  # the mount's own check (check_request), now rather than at boot in the unit
            check_request(MountRequest(mountpoint=mp or "/", options=[",".join(opts)],
                                       tag=key if kind == "tag" else None,
                                       device=key if kind == "pci" else None,
                                       **({"frontend": frontend} if frontend else {})))
        except MountError as exc:
            raise UdevConfigError(f"{where}: options: {exc}") from None
        timeout = None
        if sec.get("timeout"):
            try:
                timeout = float(sec["timeout"])
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                raise UdevConfigError(f"{where}: timeout = {sec['timeout']!r}: give seconds, "
                                      "more than 0")
        out.append(Entry(kind, key, bind, mp, opts, frontend, timeout))
    return out


def match(entries: list[Entry], bdf: str, tag: str | None) -> Entry | None:
    """The section for this function: by address first, then by tag."""
    for e in entries:
        if e.kind == "pci" and e.key == bdf:
            return e
    for e in entries:
        if e.kind == "tag" and tag is not None and e.key == tag:
            return e
    return None


def systemd_escape(text: str) -> str:
    """Unit-name escaping of `systemd-escape` (for a template instance)."""
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_")) or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out)


def unit_name(entry: Entry) -> str:
    return f"vfsdrv@{systemd_escape(entry.key)}.service"


def data_dirs(name: str = "udev") -> list[Path]:
    """Where vfsdrv's installed data (share/vfsdrv/NAME) may be, best first: a
    checkout, then the files the installed distribution's RECORD lists (right for a
    venv, --user, --prefix and system-wide installs alike), then the data paths of
    the install schemes (sysconfig) for an installation without a RECORD."""
    import sysconfig
    from importlib import metadata

    dirs = [Path(__file__).resolve().parents[1] / name]
    try:
        files = metadata.distribution("vfsdrv").files or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.parent.name == name and f.parent.parent.name == "vfsdrv" and \
                "share" in f.parts:
            dirs.append(Path(f.locate()).resolve().parent)
            break
    schemes = [sysconfig.get_default_scheme(), *sysconfig.get_scheme_names()]
    for scheme in dict.fromkeys(schemes):
        try:
            data = sysconfig.get_paths(scheme)["data"]
        except KeyError:
            continue
        dirs.append(Path(data) / "share" / "vfsdrv" / name)
    dirs += [Path(sys.prefix) / "share" / "vfsdrv" / name, Path("/usr/local/share/vfsdrv") / name,
             Path("/usr/share/vfsdrv") / name]
    return list(dict.fromkeys(dirs))


def templates_dir() -> Path:
    for d in data_dirs("udev"):
        if (d / "70-vfsdrv.rules.in").is_file():
            return d
    raise VfsdrvError("the udev templates (70-vfsdrv.rules.in) are not installed: reinstall "
                      "vfsdrv (pip install .) or run from a checkout")


def vfsdrv_command() -> str:
    """Absolute path of the `vfsdrv` entry point of this installation."""
    here = Path(sys.executable).parent / "vfsdrv"
    if os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("vfsdrv")
    if found:
        return os.path.abspath(found)
    raise VfsdrvError("the `vfsdrv` command is not installed next to this Python nor on PATH: "
                      "install the package (pip install .) first")


def _log(message: str, state_dir: Path | None = None) -> None:
    print(f"vfsdrv udev: {message}", file=sys.stderr)
    d = state_dir or Path(os.path.abspath(os.environ.get("VFSDRV_STATE_DIR", "/run/vfsdrv")))
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
    except OSError:
        pass


# -- install ------------------------------------------------------------------------------------


def stamped(text: str) -> str:
    """`text` as install writes it: with the stamp line that recognizes it, unedited."""
    if not text.endswith("\n"):
        text += "\n"
    return f"{text}{STAMP}{hashlib.sha256(text.encode()).hexdigest()}\n"


def _template_output(template: str) -> re.Pattern[str]:
    """The output of an unstamped install (before stamps) of `template`, for any command."""
    parts = template.split("@VFSDRV@")
    pattern = re.escape(parts[0])
    for i, part in enumerate(parts[1:]):
        pattern += ("(?P<cmd>[^\n]+)" if i == 0 else "(?P=cmd)") + re.escape(part)
    return re.compile(pattern)


def written_by_install(path: Path, template: str | None = None) -> bool:
    """Whether `path` holds a file install wrote, unchanged since: its stamp still
    matches its text (whichever vfsdrv, venv or version wrote it), or it is the
    template's output for some command (what install wrote before the stamps)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return False
    head, sep, last = text.removesuffix("\n").rpartition("\n")
    if last.startswith(STAMP):
        body = (head + sep).encode("utf-8", "surrogateescape")
        return last[len(STAMP):] == hashlib.sha256(body).hexdigest()
    return template is not None and _template_output(template).fullmatch(text) is not None


@dataclass
class Target:
    """A file install writes, and how to tell one it wrote there before (which it may
    overwrite, and uninstall remove) from anybody else's."""

    path: Path
    text: str
    mode: int = 0o644
    ours: Callable[[Path], bool] = written_by_install

    def foreign(self) -> bool:
        return (self.path.exists() or self.path.is_symlink()) and not self.ours(self.path)


def check(targets: list[Target], by: str) -> None:
    """Refuse (before anything is written) to overwrite a file install did not write."""
    foreign = [t.path for t in targets if t.foreign()]
    if foreign:
        more = f" (and {', '.join(map(str, foreign[1:]))})" if foreign[1:] else ""
        raise VfsdrvError(f"{foreign[0]} exists and was not written by {by}: "
                          f"remove it first{more}")


def write_file(path: Path, text: str, mode: int = 0o644) -> Path:
    tmp = path.with_name(f".{path.name}.vfsdrv-new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)  # never a half-written file for a concurrent reader
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise VfsdrvError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def check_root(root: str) -> str:
    """--root as given, but "//" or "/." is / (and needs what / needs); "" would be
    the working directory: refused."""
    if not root:
        raise VfsdrvError("--root needs a directory (/ for the system itself)")
    return "/" if os.path.realpath(root) == "/" else root


def write_all(todo: list[Target], undo: str) -> list[Path]:
    """Write every target in order; a failure part-way names what was written already
    and `undo`, the command that removes it."""
    written: list[Path] = []
    for t in todo:
        try:
            written.append(write_file(t.path, t.text, t.mode))
        except VfsdrvError as exc:
            if written:
                raise VfsdrvError(f"{exc}; written before it: "
                                  f"{', '.join(str(p) for p in written)} ({undo} removes "
                                  "them)") from None
            raise
    return written


def targets(root: str = "/", command: str | None = None) -> list[Target]:
    """The rule, the unit template and the example config, as install writes them."""
    cmd = command or vfsdrv_command()
    src = templates_dir()
    out = []
    for template, dest in TEMPLATES:
        text = (src / template).read_text()
        out.append(Target(Path(root) / dest, stamped(text.replace("@VFSDRV@", cmd)),
                          ours=lambda p, t=text: written_by_install(p, t)))
    return out


def install(root: str = "/", reload: bool = True, command: str | None = None) -> list[Path]:
    todo = targets(root, command)
    check(todo, "`vfsdrv udev install`")
    written = write_all(todo, f"vfsdrv udev uninstall --root {shlex.quote(root)}")
    if reload and root == "/":
        _reload()
    return written


def uninstall(root: str = "/", reload: bool = True,
              kept: list[Path] | None = None) -> list[Path]:
    """Remove what install wrote; a file there that install did not write, or that was
    edited since, stays (and is added to `kept`)."""
    removed = []
    for template, dest in TEMPLATES:
        path = Path(root) / dest
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            text: str | None = (templates_dir() / template).read_text()
        except (VfsdrvError, OSError):
            text = None  # then only a stamped file is recognized
        if written_by_install(path, text):
            path.unlink()
            removed.append(path)
        elif kept is not None:
            kept.append(path)
    if reload and root == "/":
        _reload()
    return removed


def _reload() -> None:
    """Tell a running udevd and systemd about the new files (best effort)."""
    if shutil.which("udevadm") and Path("/run/udev/control").exists():
        subprocess.run(["udevadm", "control", "--reload"], check=False, capture_output=True)
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False, capture_output=True)


# -- the udev event -------------------------------------------------------------------------------


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def start_mount(entry: Entry, config: Path) -> str:
    """Start vfsdrv@INSTANCE.service, or without systemd the unit's command, detached."""
    unit = unit_name(entry)
    if systemd_running():
        p = subprocess.run(["systemctl", "--no-block", "start", unit], capture_output=True,
                           text=True, check=False)
        if p.returncode != 0:
            raise VfsdrvError(f"systemctl start {unit} failed: {p.stderr.strip()}")
        return f"started {unit}"
    state = Path(os.path.abspath(os.environ.get("VFSDRV_STATE_DIR", "/run/vfsdrv")))
    state.mkdir(parents=True, exist_ok=True)
    out = open(state / f"mount-{systemd_escape(entry.key)}.log", "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [vfsdrv_command(), "udev", "mount", "--config", str(config), entry.key],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            close_fds=True,
        )
    finally:
        out.close()
    return f"no systemd: started `vfsdrv udev mount {entry.key}` directly (pid {proc.pid})"


def handle_add(bdf: str, config: Path, sysfs: Sysfs | None = None, *,
               mount: bool = True) -> str:
    """What the rule runs for an appearing function. Returns what was done."""
    from . import devices

    sysfs = sysfs or Sysfs()
    bdf = normalize_bdf(bdf)
    entries = load_config(config)
    if not entries:
        return f"{bdf}: {config} opts nothing in; left with the kernel"
    tag = None
    if any(e.kind == "tag" for e in entries) and not any(
            e.kind == "pci" and e.key == bdf for e in entries):
        tag = devices.describe(bdf, sysfs).tag
    entry = match(entries, bdf, tag)
    who = f"{bdf}" + (f" (tag {tag!r})" if tag else "")
    if entry is None:
        return f"{who}: not in {config}; left with {sysfs.driver(bdf) or 'no driver'}"
    if not entry.bind:
        return f"{who}: [{entry.section}] has bind = no; left alone"
    _, before = devices.bind(bdf, None, sysfs)
    done = f"{who}: [{entry.section}] bound to vfio-pci (was {before or 'no driver'})"
    if entry.mountpoint and mount:
        done += f"; mount on {entry.mountpoint}: {start_mount(entry, config)}"
    return done


def mount_entry(instance: str, config: Path, foreground: bool) -> int:
    """Mount the function of a config section (the unit's ExecStart)."""
    from .mount import MountRequest
    from .mount import mount as do_mount

    entries = load_config(config)
    entry = next((e for e in entries if e.key == instance), None)
    if entry is None:
        try:
            bdf = normalize_bdf(instance)
            entry = next((e for e in entries if e.kind == "pci" and e.key == bdf), None)
        except BadAddressError:
            pass
    if entry is None:
        raise UdevConfigError(f"{config} has no [tag:{instance}] or [pci:{instance}] section")
    if not entry.mountpoint:
        raise UdevConfigError(f"{config}: [{entry.section}] has no mountpoint")
    req = MountRequest(
        mountpoint=entry.mountpoint,
        device=entry.key if entry.kind == "pci" else None,
        tag=entry.key if entry.kind == "tag" else None,
        options=[",".join(entry.options)] if entry.options else [],
        foreground=foreground,
        timeout=entry.timeout,
    )
    if entry.frontend:
        req.frontend = entry.frontend
    os.makedirs(entry.mountpoint, exist_ok=True)  # its line passed check_request already
    return do_mount(req)


# -- command line ---------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("udev", help="auto-binding of opted-in virtio-fs functions (udev, systemd)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="udev_command", metavar="ACTION", required=True)
    i = s.add_parser("install", help="install the udev rule, the unit template, an example config")
    i.add_argument("--root", default="/", help="install under this directory (default /)")
    i.add_argument("--no-reload", action="store_true", help="do not reload udev and systemd")
    i.set_defaults(func=run_install)
    u = s.add_parser("uninstall", help="remove what install wrote (not /etc/vfsdrv.conf)")
    u.add_argument("--root", default="/", help="remove under this directory (default /)")
    u.add_argument("--no-reload", action="store_true", help="do not reload udev and systemd")
    u.set_defaults(func=run_uninstall)
    for name, helptext in (("show", "what the config decides for each virtio-fs function"),
                           ("add", "handle an appearing function (run by the udev rule)"),
                           ("mount", "mount a configured function (vfsdrv@.service)")):
        a = s.add_parser(name, help=helptext)
        a.add_argument("--config", help=f"config file (default $VFSDRV_CONF or {DEFAULT_CONF})")
        if name == "add":
            a.add_argument("bdf", metavar="BDF")
            a.add_argument("--no-mount", action="store_true", help="bind only")
        if name == "mount":
            a.add_argument("-f", "--foreground", action="store_true",
                           help="serve in the foreground, as the unit (Type=notify) runs "
                                "it: systemd hears READY=1 once the mount is usable")
            a.add_argument("instance", metavar="INSTANCE", help="a tag or a PCI address")
        a.set_defaults(func={"show": run_show, "add": run_add, "mount": run_mount}[name])


def run_install(args: argparse.Namespace) -> int:
    args.root = check_root(args.root)
    for path in install(args.root, reload=not args.no_reload):
        print(f"wrote {path}")
    conf = Path(args.root) / DEFAULT_CONF.lstrip("/")
    if not conf.exists():
        print(f"nothing is opted in until {conf} names functions (see {CONF_EXAMPLE})")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    args.root = check_root(args.root)
    kept: list[Path] = []
    for path in uninstall(args.root, reload=not args.no_reload, kept=kept):
        print(f"removed {path}")
    for path in kept:
        print(f"vfsdrv: kept {path}: not written by `vfsdrv udev install`, or changed since "
              "(remove it yourself if it is not needed)", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from . import devices

    config = conf_path(args.config)
    if args.config is not None and not os.path.exists(config):
        raise VfsdrvError(f"--config {args.config}: no such file")  # a typo, likely
    entries = load_config(config)
    found = devices.list_devices()
    where = f"{config}" if os.path.exists(config) else f"{config} (missing: nothing opted in)"
    print(f"config: {where}; {len(entries)} section(s)")
    if not found:
        print("no virtio-fs PCI functions on this machine")
    for d in found:
        e = match(entries, d.bdf, d.tag)
        if e is None:
            what = "not configured: stays with the kernel"
        elif not e.bind:
            what = f"[{e.section}] bind = no"
        else:
            what = f"[{e.section}] -> vfio-pci" + (
                f", mounted on {e.mountpoint} by {unit_name(e)}" if e.mountpoint else "")
        print(f"{d.bdf} tag {d.tag!r} driver {d.driver or 'none'}: {what}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    try:
        _log(handle_add(args.bdf, conf_path(args.config), mount=not args.no_mount))
    except VfsdrvError as exc:
        _log(f"{args.bdf}: failed: {exc}")  # on stderr too: once is enough
        return 1
    return 0


def run_mount(args: argparse.Namespace) -> int:
    return mount_entry(args.instance, conf_path(args.config), args.foreground)


__all__ = ["Entry", "handle_add", "install", "load_config", "match", "unit_name"]
