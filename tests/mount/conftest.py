"""Fixtures of the mount suite (helpers in mount_helpers.py): `mnt` is one mount
per test module, frontend ("relay", "pyfuse3") and device: the real ones
("virtiofsd", "virtiofsd-rs") and the reference device with each virtqueue layout
("refdev-split", "refdev-packed": --ring forced on the device and the mount);
`work` gives each test a fresh directory seen from both sides (host path, mount
path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import DEVICES
from mount_helpers import FRONTENDS, Mounted, serving
from mounting import is_mounted

#: the reference device forced to each virtqueue layout (issue 12 item 1)
REFDEV_RINGS = ["refdev-split", "refdev-packed"]


@pytest.fixture(scope="module",
                params=[(f, d) for d in [*DEVICES, *REFDEV_RINGS] for f in FRONTENDS],
                ids=lambda p: "-".join(p))
def mnt(request, tmp_path_factory) -> Iterator[Mounted]:
    frontend, device = request.param
    base = tmp_path_factory.mktemp(f"mount-{frontend}-{device}")
    if device in REFDEV_RINGS:
        ring = device.removeprefix("refdev-")
        kw = {"backend": "refdev", "vfsd_args": ("--ring", ring), "mount_args": ("--ring", ring)}
    else:
        kw = {"backend": device}
    with serving(base, frontend, **kw) as m:
        yield m
    assert not is_mounted(m.mnt)


@pytest.fixture
def work(mnt: Mounted, request) -> tuple[Path, Path]:
    """(host dir, mount dir): a fresh directory for one test."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    host = mnt.export / name
    host.mkdir()
    return host, mnt.mnt / name
