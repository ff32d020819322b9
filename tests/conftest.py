from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import DEVICES, connect_virtiofsd, device
from vfsdrv.fs.client import FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev import RefDevice
from vfsdrv.virtio.vhost_user import VhostUserTransport


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    return d


@pytest.fixture(params=DEVICES)
def device_name(request) -> str:
    """Each real device in turn: Debian 12's C virtiofsd, Debian 13's Rust one."""
    return request.param


@pytest.fixture
def virtiofsd_socket(tmp_path: Path, export_dir: Path, device_name: str) -> Iterator[Path]:
    sock = tmp_path / "vfsd.sock"
    with device(device_name, export_dir, sock):
        yield sock


@pytest.fixture(params=["interrupt", "poll"])
def fs(request, virtiofsd_socket: Path) -> Iterator[VirtioFs]:
    dev = connect_virtiofsd(virtiofsd_socket, poll=request.param == "poll")
    try:
        dev.init()
        yield dev
    finally:
        dev.close()


@pytest.fixture
def client(fs: VirtioFs) -> FuseClient:
    return FuseClient(fs)


def pytest_report_header(config) -> str:
    return f"running as uid {os.getuid()}"


# -- the reference device, in this process, with the driver attached -----------------
@pytest.fixture
def sock_dir() -> Iterator[str]:
    # unix socket paths are limited to 108 bytes: keep them short
    d = tempfile.mkdtemp(prefix="refdev-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def device_factory(export_dir: Path, sock_dir: str) -> Iterator:
    devices: list[RefDevice] = []

    def make(**options) -> RefDevice:
        dev = RefDevice(os.path.join(sock_dir, f"d{len(devices)}.sock"), str(export_dir), **options)
        dev.start()
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        dev.stop()


@pytest.fixture
def connect() -> Iterator:
    opened: list[VirtioFs] = []

    def attach(dev: RefDevice, **fs_options) -> FuseClient:
        fs = VirtioFs(VhostUserTransport(dev.socket_path), **fs_options).start()
        opened.append(fs)
        fs.init()
        return FuseClient(fs)

    yield attach
    for fs in opened:
        fs.close()


@pytest.fixture
def pci_connect() -> Iterator[Callable[..., FuseClient]]:
    """Attach the driver's PCI transport to a RefDevice through the emulated virtio-pci
    function (tests/fakes/vhost_pci_bridge.py; `bridge`: its options); FUSE_INIT done."""
    # imported here: the bridge imports a test module (test_pci_transport)
    from fakes.vhost_pci_bridge import VhostPciFunction
    from vfsdrv.virtio import pci as vp

    opened: list[VirtioFs] = []

    def attach(dev: RefDevice, *, poll: bool = False, bridge: dict | None = None,
               **fs_options) -> FuseClient:
        fn = VhostPciFunction(dev.socket_path, **(bridge or {}))
        try:
            t = vp.VirtioPciTransport(fn, poll=poll, device_id=vp.VIRTIO_ID_FS)
        except BaseException:
            fn.close()
            raise
        fs = VirtioFs(t, poll=poll, **fs_options)
        opened.append(fs)
        fs.start()
        fs.init()
        return FuseClient(fs)

    yield attach
    for fs in opened:
        fs.close()


@pytest.fixture
def nulldev_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """The null device's source next to these tests, installed package or not (it is
    not in the package)."""
    if "VFSDRV_NULLDEV_SOURCE" not in os.environ:
        monkeypatch.setenv("VFSDRV_NULLDEV_SOURCE",
                           str(Path(__file__).resolve().parents[1] / "benchmarks" / "nulldev.c"))
