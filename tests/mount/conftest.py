"""Fixtures of the mount suite (helpers in mount_helpers.py): `mnt` is one mount
per test module and frontend ("relay", "pyfuse3"); `work` gives each test a fresh
directory seen from both sides (host path, mount path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_helpers import FRONTENDS, Mounted, serving
from mounting import is_mounted


@pytest.fixture(scope="module", params=FRONTENDS)
def mnt(request, tmp_path_factory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp(f"mount-{request.param}")
    with serving(base, request.param) as m:
        yield m
    assert not is_mounted(m.mnt)


@pytest.fixture
def work(mnt: Mounted, request) -> tuple[Path, Path]:
    """(host dir, mount dir): a fresh directory for one test."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    host = mnt.export / name
    host.mkdir()
    return host, mnt.mnt / name
