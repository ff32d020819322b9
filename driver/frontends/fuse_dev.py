"""/dev/fuse and the mount(2) / umount2(2) system calls for a root FUSE mount.

Root mounts directly (no fusermount): open /dev/fuse, then mount(2) with
``fd=N,rootmode=40000,user_id=U,group_id=G[,allow_other][,default_permissions]``
and file system type ``fuse.<subtype>``. Mount options given by the user are
split into mount(2) flags (ro, nosuid, ...) and FUSE options (max_read=...).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import VfsdrvError

DEV_FUSE = "/dev/fuse"
FS_SUBTYPE = "vfsdrv"

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

#: flag options: name -> (flags to set, flags to clear)
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
}
#: FUSE options that take a number and go to the kernel as they are
NUMERIC_FUSE_OPTIONS = frozenset({"max_read", "blksize"})
#: FUSE session settings the relay answers FUSE_INIT with (not mount(2) options)
SESSION_OPTIONS = frozenset({"max_background", "congestion_threshold", "max_readahead"})
#: numeric options whose FUSE field is narrower than 32 bits or where 0 means "the
#: kernel's default": name -> (smallest, largest); the others take 0 to 2^32 - 1
OPTION_RANGES = {"max_background": (1, 0xFFFF), "congestion_threshold": (1, 0xFFFF),
                 # the kernel raises a smaller max_read to 4096 without a word
                 "max_read": (4096, 0xFFFFFFFF)}
#: the relay's pump settings: name -> (largest value, default, what it is)
PUMP_OPTIONS: dict[str, tuple[int, int, str]] = {
    "poll_us": (1000, 0, "microseconds each pump spins (on its ring, or idle on /dev/fuse) "
                "before sleeping; 0: never"),
    "io_uring": (1, 1, "1, the default: each pump writes a round's replies to /dev/fuse in "
                 "one io_uring_enter where the kernel allows io_uring; 0: a writev each"),
}
#: -o request_timeout=SECONDS: the unresponsive-device timeout, both frontends (0: off)
#: when not chosen: a stalled device ends its mount after 2 minutes instead of
#: leaving programs waiting forever (the kernel's hung-task warning comes at 120 s)
DEFAULT_REQUEST_TIMEOUT = 120.0
#: how long the device has to answer FUSE_INIT when its transport names no timeout
INIT_TIMEOUT = 10.0
REQUEST_TIMEOUT_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
#: options that mount(8), fstab and systemd pass and that mean nothing to the file
#: system (x-* and X-* too, see is_ignored)
IGNORED_OPTIONS = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users",
                             "nousers", "owner", "group", "_netdev", "nofail", "loop",
                             "comment"})


def is_ignored(key: str) -> bool:
    """An option (by its key) that is mount(8)'s, fstab's or systemd's, not ours."""
    return key in IGNORED_OPTIONS or key.startswith(("x-", "X-"))


def option_words() -> list[str]:
    """Every option `vfsdrv mount -o` takes, as typed ("ro", "max_read="): the error
    for an unknown one and the shell completion list them from here."""
    return [*FLAG_OPTIONS, "allow_other", "noallow_other", "default_permissions",
            "nodefault_permissions",
            # blksize= is fuseblk's: vfsdrv mount refuses it with its own message
            *(f"{k}=" for k in sorted(NUMERIC_FUSE_OPTIONS - {"blksize"})),
            *(f"{k}=" for k in sorted(SESSION_OPTIONS)), *(f"{k}=" for k in PUMP_OPTIONS),
            "request_timeout="]


#: options libfuse (3.14) cannot take from the pyfuse3 frontend: no option for these
#: flags; max_read would have to be repeated in pyfuse3's init() (libfuse refuses the
#: session else)
NO_LIBFUSE_OPTION = frozenset({"strictatime", "lazytime", "nodiratime", "max_read"})


def libfuse_refused(mo: MountOptions) -> str | None:
    """Why the pyfuse3 frontend cannot take these options, or None: checked before
    anything is connected, and again by the frontend."""
    refused = NO_LIBFUSE_OPTION.intersection(
        mo.flag_names() + [o.partition("=")[0] for o in mo.fuse]) | set(mo.session) \
        | set(mo.pump)
    if not refused:
        return None
    return (f"mount option(s) {', '.join(sorted(refused))}: not for the pyfuse3 frontend "
            "(libfuse cannot set them, or they belong to the relay's pumps); use the relay "
            "frontend")


