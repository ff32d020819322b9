"""`vfsdrv demo --backend`: the whole demo (typed client, then a real mount used by
ordinary programs) on each backend the launcher knows."""

from __future__ import annotations

import subprocess
import sys

import pytest
from vfsdrv.tools import virtiofsd_rs
from vfsdrv.tools.backends import BACKENDS, DEFAULT_BACKEND

#: what FUSE_INIT says on each: the C virtiofsd speaks 7.36, the Rust one and the
#: reference device 7.38
PROTOCOL = {"virtiofsd": "protocol 7.36", "virtiofsd-rs": "protocol 7.38",
            "refdev": "protocol 7.38"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_on_each_backend(backend: str) -> None:
    if backend == "virtiofsd-rs":
        virtiofsd_rs.fetch(log=lambda _m: None)
    r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "demo", "--backend", backend],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"s  {backend} (pid " in r.stdout.splitlines()[0]
    assert PROTOCOL[backend] in r.stdout
    assert "sha256 matches host: True" in r.stdout
    assert r.stdout.rstrip().endswith("demo: OK")
    assert "WARNING" not in r.stderr, r.stderr


def test_default_backend_is_the_c_virtiofsd() -> None:
    assert DEFAULT_BACKEND == "virtiofsd"
    r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "demo", "--help"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert "virtiofsd,virtiofsd-rs,refdev" in r.stdout.replace(" ", "")
    assert "vfsdrv.tools.virtiofsd_rs" in r.stdout
