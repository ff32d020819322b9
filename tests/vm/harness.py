"""Run shell scripts in a throw-away QEMU guest that has real virtio-fs PCI functions.

The guest boots a Debian kernel (unpacked into a cache directory once, see
prepare-kernel.sh) under TCG. Its root file system is this host's ``/``, shared
read-only over 9p, under a tmpfs overlay: host binaries, this checkout and its
``.venv`` are visible at the same paths, and guest writes never reach the host.
Each virtio-fs function is a ``vhost-user-fs-pci`` device, served either by a
virtiofsd that the harness starts (and stops) for the run, or by a vhost-user
backend that the caller already runs (``FsDevice(socket=...)``).

The script runs as root with ``bash -e -o pipefail``; its stdout and stderr
(combined) and its exit status come back through a per-run directory shared
read-write over 9p (not through the serial console, which only carries kernel
messages). Typical use::

    from harness import FsDevice, run_in_guest, GUEST_PYTHON

    r = run_in_guest(f"vfsdrv_vfio_bind $VFSDRV_VM_BDF; {GUEST_PYTHON} -m my.test", iommu=True)
    assert r.returncode == 0, r.output

Infrastructure problems (no qemu, the kernel cannot be prepared, the guest never
reports a status, timeouts) raise GuestError subclasses with diagnostics; a
returned GuestResult always carries the script's real exit status.

Two guest kernels: ``kernel="stable"`` (default) is what linux-image-amd64 depends
on in the host's apt sources (Debian 12: 6.1); ``kernel="backports"`` is the same
from ``<codename>-backports``, looked up through a private apt configuration in the
cache (the host's /etc/apt is untouched; Debian 12: 6.12, which has iommufd and VFIO
device cdevs once prepare-kernel.sh has built them). ``iommufd=True`` boots that one
with the vIOMMU.

Environment knobs: VFSDRV_VM_CACHE (cache directory), VFSDRV_VM_KPKG (stable kernel
package, default: what linux-image-amd64 depends on), VFSDRV_VM_QEMU,
VFSDRV_VM_VIRTIOFSD (binaries), VFSDRV_VM_KEEP=1 (keep run directories),
VFSDRV_VM_VERBOSE=1 (no ``quiet`` on the kernel command line).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

VM_DIR = Path(__file__).resolve().parent
REPO = VM_DIR.parents[1]
#: The project's venv python; the guest sees it at the same path. Not resolved:
#: the symlink's location is what makes it the venv's interpreter.
GUEST_PYTHON = Path(os.path.abspath(REPO / ".venv" / "bin" / "python"))

#: PCI slot of the first virtio-fs function; function i is at slot FS_SLOT + i.
FS_SLOT = 0x03
_9P_SLOT = 0x10  # 9p shares (host root, run directory, rw dirs) from here on
DEFAULT_TAG = "myfs"


class GuestError(RuntimeError):
    """The guest could not be run or did not report a result."""


class GuestSetupError(GuestError):
    """The host cannot run guests (missing tools, kernel preparation failed)."""


class GuestTimeout(GuestError):
    """The guest did not finish in time; ``output`` has what the script printed."""

    def __init__(self, message: str, output: str = "", console: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.console = console


def fs_bdf(index: int = 0, devices: Sequence[FsDevice] | None = None) -> str:
    """PCI address, in the guest, of the index-th virtio-fs function.

    On the root bus at slot FS_SLOT + index; one with ``hotplug`` (given
    ``devices``) is function 0 of the bus behind its pcie-root-port, which the
    firmware numbers 1, 2, ... in slot order."""
    if devices is not None and devices[index].hotplug:
        bus = sum(1 for d in devices[:index + 1] if d.hotplug)
        return f"0000:{bus:02x}:00.0"
    return f"0000:00:{FS_SLOT + index:02x}.0"


@dataclass(frozen=True)
class FsDevice:
    """One vhost-user-fs-pci function (virtio-fs, 1af4:105a) in the guest.

    Either ``socket`` is the vhost-user socket of a backend the caller runs
    (QEMU connects to it as a client; the backend must already listen), or the
    harness starts a virtiofsd exporting ``fs_dir`` (default: an empty
    temporary directory) for this run.
    """

    tag: str = DEFAULT_TAG
    fs_dir: Path | None = None
    socket: Path | None = None
    num_request_queues: int = 1
    queue_size: int | None = None  # vhost-user-fs-pci queue-size (default 128)
    properties: str = ""  # extra device properties, e.g. ",cache-size=64M"
    #: behind its own pcie-root-port (native PCIe hotplug, pciehp in the guest), so
    #: that QMP device_del / device_add can unplug and plug it; see ``on_request``
    hotplug: bool = False

    def __post_init__(self) -> None:
        if self.fs_dir is not None and self.socket is not None:
            raise ValueError("FsDevice: give fs_dir (harness runs virtiofsd) or socket, not both")
        if self.num_request_queues < 1:
            raise ValueError("FsDevice: num_request_queues must be >= 1")


@dataclass
class GuestResult:
    returncode: int
    output: str  # the script's stdout and stderr, combined
    console: str  # serial console: kernel messages (quiet: warnings only), guest-init errors
    duration: float  # wall clock seconds for the whole run (virtiofsd, boot, script, exit)
    boot_time: float | None  # guest uptime when the script started
    backend_logs: dict[str, str] = field(default_factory=dict)  # tag -> virtiofsd log
    dmesg: str = ""  # the guest's whole kernel log, taken after the script

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        text = (f"guest exit status {self.returncode} after {self.duration:.1f}s; "
                f"output:\n{self.output}")
        if self.returncode != 0 and self.dmesg:
            text += f"\n--- guest dmesg (tail):\n{_tail(self.dmesg, 25)}"
        return text


@dataclass(frozen=True)
class Kernel:
    kdir: Path
    vmlinux: Path
    initrd: Path
    kroot: Path


# -- host tools and the kernel cache ------------------------------------------------------------


def cache_dir() -> Path:
    """``${VFSDRV_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfsdrv-vm}``"""
    if os.environ.get("VFSDRV_VM_CACHE"):
        return Path(os.environ["VFSDRV_VM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vfsdrv-vm"


def qemu_binary() -> str:
    name = os.environ.get("VFSDRV_VM_QEMU", "qemu-system-x86_64")
    path = shutil.which(name)
    if not path:
        raise GuestSetupError(f"{name} not found: install qemu-system-x86 (tools/setup-env.sh)")
    return path


def virtiofsd_binary() -> str:
    candidates = [os.environ.get("VFSDRV_VM_VIRTIOFSD", ""), "/usr/lib/qemu/virtiofsd",
                  "/usr/libexec/virtiofsd", shutil.which("virtiofsd") or ""]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise GuestSetupError("virtiofsd not found (Debian 12: qemu-system-common, "
                          "/usr/lib/qemu/virtiofsd); set VFSDRV_VM_VIRTIOFSD")


KERNELS = ("stable", "backports")


def kernel_package(kernel: str = "stable") -> str:
    """``$VFSDRV_VM_KPKG`` (stable only), else the package linux-image-amd64 depends on."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if kernel == "stable" and os.environ.get("VFSDRV_VM_KPKG"):
        return os.environ["VFSDRV_VM_KPKG"]
    return _default_kernel_package(kernel)


