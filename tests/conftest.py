from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import virtiofsd
from vfsdrv.fs.client import FuseClient
from vfsdrv.fs.config import encode_config
from vfsdrv.fs.device import VirtioFs
from vfsdrv.virtio.vhost_user import VhostUserTransport


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    return d


@pytest.fixture
def virtiofsd_socket(tmp_path: Path, export_dir: Path) -> Iterator[Path]:
    sock = tmp_path / "vfsd.sock"
    with virtiofsd(export_dir, sock):
        yield sock


def connect_virtiofsd(sock: Path, **fs_options) -> VirtioFs:
    """virtiofsd 7.2 has no config space: tag and queue count come from us."""
    transport = VhostUserTransport(str(sock), config=encode_config("myfs", 1), num_queues=2)
    try:
        return VirtioFs(transport, **fs_options).start()
    except BaseException:
        transport.close()
        raise


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