class MountError(VfsdrvError):
    """The mount could not be made (mount point, /dev/fuse, options, mount(2))."""


@dataclass
class MountOptions:
    """User mount options, parsed. `allow_other` and `default_permissions` are on by
    default, as on the kernel's own virtio-fs mounts (every user may enter, the
    kernel checks permissions from the attributes)."""

    flags: int = 0
    allow_other: bool = True
    default_permissions: bool = True
    fuse: list[str] = field(default_factory=list)  # extra key=value for the kernel
    #: FUSE_INIT reply settings chosen by the user (SESSION_OPTIONS)
    session: dict[str, int] = field(default_factory=dict)
    #: the relay's pump settings chosen by the user (PUMP_OPTIONS)
    pump: dict[str, int] = field(default_factory=dict)
    #: seconds without a completion, requests in flight, before the relay declares the
    #: device dead (-o request_timeout=; 0: never; None: not chosen, the default)
    request_timeout: float | None = None
    unknown: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # known options, bad values

    @classmethod
    def parse(cls, options: list[str]) -> MountOptions:
        mo = cls()
        for group in options:
            for opt in group.split(","):
                opt = opt.strip()
                if not opt or is_ignored(opt.partition("=")[0]):
                    continue
                key, _, value = opt.partition("=")
                if opt in FLAG_OPTIONS:
                    on, off = FLAG_OPTIONS[opt]
                    mo.flags = (mo.flags | on) & ~off
                elif opt == "allow_other":
                    mo.allow_other = True
                elif opt in ("noallow_other", "no_allow_other"):
                    mo.allow_other = False
                elif opt == "default_permissions":
                    mo.default_permissions = True
                elif opt in ("nodefault_permissions", "no_default_permissions"):
                    mo.default_permissions = False
                elif key in NUMERIC_FUSE_OPTIONS or key in SESSION_OPTIONS:
                    # ASCII digits only ("²".isdigit() too), and what FUSE's field holds
                    lo, hi = OPTION_RANGES.get(key, (0, 0xFFFFFFFF))
                    if not (value.isascii() and value.isdigit() and lo <= int(value) <= hi):
                        mo.invalid.append(f"{opt!r}: {key} is a whole number from {lo} to "
                                          f"{hi}")
                    elif key in SESSION_OPTIONS:
                        mo.session[key] = int(value)
                    else:
                        mo.fuse.append(f"{key}={int(value)}")
                elif key in PUMP_OPTIONS:
                    top, _default, what = PUMP_OPTIONS[key]
                    if value.isascii() and value.isdigit() and int(value) <= top:
                        mo.pump[key] = int(value)
                    else:
                        mo.invalid.append(f"{opt!r}: {key} is a whole number from 0 to {top} "
                                          f"({what})")
                elif key == "request_timeout":
                    if REQUEST_TIMEOUT_RE.fullmatch(value) and (
                            float(value) == 0 or 1 <= float(value) <= 0xFFFFFFFF):
                        mo.request_timeout = float(value)
                    else:
                        mo.invalid.append(f"{opt!r}: request_timeout is seconds in decimal "
                                          "digits (30, 2.5): 0 (off) or from 1 to 4294967295")
                else:
                    mo.unknown.append(opt)
        return mo

    def check(self) -> None:
        if self.invalid:
            raise MountError(f"bad mount option value: {'; '.join(self.invalid)}")
        if self.unknown:
            raise MountError(f"unknown mount option(s): {', '.join(self.unknown)} (known: "
                             f"{', '.join(option_words())})")

    def pump_settings(self) -> dict[str, int]:
        """Every pump setting: the user's choice, else its default (PUMP_OPTIONS)."""
        return {k: self.pump.get(k, default) for k, (_top, default, _w) in PUMP_OPTIONS.items()}

    def flag_names(self) -> list[str]:
        """The options that set this mount's flags, one per flag set (e.g. "ro")."""
        return [name for name, (on, _off) in FLAG_OPTIONS.items() if on and self.flags & on]

    def data(self, fd: int, uid: int, gid: int) -> str:
        parts = [f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={uid}", f"group_id={gid}"]
        if self.allow_other:
            parts.append("allow_other")
        if self.default_permissions:
            parts.append("default_permissions")
        return ",".join(parts + self.fuse)


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        lib.syncfs.argtypes = [ctypes.c_int]
        lib.syncfs.restype = ctypes.c_int
        _libc = lib
    return _libc


def require_root(what: str = "mounting") -> None:
    if os.geteuid() != 0:
        raise MountError(f"{what} needs root (this process runs as uid {os.geteuid()})")


def mount_table(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount this process can see."""
    out = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append((_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def _mountinfo(path: str) -> list[tuple[tuple[str, str, str], str]]:
    """((mount id, "major:minor", fs type), mount point) of every line, in order."""
    out = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5:
                out.append(((fields[0], fields[2], (right.split() or ["?"])[0]),
                            _unescape(fields[4])))
    return out


def mount_flags_of(mountpoint: str, path: str = "/proc/self/mountinfo") -> list[str]:
    """The per-mount options (ro, nosuid, relatime, ...) of the newest mount on
    `mountpoint`, from mountinfo (no stat), or [] when nothing is mounted there."""
    found: list[str] = []
    with open(path) as f:
        for line in f:
            fields = line.partition(" - ")[0].split()
            if len(fields) >= 6 and _unescape(fields[4]) == mountpoint:
                found = fields[5].split(",")
    return found


def mount_entry(mountpoint: str, path: str = "/proc/self/mountinfo"
                ) -> tuple[str, str, str] | None:
    """(mount id, "major:minor", fs type) of the mount on `mountpoint` (the newest, if
    mounts are stacked), from mountinfo: never a stat, which a FUSE server must not do
    on its own mount. A server compares it with what it recorded at mount time before
    it unmounts: the path may hold somebody else's mount by then."""
    found = None
    for entry, mp in _mountinfo(path):
        if mp == mountpoint:
            found = entry
    return found


#: the FUSE control file system: a directory per connection, named by its device minor
FUSECTL = "/sys/fs/fuse/connections"


def abort_connection(entry: tuple[str, str, str] | None) -> bool:
    """Abort the FUSE connection of a mount (its mount_entry) at once, through the
    FUSE control file system: from then on every request fails ENOTCONN, where
    closing /dev/fuse descriptor by descriptor leaves a window in which new requests
    queue (and later end ECONNABORTED). False when fusectl is not mounted."""
    if entry is None:
        return False
    minor = entry[1].partition(":")[2]
    try:
        with open(os.path.join(FUSECTL, minor, "abort"), "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def mount_present(entry: tuple[str, str, str], path: str = "/proc/self/mountinfo") -> bool:
    """Whether the mount `mount_entry` once returned is still in this mount namespace,
    on top of its mount point or covered by a later mount."""
    return any(e == entry for e, _mp in _mountinfo(path))


def is_our_mount(mountpoint: str, entry: tuple[str, str, str] | None) -> bool:
    """Whether the mount on `mountpoint` is still the one `mount_entry` returned at mount
    time (none recorded: whether anything is mounted there). A server ending unmounts
    only its own: the path may hold somebody else's mount made since."""
    if entry is None:
        return is_mount_point(mountpoint, resolved=True)
    return mount_entry(mountpoint) == entry


def mount_device(mountpoint: str, path: str = "/proc/self/mountinfo") -> str | None:
    """"major:minor" of the mount on `mountpoint` (the newest, if mounts are stacked)."""
    entry = mount_entry(mountpoint, path)
    return entry[1] if entry else None


def set_readahead(mountpoint: str, nbytes: int) -> int:
    """Set the readahead of the FUSE mount on `mountpoint` to `nbytes` (rounded down
    to KiB) through its backing device's sysfs file; the value it had before. FUSE_INIT
    can only lower the kernel's offer (128 KiB by default); the bdi can be raised
    after. OSError when the mount or its sysfs file is not there."""
    dev = mount_device(mountpoint)
    if dev is None:
        raise OSError(errno.ENOENT, f"{mountpoint} is not in /proc/self/mountinfo")
    knob = f"/sys/class/bdi/{dev}/read_ahead_kb"
    with open(knob, "r+") as f:
        before = int(f.read().strip() or 0)
        kib = max(0, nbytes // 1024)
        if kib != before:
            f.seek(0)
            f.write(f"{kib}\n")
    return before * 1024


def _unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mount_point(path: str, *, resolved: bool = False) -> bool:
    """Whether something is mounted on `path`. With `resolved` (an absolute path
    without symlinks) the path is not looked at: a server must never stat its own
    mount point, that would wait for itself."""
    real = path if resolved else os.path.realpath(path)
    return any(mp == real for mp, _t, _s in mount_table())


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or MountError saying why it cannot be used."""
    if not path:  # realpath("") is the current directory
        raise MountError("the mount point is an empty path")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as exc:
        hint = (" (a FUSE mount whose server is gone is there: unmount it first, e.g. "
                f"`vfsdrv umount {path}`)" if exc.errno == errno.ENOTCONN else "")
        raise MountError(f"mount point {path}: {exc.strerror}{hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    types = [t for mp, t, _s in mount_table() if mp == real]
    if types:
        hint = (f" (a {types[-1]} mount: if its server is gone, `vfsdrv umount {path}` "
                "removes it)" if types[-1].startswith("fuse") else "")
        raise MountError(f"mount point {path} is busy: something is already mounted "
                         f"there{hint}")
    return real


def open_fuse_device() -> int:
    if not os.path.exists(DEV_FUSE):
        raise MountError(f"{DEV_FUSE} is missing: load the fuse module (`modprobe fuse`)")
    try:
        return os.open(DEV_FUSE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot open {DEV_FUSE}: {exc.strerror}") from None


def mount_fuse(fuse_fd: int, mountpoint: str, source: str, options: MountOptions,
               subtype: str = FS_SUBTYPE) -> None:
    """mount(2) the FUSE connection of `fuse_fd` on `mountpoint`."""
    options.check()
    data = options.data(fuse_fd, os.getuid(), os.getgid())
    rc = _lib().mount(source.encode() or b"vfsdrv", mountpoint.encode(),
                      f"fuse.{subtype}".encode(), options.flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EPERM:
            hint = " (mounting needs root)"
        elif err == errno.ENODEV:
            hint = " (the kernel has no FUSE support loaded: `modprobe fuse`)"
        elif err == errno.EBUSY:
            hint = " (something is already mounted there)"
        raise MountError(f"mount of {mountpoint} failed: {os.strerror(err)}{hint}")


def remount(mountpoint: str, flags: int) -> None:
    """mount(2) with MS_REMOUNT: the mount flags (ro/rw, nosuid, noatime, ...) of a
    mount that is there; FUSE takes no other option on a remount."""
    if _lib().mount(b"", mountpoint.encode(), None, MS_REMOUNT | flags, None) != 0:
        err = ctypes.get_errno()
        raise MountError(f"remount of {mountpoint} failed: {os.strerror(err)}")


def umount(mountpoint: str, *, lazy: bool = False) -> None:
    """umount2(2); OSError on failure (EINVAL: not a mount point)."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _lib().umount2(mountpoint.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}", mountpoint)


#: the signals that end a FUSE server, as libfuse's fuse_set_signal_handlers has them:
#: SIGHUP too (a closed terminal, a lost ssh session, for a server in the foreground)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: after SIGTERM/SIGINT/SIGHUP, how long a lazily detached (busy) mount is served
#: before the connection is aborted
STOP_GRACE = 3.0
#: how long a server ending waits for the device's answer to its FUSE_DESTROY
DESTROY_TIMEOUT = 5.0

#: when a server is told to stop (SIGTERM) while its mount is in use, how long writing
#: back the mount's dirty pages (syncfs) may take before the server gives up on it: a
#: device that stops answering cannot hold the stop up for longer
FLUSH_LIMIT = 30.0


def syncfs(path: str) -> None:
    """syncfs(2) on the file system mounted at `path`: its dirty pages written back.
    OSError on failure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _lib().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def umount_busy_lazy(mountpoint: str, *, before_detach: Callable[[], None] | None = None
                     ) -> bool:
    """Unmount; when busy, call `before_detach` (if given), then detach lazily.
    False if it was not mounted."""
    try:
        umount(mountpoint)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            if before_detach is not None:
                before_detach()
            umount(mountpoint, lazy=True)
        elif exc.errno == errno.EINVAL:
            return False
        else:
            raise
    return True
