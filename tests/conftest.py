from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import connect_virtiofsd, virtiofsd
from vfsdrv.fs.client import FuseClient
from vfsdrv.fs.device import VirtioFs


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
