"""Debian 13's Rust virtiofsd from Debian's packages (vfsdrv.tools.virtiofsd_rs): the
private apt configuration, the prefix it unpacks, the loader that runs it, and the
launcher's answer when it is missing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vfsdrv.errors import VfsdrvError
from vfsdrv.tools import virtiofsd_rs
from vfsdrv.tools.backends import Backend, check_available


@pytest.fixture(scope="module")
def installed() -> virtiofsd_rs.Installed:
    return virtiofsd_rs.fetch(log=lambda _m: None)


def system_apt_state() -> dict[str, str]:
    """What a fetch must leave alone: the system's sources, lists and dpkg database."""
    state = {}
    for top in (Path("/etc/apt"), Path("/var/lib/apt/lists")):
        for p in sorted(top.rglob("*")):
            if p.is_file():
                st = p.stat()
                state[str(p)] = f"{st.st_size}:{st.st_mtime_ns}"
    state["dpkg-status"] = hashlib.sha256(Path("/var/lib/dpkg/status").read_bytes()).hexdigest()
    return state


def test_prefix_runs_on_its_own_libraries(installed: virtiofsd_rs.Installed) -> None:
    assert Path(installed.argv()[0]).name.startswith("ld-linux")  # the prefix's loader
    assert installed.argv()[1] == "--library-path"
    assert virtiofsd_rs.verify(installed).startswith("virtiofsd 1.")
    # every library the loader maps comes from the prefix, none from this Debian 12
    out = subprocess.run([*installed.argv()[:3], "--list", str(installed.binary)],
                         capture_output=True, text=True, check=True).stdout
    loaded = [ln.split("=>")[-1].split(" (")[0].strip() for ln in out.splitlines() if "/" in ln]
    assert len(loaded) >= 6, out  # libseccomp, libcap-ng, libgcc_s, libm, libc, the loader
    root = installed.root.resolve()
    assert all(Path(p).resolve().is_relative_to(root) for p in loaded), out
    names = installed.packages().split()
    for pkg in virtiofsd_rs.PACKAGES:
        assert any(n.startswith(f"{pkg}_") for n in names), (pkg, names)


def test_second_fetch_is_immediate_and_offline(installed: virtiofsd_rs.Installed,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a mirror that cannot be reached: a fetch that went to the network would fail
    monkeypatch.setenv("VFSDRV_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    t0 = time.monotonic()
    again = virtiofsd_rs.fetch(installed.root.parent, log=lambda _m: None)
    assert time.monotonic() - t0 < 0.5
    assert again == installed


def test_a_library_missing_from_the_prefix_is_caught(installed: virtiofsd_rs.Installed,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    broken = virtiofsd_rs.Installed(root)
    for lib in broken.libdir.glob("libseccomp.so*"):
        lib.unlink()
    with pytest.raises(VfsdrvError, match="libseccomp|not found|from the system"):
        virtiofsd_rs.verify(broken)


def test_missing_prefix_says_how_to_get_it(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFSDRV_VIRTIOFSD_RS_DIR", str(tmp_path / "none"))
    assert virtiofsd_rs.find() is None
    with pytest.raises(VfsdrvError, match=r"-m vfsdrv\.tools\.virtiofsd_rs"):
        check_available("virtiofsd-rs")
    env = {**os.environ, "VFSDRV_VIRTIOFSD_RS_DIR": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "demo", "--backend",
                        "virtiofsd-rs"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "-m vfsdrv.tools.virtiofsd_rs" in r.stderr and "trixie" in r.stderr, r.stderr
    assert not (tmp_path / "none").exists()  # the demo fetches nothing itself


def test_fresh_fetch_leaves_the_system_apt_alone(tmp_path: Path) -> None:
    """A whole fetch into an empty directory (apt-get update of trixie, download,
    unpack, verify): the private apt state is used, the system's is untouched."""
    before = system_apt_state()
    base = tmp_path / "trixie"
    got = virtiofsd_rs.fetch(base, log=lambda _m: None)
    assert system_apt_state() == before
    assert got.root == base / "root"
    assert virtiofsd_rs.verify(got).startswith("virtiofsd 1.")
    sources = (base / "apt" / "sources.list").read_text()
    assert " trixie main" in sources and "signed-by=" in sources
    assert list((base / "apt" / "lists").glob("*trixie*Packages*"))
    assert not (base / "root.new").exists() and not (base / "debs").exists()


def test_backend_serves_from_the_prefix(installed: virtiofsd_rs.Installed,
                                        tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    with Backend("virtiofsd-rs", export, tmp_path / "s.sock", tag="rs") as b:
        assert b.has_config_space and b.tag == "rs"
        exe = os.readlink(f"/proc/{b.proc.pid}/exe")
        assert Path(exe).resolve().is_relative_to(installed.root.resolve())
    assert b.proc.returncode is not None
