"""Fixtures of the mount suite (helpers in mount_helpers.py): `mnt` is one mount
per test module, frontend ("relay", "pyfuse3") and real device ("virtiofsd",
"virtiofsd-rs"); `work` gives each test a fresh directory seen from both sides
(host path, mount path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import DEVICES
from mount_helpers import FRONTENDS, Mounted, serving
from mounting import is_mounted


@pytest.fixture(scope="module", params=[(f, d) for d in DEVICES for f in FRONTENDS],
                ids=lambda p: "-".join(p))
def mnt(request, tmp_path_factory) -> Iterator[Mounted]:
    frontend, device = request.param
    base = tmp_path_factory.mktemp(f"mount-{frontend}-{device}")
    with serving(base, frontend, backend=device) as m:
        yield m
    assert not is_mounted(m.mnt)


@pytest.fixture
def work(mnt: Mounted, request) -> tuple[Path, Path]:
    """(host dir, mount dir): a fresh directory for one test."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    host = mnt.export / name
    host.mkdir()
    return host, mnt.mnt / name