def _apt_env(kernel: str) -> dict[str, str]:
    """The environment for apt-get/apt-cache: the host's apt, or the private backports one."""
    env = dict(os.environ)
    if kernel == "backports":
        env["APT_CONFIG"] = str(_backports_apt())
    return env


def _backports_apt(update: bool = False) -> Path:
    """A private apt configuration that knows only ``<codename>-backports`` (lists in the
    cache); its package lists are fetched on first use, or again when ``update``."""
    codename = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    if not codename:
        raise GuestSetupError("no VERSION_CODENAME in /etc/os-release: cannot name backports")
    d = cache_dir() / f".apt-{codename}-backports"  # a dot: _collect_garbage leaves it alone
    (d / "lists/partial").mkdir(parents=True, exist_ok=True)
    (d / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    (d / "parts").mkdir(exist_ok=True)
    mirror = os.environ.get("VFSDRV_VM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    signed = f" [signed-by={keyring}]" if keyring.exists() else ""
    (d / "sources.list").write_text(f"deb{signed} {mirror} {codename}-backports main\n")
    conf = d / "apt.conf"
    conf.write_text("".join(f'{k} "{v}";\n' for k, v in (
        ("Dir::Etc::SourceList", d / "sources.list"), ("Dir::Etc::SourceParts", d / "parts"),
        ("Dir::State::Lists", d / "lists"), ("Dir::Cache", d / "cache"),
        ("Dir::Cache::pkgcache", ""), ("Dir::Cache::srcpkgcache", ""))))
    if update or not any((d / "lists").glob("*_Packages*")):
        _run_step(["apt-get", "update", "-qq"], f"apt-get update ({codename}-backports)",
                  dict(os.environ, APT_CONFIG=str(conf)))
    return conf


@functools.cache
def _default_kernel_package(kernel: str = "stable") -> str:  # apt-cache: ~1 s, once
    hint = "set VFSDRV_VM_KPKG" if kernel == "stable" else "no backports kernel"
    try:
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True, check=True, env=_apt_env(kernel)).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestSetupError(f"cannot resolve linux-image-amd64 ({e}); {hint}") from e
    for line in out.splitlines():
        dep = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise GuestSetupError(f"apt-cache knows no linux-image-amd64 (apt-get update?); {hint}")


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _need_tools(*tools: str) -> None:
    for tool in tools:
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            raise GuestSetupError(f"{tool} not found: run tools/setup-env.sh")


def _run_step(argv: list[str], what: str, env: Mapping[str, str] | None = None) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise GuestSetupError(f"{what} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")


#: Cache entries (other kernels, other versions of prepare-kernel.sh, e.g. another
#: checkout's) unused for this long are removed, unless a run holds them.
STALE_AFTER = 24 * 3600.0


def prepare_kernel(log: TextIO | None = sys.stderr, kernel: str = "stable") -> Kernel:
    """Unpack the guest kernel and build the initramfs, once; later calls reuse the cache.

    Safe to call concurrently (a lock file serialises preparation). The kernel
    tree is keyed by the package and prepare-kernel.sh's hash (so checkouts with
    different versions do not rebuild each other's), the initramfs by the hash of
    build-initramfs.sh and initramfs-init.
    """
    cache = cache_dir()
    kstamp = _digest(VM_DIR / "prepare-kernel.sh")
    istamp = _digest(VM_DIR / "build-initramfs.sh", VM_DIR / "initramfs-init")
    with _locked(cache / ".lock"):
        kpkg = kernel_package(kernel)
        kdir = cache / f"{kpkg}-{kstamp[:12]}"
        if not (kdir / "ok").exists():  # prepare-kernel.sh renames a complete tree into place
            _need_tools("apt-get", "dpkg-deb", "depmod", "modinfo", "xz", "zstd", "make", "gcc")
            try:
                _prepare(kdir, kpkg, kstamp, log, kernel)
            except GuestSetupError:
                # stale package lists on a long-lived machine: the package (or its
                # headers) left the archive. As root, refresh them once and retry.
                if os.geteuid() != 0 or (kernel == "stable" and os.environ.get("VFSDRV_VM_KPKG")):
                    raise
                if log:
                    print("vfsdrv-vm: retrying after apt-get update", file=log, flush=True)
                if kernel == "backports":
                    _backports_apt(update=True)
                else:
                    _run_step(["apt-get", "update", "-qq"], "apt-get update")
                _default_kernel_package.cache_clear()
                kpkg = kernel_package(kernel)
                kdir = cache / f"{kpkg}-{kstamp[:12]}"
                if not (kdir / "ok").exists():
                    _prepare(kdir, kpkg, kstamp, log, kernel)
        initrd = kdir / f"initrd-{istamp}.gz"
        if not initrd.exists():
            _need_tools("modprobe", "cpio", "gzip")
            if not os.access("/bin/busybox", os.X_OK):
                raise GuestSetupError("/bin/busybox not found: install busybox-static "
                                      "(tools/setup-env.sh)")
            _run_step([str(VM_DIR / "build-initramfs.sh"), str(kdir), str(initrd)],
                      "building the guest initramfs")
        os.utime(kdir / "ok")  # last use, for _collect_garbage
        _collect_garbage(cache, kdir, initrd)
    return Kernel(kdir=kdir, vmlinux=kdir / "vmlinux", initrd=initrd, kroot=kdir / "kroot")


def _prepare(kdir: Path, kpkg: str, kstamp: str, log: TextIO | None, kernel: str) -> None:
    if log:
        print(f"vfsdrv-vm: preparing {kpkg} in {kdir} (once)", file=log, flush=True)
    t0 = time.monotonic()
    _run_step([str(VM_DIR / "prepare-kernel.sh"), str(kdir), kpkg],
              f"preparing the guest kernel {kpkg}", dict(_apt_env(kernel), STAMP=kstamp))
    if log:
        print(f"vfsdrv-vm: prepared {kpkg} in {time.monotonic() - t0:.0f}s", file=log, flush=True)


def _collect_garbage(cache: Path, keep: Path, initrd: Path) -> None:
    now = time.time()
    for old in keep.glob("initrd-*.gz"):  # QEMU reads its initrd at start: an hour is plenty
        if old != initrd and now - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    for d in cache.iterdir():
        if d == keep or not d.is_dir() or d.name.startswith("."):
            continue
        ok = d / "ok"
        try:
            if now - (ok if ok.exists() else d).stat().st_mtime < STALE_AFTER:
                continue
            if not ok.exists():  # an interrupted preparation
                shutil.rmtree(d, ignore_errors=True)
                continue
            with open(ok) as f:  # runs hold a shared lock on ok
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
        except OSError:  # in use, or gone meanwhile
            continue


# -- one guest run ----------------------------------------------------------------------------


def _no_space(p: Path | str, what: str) -> str:
    s = str(p)
    if any(c.isspace() for c in s) or "," in s:
        raise GuestError(f"{what} {s!r}: paths with spaces or commas cannot go on the "
                         "kernel/QEMU command line")
    return s


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def is_listening(sock: Path) -> bool:
    """Whether a unix socket is bound *and* listening at ``sock`` (this net namespace).

    virtiofsd serves a single connection, so probing by connecting is not an
    option; and the socket file exists from bind() on, before listen(): a QEMU
    that connects in between gets ECONNREFUSED and exits.
    """
    want = str(sock)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == want and int(fields[3], 16) & 0x10000:
                return True  # __SO_ACCEPTCON
    return False


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Qmp:
    """A minimal QMP client on QEMU's unix socket: commands and the events seen meanwhile."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.events: list[dict] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestError("QMP: QEMU closed the monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        """Run a command; its ``return`` value, or GuestError with QEMU's error."""
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise GuestError(f"QMP {command}: {reply['error'].get('desc', reply)}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float,
                   match: Callable[[dict], bool] = lambda e: True) -> dict:
        """The first event ``name`` (seen before or arriving within ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("event") == name and match(e):
                    self.events.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"QMP: no {name} event within {timeout:g}s")
            self.sock.settimeout(left)
            try:
                reply = self._read()
            except TimeoutError:
                continue
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        self.sock.close()


@dataclass
class HostControl:
    """What ``on_request`` gets: the run's QMP monitor and directory."""

    qmp: Qmp
    run_dir: Path
    devices: Sequence[FsDevice]


#: on_request(name, control) -> text handed back to the guest's `vfsdrv_host NAME`
RequestHandler = Callable[[str, HostControl], str]


def run_in_guest(
    script: str,
    *,
    iommu: bool = False,
    noiommu: bool = False,
    iommufd: bool = False,
    kernel: str | None = None,
    timeout: float = 120,
    fs_dir: Path | None = None,
    vhost_user_socket: Path | None = None,
    num_request_queues: int = 1,
    fs_devices: Sequence[FsDevice] | None = None,
    bind_vfio: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    rw_dirs: Sequence[Path] = (),
    kernel_args: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
    mem: str = "1G",
    smp: int = 1,
    stream: TextIO | None = None,
    on_request: RequestHandler | None = None,
) -> GuestResult:
    """Boot a guest, run ``script`` in it (``bash -e -o pipefail``, as root) and return its result.

    Devices: by default one virtio-fs function (tag ``myfs``, at ``fs_bdf(0)``)
    described by ``fs_dir`` / ``vhost_user_socket`` / ``num_request_queues``;
    ``fs_devices`` replaces that with any list (``[]``: none), e.g. a second
    function with ``[FsDevice(), FsDevice(tag="fs2")]``.

    Modes: ``iommu`` adds an emulated Intel IOMMU (``intel_iommu=on``): vfio-pci
    gives type1 groups ``/dev/vfio/N``. ``noiommu`` loads vfio with
    ``enable_unsafe_noiommu_mode=1``: ``/dev/vfio/noiommu-N``. Both load
    vfio-pci before the script; ``bind_vfio`` also binds every virtio-fs
    function to it. Beware: virtiofsd does not offer VIRTIO_F_ACCESS_PLATFORM,
    so the device reads guest-physical addresses even behind the vIOMMU.
    ``iommufd`` is ``iommu`` on the backports kernel with iommufd loaded:
    /dev/iommu and the device cdevs /dev/vfio/devices/vfioN (the group nodes
    /dev/vfio/N stay). ``kernel``: "stable" (default) or "backports" (default
    with ``iommufd``).

    The guest environment has PATH (the venv's bin first), VFSDRV_REPO,
    VFSDRV_PYTHON, VFSDRV_VM_BDF (first virtio-fs function), VFSDRV_VM_BDFS,
    VFSDRV_VM_MODE (plain/iommu/iommufd/noiommu) and ``env``; the script starts in
    ``cwd`` (default: the repository). The helpers of guest-lib.sh
    (vfsdrv_vfio_bind BDF, vfsdrv_vfio_group BDF, vfsdrv_virtiofs_bdfs) are
    available. ``rw_dirs`` are host directories made writable in the guest at
    the same paths. ``stream`` receives the script's output while it runs.

    Host actions while the script runs: the guest calls ``vfsdrv_host NAME``
    (guest-lib.sh), which waits until ``on_request(NAME, control)`` has run on
    the host and prints what it returned; ``control.qmp`` is QEMU's monitor
    (e.g. ``control.qmp.execute("device_del", id="fs0")``: function i has the
    QOM id ``fs{i}``, its chardev ``vfs{i}``, its root port ``rp{i}``). An
    exception in the handler is reported to the guest (exit status 1 of
    vfsdrv_host, the message on its stderr) and re-raised after the run.
    """
    if iommufd:
        if noiommu:
            raise ValueError("iommufd and noiommu are mutually exclusive")
        if kernel not in (None, "backports"):
            raise ValueError("iommufd needs the backports kernel (the stable one has none)")
        iommu, kernel = True, "backports"
    if iommu and noiommu:
        raise ValueError("iommu and noiommu are mutually exclusive")
    if fs_devices is None:
        fs_devices = [FsDevice(fs_dir=fs_dir, socket=vhost_user_socket,
                               num_request_queues=num_request_queues)]
    elif fs_dir is not None or vhost_user_socket is not None or num_request_queues != 1:
        raise ValueError("give fs_devices or fs_dir/vhost_user_socket/num_request_queues")
    tags = [d.tag for d in fs_devices]
    if len(set(tags)) != len(tags):
        raise ValueError(f"virtio-fs tags must be unique: {tags}")
    if bind_vfio and not (iommu or noiommu):
        raise ValueError("bind_vfio needs iommu=True or noiommu=True")

    qemu = qemu_binary()
    vfsd = virtiofsd_binary() if any(d.socket is None for d in fs_devices) else ""
    if vfsd == "/usr/lib/qemu/virtiofsd" and any(
            d.socket is None and d.num_request_queues > 1 for d in fs_devices):
        # libvhost-user there is set up for 2 virtqueues: "Invalid queue index: 2"
        raise ValueError("QEMU's C virtiofsd serves one request queue only: give more "
                         "request queues to a backend of your own (FsDevice(socket=...))")
    kern = prepare_kernel(kernel=kernel or "stable")
    for p, what in ((VM_DIR, "checkout"), (kern.kdir, "cache directory")):
        _no_space(p, what)

    start = time.monotonic()
    in_use = open(kern.kdir / "ok")  # held for the whole run: a shared lock keeps
    fcntl.flock(in_use, fcntl.LOCK_SH)  # _collect_garbage away from this kernel
    run = Path(tempfile.mkdtemp(prefix="vfsdrv-vm-"))
    backends: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    qproc: subprocess.Popen[bytes] | None = None
    control: HostControl | None = None
    try:
        _no_space(run, "run directory")
        # the guest's setup: env, modules, rw mounts, cwd
        bdfs = [fs_bdf(i, fs_devices) for i in range(len(fs_devices))]
        mode = "iommufd" if iommufd else "iommu" if iommu else "noiommu" if noiommu else "plain"
        genv = {
            "PATH": f"{GUEST_PYTHON.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
                    ":/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONUNBUFFERED": "1",
            "VFSDRV_REPO": str(REPO), "VFSDRV_PYTHON": str(GUEST_PYTHON),
            "VFSDRV_VM_BDF": bdfs[0] if bdfs else "", "VFSDRV_VM_BDFS": " ".join(bdfs),
            "VFSDRV_VM_MODE": mode, "VFSDRV_VM_RUN_DIR": str(run),
        }
        genv.update(env or {})
        setup = ["# generated by harness.py, sourced by guest-init.sh (set -e)"]
        setup += [f"export {k}={shlex.quote(v)}" for k, v in genv.items()]
        for i, d in enumerate(rw_dirs):
            path = _no_space(Path(d).resolve(), "rw dir")
            setup.append(f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "
                         f"vfsdrv_rw{i} {shlex.quote(path)}")
        if iommufd:  # vfio needs it anyway; explicit, so that a missing module says so
            setup.append("modprobe iommufd")
            setup.append('[ -c /dev/iommu ] || { echo "iommufd: no /dev/iommu" >&2; exit 1; }')
        if iommu or noiommu:
            setup.append("modprobe vfio-pci")
            if noiommu:
                setup.append('[ "$(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode)"'
                             ' = Y ] || { echo "vfio: no-IOMMU mode is off" >&2; exit 1; }')
        if bind_vfio:
            setup += [f"vfsdrv_vfio_bind {b}" for b in bdfs]
        setup.append(f"cd {shlex.quote(str(cwd or REPO))}")
        (run / "setup.sh").write_text("\n".join(setup) + "\n")
        (run / "req").mkdir()
        (run / "script").write_text(script if script.endswith("\n") else script + "\n")

        # virtiofsd for the devices without a caller-provided backend
        sockets: list[Path] = []
        for i, d in enumerate(fs_devices):
            if d.socket is not None:
                sock = Path(d.socket)
                if not sock.is_socket():
                    raise GuestError(f"vhost-user socket {sock} does not exist (backend not "
                                     "started?)")
                if not is_listening(sock):
                    raise GuestError(f"nobody listens on the vhost-user socket {sock}")
                sockets.append(sock)
                continue
            src = Path(d.fs_dir) if d.fs_dir is not None else run / f"fs{i}"
            src.mkdir(parents=True, exist_ok=True)
            sock = run / f"vfsd{i}.sock"
            logf = run / f"virtiofsd{i}.log"
            with open(logf, "wb") as lf:
                # MALLOC_ARENA_MAX: see vfsdrv.tools.backend.virtiofsd_env (not
                # imported: the harness uses nothing of vfsdrv)
                p = subprocess.Popen([vfsd, f"--socket-path={sock}", "-o", f"source={src}",
                                      "-o", "cache=auto"],
                                     stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                     env={**os.environ, "MALLOC_ARENA_MAX": "8"})
            backends.append((d.tag, p, logf))
            deadline = time.monotonic() + 10
            while not is_listening(sock):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise GuestSetupError(f"virtiofsd for {src} did not start:\n{_read(logf)}")
                time.sleep(0.02)
            sockets.append(sock)

        # QEMU
        machine = "q35,memory-backend=mem"
        # cryptomgr.notests: the crypto self-tests cost ~0.6 s of boot under TCG.
        # no_timer_check: on a loaded host the TCG guest's early timer check can fail,
        # which with interrupt remapping (iommu) is a panic: "timer doesn't work
        # through Interrupt-remapped IO-APIC".
        kargs = ["console=ttyS0", "panic=-1", "cryptomgr.notests", "no_timer_check"]
        if os.environ.get("VFSDRV_VM_VERBOSE") != "1":
            kargs.append("quiet")
        dev_iommu: list[str] = []
        if iommu:
            machine += ",kernel-irqchip=split"  # intremap=on needs the split irqchip
            dev_iommu = ["-device", "intel-iommu,intremap=on,caching-mode=on"]
            kargs.append("intel_iommu=on")
        if noiommu:
            kargs.append("vfio.enable_unsafe_noiommu_mode=1")
        kargs += list(kernel_args)
        kargs += [f"vfsdrv_init={VM_DIR / 'guest-init.sh'}", f"vfsdrv_run={run}",
                  f"vfsdrv_kroot={kern.kroot}"]
        argv = [
            qemu, "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", str(smp),
            "-m", mem, "-nodefaults", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=con,path={run / 'console.log'}", "-serial", "chardev:con",
            # vhost-user needs guest RAM that the backend can map
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-kernel", str(kern.vmlinux), "-initrd", str(kern.initrd),
            "-append", " ".join(kargs),
            *dev_iommu,  # before the PCI devices it translates
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",  # guest-init: qemu exits
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        ]
        if any(d.hotplug for d in fs_devices):
            # native PCIe hotplug (pciehp, the attention button), as on real hardware,
            # not the ACPI hotplug q35 uses by default
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        shares = [("hostroot", Path("/"), True), ("vfsdrv_run", run, False)]
        shares += [(f"vfsdrv_rw{i}", Path(d).resolve(), False) for i, d in enumerate(rw_dirs)]
        for i, (tag, path, ro) in enumerate(shares):
            argv += ["-fsdev", f"local,id=fsdev{i},path={path},security_model=none,"
                     f"multidevs=remap{',readonly=on' if ro else ''}",
                     "-device", f"virtio-9p-pci,fsdev=fsdev{i},mount_tag={tag},"
                     f"addr={_9P_SLOT + i:#x}"]
        for i, (d, sock) in enumerate(zip(fs_devices, sockets, strict=True)):
            props = f"num-request-queues={d.num_request_queues}"
            if d.queue_size is not None:
                props += f",queue-size={d.queue_size}"
            argv += ["-chardev", f"socket,id=vfs{i},path={_no_space(sock, 'socket')}"]
            where = f"addr={FS_SLOT + i:#x}"
            if d.hotplug:
                argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},"
                         f"slot={i + 1},addr={FS_SLOT + i:#x}"]
                where = f"bus=rp{i},addr=0x0"
            argv += ["-device", f"vhost-user-fs-pci,id=fs{i},chardev=vfs{i},tag={d.tag},"
                     f"{props},{where}{d.properties}"]
        argv += list(extra_qemu_args)
        (run / "qemu.argv").write_text(shlex.join(argv) + "\n")

        qlog = run / "qemu.log"
        with open(qlog, "wb") as lf:
            qproc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                     cwd=run)
        out_path, pos = run / "output", 0
        deadline = start + timeout
        handler_error: BaseException | None = None

        def serve_requests() -> None:  # the guest's `vfsdrv_host NAME`
            nonlocal control, handler_error
            for req in sorted((run / "req").glob("*.want")):
                name = req.name[:-len(".want")]
                done = run / "req" / f"{name}.done"
                if done.exists():
                    continue
                try:
                    if on_request is None:
                        raise GuestError("vfsdrv_host: no on_request handler on the host")
                    if control is None:
                        control = HostControl(Qmp(run / "qmp.sock"), run, fs_devices)
                    answer, status = on_request(name, control), "ok"
                except Exception as e:  # reported to the guest, re-raised after the run
                    handler_error = handler_error or e
                    answer, status = f"{type(e).__name__}: {e}", "error"
                tmp = run / "req" / f"{name}.tmp"
                tmp.write_text(f"{status}\n{answer}")
                tmp.rename(done)

        def pump() -> None:  # copy new script output to `stream`
            nonlocal pos
            if stream is None or not out_path.exists():
                return
            with open(out_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            if chunk:
                stream.write(chunk.decode(errors="replace"))
                stream.flush()

        while qproc.poll() is None:
            pump()
            serve_requests()
            if time.monotonic() > deadline:
                qproc.kill()
                qproc.wait()
                raise GuestTimeout(
                    f"guest timed out after {timeout:g}s; script output so far:\n"
                    f"{_read(out_path)}\n--- console (tail):\n{_tail(_read(run / 'console.log'))}",
                    _read(out_path), _read(run / "console.log"))
            time.sleep(0.05)
        pump()
        output = _read(out_path)
        for _, p, _ in backends:
            _stop(p, 2)
        console = _read(run / "console.log")
        logs = {tag: _read(lf) for tag, _, lf in backends}
        rc_text = _read(run / "rc").strip()
        if not rc_text or not (run / "setup-ok").exists():
            what = ("the guest setup failed" if rc_text else
                    "the guest reported no exit status")
            diag = [f"{what} (qemu exit {qproc.returncode}); output:", output,
                    "--- qemu:", _read(qlog), "--- console (tail):", _tail(console)]
            for tag, log in logs.items():
                diag += [f"--- virtiofsd {tag}:", _tail(log, 20)]
            raise GuestError("\n".join(diag))
        t_start = _read(run / "t-start").strip()
        if handler_error is not None:
            raise handler_error
        return GuestResult(returncode=int(rc_text), output=output, console=console,
                           duration=time.monotonic() - start,
                           boot_time=float(t_start) if t_start else None, backend_logs=logs,
                           dmesg=_read(run / "dmesg"))
    finally:
        if control is not None:
            control.qmp.close()
        if qproc is not None and qproc.poll() is None:
            qproc.kill()
            qproc.wait()
        for _, p, _ in backends:
            _stop(p, 0)
        in_use.close()
        if os.environ.get("VFSDRV_VM_KEEP") == "1":
            print(f"vfsdrv-vm: kept {run}", file=sys.stderr)
        else:
            shutil.rmtree(run, ignore_errors=True)


# -- command line (run-guest.sh) --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run-guest.sh", description="Run SCRIPT (bash) in a QEMU "
                                 "guest with a virtio-fs PCI function; exit with its status "
                                 "(125: the guest could not be run).")
    ap.add_argument("script", nargs="?")
    ap.add_argument("--iommu", action="store_true", help="vIOMMU: type1 VFIO groups")
    ap.add_argument("--noiommu", action="store_true", help="vfio no-IOMMU mode")
    ap.add_argument("--iommufd", action="store_true",
                    help="vIOMMU with iommufd and VFIO device cdevs (backports kernel)")
    ap.add_argument("--kernel", choices=KERNELS, help="guest kernel (default: stable, "
                    "backports with --iommufd)")
    ap.add_argument("--bind-vfio", action="store_true", help="bind virtio-fs functions to vfio")
    ap.add_argument("--fs-dir", type=Path, help="directory the virtiofsd exports")
    ap.add_argument("--socket", type=Path, help="vhost-user socket of a running backend")
    ap.add_argument("--queues", type=int, default=1, help="number of request queues")
    ap.add_argument("--second-fs", metavar="TAG", help="add a second virtio-fs function")
    ap.add_argument("--rw-dir", type=Path, action="append", default=[])
    ap.add_argument("--karg", action="append", default=[], help="extra kernel argument")
    ap.add_argument("--qemu-arg", action="append", default=[], help="extra QEMU argument")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--prepare-only", action="store_true", help="prepare the kernel, then exit")
    a = ap.parse_args(argv)
    if a.script is None and not a.prepare_only:
        ap.error("SCRIPT is required")
    try:
        if a.prepare_only:
            print(prepare_kernel(kernel=a.kernel or
                                 ("backports" if a.iommufd else "stable")).kdir)
            return 0
        devs = [FsDevice(fs_dir=a.fs_dir, socket=a.socket, num_request_queues=a.queues)]
        if a.second_fs:
            devs.append(FsDevice(tag=a.second_fs))
        r = run_in_guest(a.script, iommu=a.iommu, noiommu=a.noiommu, iommufd=a.iommufd,
                         kernel=a.kernel, bind_vfio=a.bind_vfio,
                         fs_devices=devs, rw_dirs=a.rw_dir, kernel_args=a.karg,
                         extra_qemu_args=a.qemu_arg, timeout=a.timeout, cwd=Path.cwd(),
                         stream=sys.stdout)
    except GuestError as e:
        print(f"run-guest: {e}", file=sys.stderr)
        return 125
    print(f"run-guest: exit status {r.returncode}, {r.duration:.1f}s "
          f"(script started at guest uptime {r.boot_time}s)", file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
