"""PCI functions in sysfs: addresses, identity, IOMMU groups, and driver binding.

Binding uses `driver_override` (the kernel's supported way to hand one function
to vfio-pci without touching the driver's ID table): write the override, unbind
from the current driver, ask the bus to probe. The original driver is remembered
(in memory and in a small state file, so a later process can undo a bind) and
restored by `unbind_vfio`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    BadAddressError,
    IommuUnavailableError,
    NotRootError,
    PciError,
    VfioUnavailableError,
)

SYSFS_PCI = Path("/sys/bus/pci")
NOIOMMU_PARAM = Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
VFIO_PCI = "vfio-pci"

_BDF = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])$"
)


def normalize_bdf(text: str) -> str:
    """'0:3.0', '00:03.0', '0000:00:03.0' -> '0000:00:03.0'. Raises BadAddressError."""
    m = _BDF.match(text.strip()) if isinstance(text, str) else None
    if not m or int(m["dev"], 16) > 0x1F:
        raise BadAddressError(
            f"bad PCI address {text!r}: expected [domain:]bus:device.function in hex, "
            "e.g. 0000:00:03.0 (device 00-1f, function 0-7); `lspci -D` lists them"
        )
    dom, bus, dev = (int(m[k] or "0", 16) for k in ("dom", "bus", "dev"))
    return f"{dom:04x}:{bus:02x}:{dev:02x}.{m['fn']}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "VFIO needs root: opening /dev/vfio, binding drivers in sysfs and reading physical "
            "addresses from /proc/self/pagemap all require it; run again with sudo"
        )


@dataclass(frozen=True)
class PciIdentity:
    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int


#: the lock files this process holds (Sysfs.owning), with their nesting depth
_owning: dict[str, int] = {}
_OWNING_MUTEX = threading.Lock()


class Sysfs:
    """sysfs access rooted at `root` (tests point it at a fake tree)."""

    def __init__(
        self,
        root: Path | str = SYSFS_PCI,
        noiommu_param: Path | str = NOIOMMU_PARAM,
        state_dir: Path | str | None = None,
    ) -> None:
        self.root = Path(root)
        self.noiommu_param = Path(noiommu_param)
        self.state_dir = Path(os.path.abspath(
            state_dir or os.environ.get("VFSDRV_STATE_DIR", "/run/vfsdrv")
        ))  # absolute: a background server leaves its working directory for /
        self._original: dict[str, str | None] = {}

    @contextlib.contextmanager
    def owning(self, bdf: str) -> Iterator[None]:
        """Exclusive, across processes, for taking a function (look at its driver,
        bind it, open it) or giving it back: two takers at once must not both bind
        it, and the one that loses must not unbind it under the winner. A lock file
        in the state directory (without one, not writable, nothing is serialized);
        nested in one process, the outer hold serves."""
        path = str(self.state_dir / f"{normalize_bdf(bdf)}.lock")
        with _OWNING_MUTEX:
            nested = path in _owning
            if nested:
                _owning[path] += 1
        if nested:
            try:
                yield
            finally:
                with _OWNING_MUTEX:
                    _owning[path] -= 1
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a bind and an open: brief
            with _OWNING_MUTEX:
                _owning[path] = 1
            yield
        finally:
            with _OWNING_MUTEX:
                _owning.pop(path, None)
            os.close(fd)  # releases the lock

    # -- identity --------------------------------------------------------------------------
    def device_dir(self, bdf: str) -> Path:
        bdf = normalize_bdf(bdf)
        path = self.root / "devices" / bdf
        if not path.exists():
            raise BadAddressError(
                f"no PCI function {bdf}: {path} does not exist; `lspci -D` lists the functions"
                " of this machine"
            )
        return path

    def _hex(self, bdf: str, name: str) -> int:
        return int((self.device_dir(bdf) / name).read_text().strip(), 16)

    def identity(self, bdf: str) -> PciIdentity:
        return PciIdentity(
            vendor=self._hex(bdf, "vendor"),
            device=self._hex(bdf, "device"),
            class_code=self._hex(bdf, "class"),
            subsystem_vendor=self._hex(bdf, "subsystem_vendor"),
            subsystem_device=self._hex(bdf, "subsystem_device"),
        )

    def functions(self, vendor: int | None = None, device: int | None = None) -> list[str]:
        """All BDFs, optionally only those with the given vendor/device ID."""
        out = []
        base = self.root / "devices"
        for path in sorted(base.iterdir()) if base.exists() else []:
            try:
                if vendor is not None and self._hex(path.name, "vendor") != vendor:
                    continue
                if device is not None and self._hex(path.name, "device") != device:
                    continue
            except (OSError, ValueError):
                continue
            out.append(path.name)
        return out

    def driver(self, bdf: str) -> str | None:
        link = self.device_dir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    # -- IOMMU groups ------------------------------------------------------------------------
    def iommu_group(self, bdf: str) -> int | None:
        link = self.device_dir(bdf) / "iommu_group"
        if not link.is_symlink():
            return None
        return int(os.path.basename(os.readlink(link)))

    def group_members(self, group: int) -> list[str]:
        path = self.root.parent.parent / "kernel" / "iommu_groups" / str(group) / "devices"
        if not path.exists():
            return []
        return sorted(p.name for p in path.iterdir())

    def noiommu_enabled(self) -> bool | None:
        """True/False from the vfio module parameter; None if vfio lacks no-IOMMU support
        (parameter absent: vfio not loaded or built without CONFIG_VFIO_NOIOMMU)."""
        try:
            return self.noiommu_param.read_text().strip() in ("Y", "1")
        except OSError:
            return None

    def vfio_dev_name(self, bdf: str) -> str | None:
        """'vfioN' for the iommufd character device /dev/vfio/devices/vfioN, if any."""
        path = self.device_dir(bdf) / "vfio-dev"
        if not path.is_dir():
            return None
        names = sorted(p.name for p in path.iterdir() if p.name.startswith("vfio"))
        return names[0] if names else None

    # -- binding ----------------------------------------------------------------------------
    def ensure_vfio_pci(self, load: bool = True) -> None:
        if (self.root / "drivers" / VFIO_PCI).is_dir():
            return
        if load and self.root == SYSFS_PCI:
            subprocess.run(["modprobe", "vfio-pci"], capture_output=True, check=False)
            if (self.root / "drivers" / VFIO_PCI).is_dir():
                return
        raise VfioUnavailableError(
            "the vfio-pci driver is not loaded: run `modprobe vfio-pci` (for no-IOMMU mode first "
            "`modprobe vfio enable_unsafe_noiommu_mode=1`); the kernel needs CONFIG_VFIO_PCI"
        )

    def _write(self, path: Path, text: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                require_root()
            raise PciError(f"writing {text.strip()!r} to {path} failed: {e.strerror}") from e

    def _state_file(self, bdf: str) -> Path:
        return self.state_dir / f"{bdf}.driver"

    def bind_vfio(self, bdf: str) -> str | None:
        """Bind `bdf` to vfio-pci; returns the driver it had before (None if none).
        Idempotent: a function already on vfio-pci is left alone."""
        bdf = normalize_bdf(bdf)
        self.ensure_vfio_pci()
        current = self.driver(bdf)
        if current == VFIO_PCI:
            return self._original.get(bdf, self._recorded_original(bdf))
        if self.iommu_group(bdf) is None and not self.noiommu_enabled():
            raise self.no_iommu_error(bdf)
        dev = self.device_dir(bdf)
        self._original[bdf] = current
        self._record_original(bdf, current)
        self._write(dev / "driver_override", VFIO_PCI)
        if current is not None:
            self._write(dev / "driver" / "unbind", bdf)
        self._write(self.root / "drivers_probe", bdf)
        if self.driver(bdf) != VFIO_PCI:
            raise PciError(
                f"binding {bdf} to vfio-pci failed (driver now: {self.driver(bdf) or 'none'}); "
                "`dmesg | tail` shows why (e.g. no IOMMU group and no-IOMMU mode off)"
            )
        return current

    def overridden_to_vfio(self, bdf: str) -> bool:
        """Whether `bdf` is set to bind to vfio-pci only (driver_override), bound or
        not: a raw unbind from vfio-pci leaves it so, with no driver."""
        try:
            return (self.device_dir(bdf) / "driver_override").read_text().strip() == VFIO_PCI
        except OSError:
            return False

    def unbind_vfio(self, bdf: str, restore: bool = True) -> str | None:
        """Take `bdf` off vfio-pci and give it back to its original driver (by default the
        one recorded at bind time; else whatever the kernel matches). Returns the new driver."""
        bdf = normalize_bdf(bdf)
        dev = self.device_dir(bdf)
        original = self._original.pop(bdf, self._recorded_original(bdf))
        self._write(dev / "driver_override", "\n")
        if self.driver(bdf) == VFIO_PCI:
            self._write(dev / "driver" / "unbind", bdf)
        if restore:
            if original:
                bind = self.root / "drivers" / original / "bind"
                if bind.exists():
                    try:
                        self._write(bind, bdf)
                    except PciError:
                        pass
            if self.driver(bdf) is None:
                self._write(self.root / "drivers_probe", bdf)
            if original and self.driver(bdf) != original:
                raise PciError(
                    f"{bdf} could not be given back to {original} (now: "
                    f"{self.driver(bdf) or 'no driver'}); try "
                    f"`modprobe {original.replace('-', '_')}`"
                    f" and `echo {bdf} > {self.root}/drivers/{original}/bind`"
                )
        try:
            self._state_file(bdf).unlink()
        except OSError:
            pass
        return self.driver(bdf)

    def forget(self, bdf: str) -> None:
        """Drop the record of `bdf`'s original driver (the function is gone)."""
        self._original.pop(bdf, None)
        try:
            self._state_file(bdf).unlink()
        except OSError:
            pass

    def _record_original(self, bdf: str, driver: str | None) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._state_file(bdf).write_text((driver or "") + "\n")
        except OSError:
            pass  # best effort: the in-memory record still works for this process

    def _recorded_original(self, bdf: str) -> str | None:
        try:
            return self._state_file(bdf).read_text().strip() or None
        except OSError:
            return None

    # -- diagnostics ------------------------------------------------------------------------
    def no_iommu_error(self, bdf: str) -> IommuUnavailableError:
        enabled = self.noiommu_enabled()
        if enabled is None:
            how = (
                "and this kernel's vfio module offers no no-IOMMU mode (not loaded, or built "
                "without CONFIG_VFIO_NOIOMMU): load it with `modprobe vfio "
                "enable_unsafe_noiommu_mode=1`, or rebuild vfio with CONFIG_VFIO_NOIOMMU=y"
            )
        else:
            how = (
                "and VFIO no-IOMMU mode is off: enable it with `echo Y > "
                f"{self.noiommu_param}` (unsafe: the device can DMA anywhere in memory)"
            )
        return IommuUnavailableError(
            f"{bdf} is in no IOMMU group: the IOMMU is off (boot with intel_iommu=on or "
            f"amd_iommu=on to use it) {how}"
        )

    def describe_members(self, bdf: str, group: int) -> list[str]:
        """Other functions of the group with the driver they are bound to."""
        out = []
        for other in self.group_members(group):
            if other == bdf:
                continue
            try:
                drv = self.driver(other)
            except PciError:
                drv = None
            out.append(f"{other} ({'bound to ' + drv if drv else 'no driver'})")
        return out
