"""Installing vfsdrv as a system tool (issue 11): `vfsdrv install`/`uninstall`, the
generated manual pages and completion, the unit's readiness, the wheel's tag and
the wheel on another Python, installed data found outside sys.prefix, the sdist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from vfsdrv.tools.mount import parse_helper_args

ROOT = Path(__file__).resolve().parents[1]
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


def vfsdrv(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSDRV, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


# -- install / uninstall ------------------------------------------------------------------
def test_install_then_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "vfsdrv.conf").write_text("[tag:x]\n")  # the admin's: never touched
    r = vfsdrv("install", "--root", root, "--no-reload")
    assert r.returncode == 0, r.stderr
    helper = root / "sbin" / "mount.vfsdrv"
    for rel in ("sbin/mount.vfsdrv", "sbin/mount.fuse.vfsdrv", "etc/udev/rules.d/70-vfsdrv.rules",
                "etc/systemd/system/vfsdrv@.service", "usr/local/share/man/man8/vfsdrv.8",
                "usr/local/share/man/man8/mount.vfsdrv.8",
                "usr/share/bash-completion/completions/vfsdrv"):
        assert (root / rel).is_file(), rel
        assert f"wrote {root / rel}" in r.stdout
    assert os.access(helper, os.X_OK)
    # the helper runs this installation's mount.vfsdrv
    h = subprocess.run([str(helper)], capture_output=True, text=True, timeout=60)
    assert h.returncode == 1 and "usage: mount.vfsdrv SPEC MOUNTPOINT" in h.stderr
    unit = (root / "etc/systemd/system/vfsdrv@.service").read_text()
    assert "Type=notify" in unit and "@VFSDRV@" not in unit

    r = vfsdrv("uninstall", "--root", root, "--no-reload")
    assert r.returncode == 0, r.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["etc/vfsdrv.conf"]


def test_install_leaves_a_foreign_helper_alone(tmp_path: Path) -> None:
    helper = tmp_path / "sbin" / "mount.vfsdrv"
    helper.parent.mkdir()
    helper.write_text("#!/bin/sh\necho somebody else's\n")
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 1 and "was not written by `vfsdrv install`" in r.stderr
    assert "somebody else's" in helper.read_text()
    vfsdrv("uninstall", "--root", tmp_path, "--no-reload")
    assert helper.exists()


def test_man_pages_and_completion_follow_the_command_line(tmp_path: Path) -> None:
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "usr/local/share/man/man8/vfsdrv.8").read_text()
    for text in ("\\fB\\-\\-timeout\\fR", ".SS status", ".SS udev install", "\\fB\\-\\-json\\fR"):
        assert text in page, text
    # refdev hands its arguments to the device's own parser: the page shows that one's
    refdev = page[page.index(".SS refdev"):]
    assert "\\fB\\-\\-socket\\fR" in refdev and "\\fB\\-\\-notify\\-buf\\-size\\fR" in refdev
    if shutil.which("man"):
        out = subprocess.run(["man", "-l", str(tmp_path / "usr/local/share/man/man8/vfsdrv.8")],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MANWIDTH": "100"})
        assert "vfsdrv mount" in out.stdout and "--vhost-user SOCKET" in out.stdout
    comp = tmp_path / "usr/share/bash-completion/completions/vfsdrv"

    def complete(*words: str) -> list[str]:
        script = (f"source {comp}; COMP_WORDS=(vfsdrv {' '.join(words)}); "
                  f"COMP_CWORD={len(words)}; _vfsdrv; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                             timeout=30, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert complete("st") == ["status"]
    assert "--timeout" in complete("mount", "--t")
    assert complete("udev", "ins") == ["install"]
    assert "--json" in complete("status", "--")
    assert "--source" in complete("refdev", "--s")
    (tmp_path / "mnt").mkdir()
    # a command's own arguments and an option's free value are files (mount points,
    # sockets, logs), an option's choices are that command's own
    assert complete("umount", "mn") == ["mnt"]
    (tmp_path / "my dir").mkdir()
    assert complete("umount", "my") == ["my dir"]  # one name, spaces and all
    assert complete("mount", "--log", "mn") == ["mnt"]
    backends = complete("demo", "--backend", "''")
    assert "virtiofsd" in backends and "null" not in backends  # null: bench's only
    # a value that happens to be a command's name is a value
    assert complete("mount", "--tag", "install", "--fr") == ["--frontend"]
    # -o: comma separated mount options, the last one completed
    assert complete("mount", "-o", "ro,nosu") == ["ro,nosuid"]
    # "=" splits bash's words: the -o value is completed whole all the same
    assert complete("mount", "-o", "max_read", "=", "4096,nosu") == ["4096,nosuid"]
    assert complete("mount", "-o", "max_read", "=", "4096,request_timeout", "=", "5,io_u") \
        == ["5,io_uring="]
    assert not any(complete("mount", "-o", "ta"))  # tag= is mount.vfsdrv's only


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_installed_unit_verifies(tmp_path: Path) -> None:
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    units = tmp_path / "etc/systemd/system"
    v = subprocess.run(["systemd-analyze", "verify",
                        str(units / "vfsdrv@shared.service")],
                       capture_output=True, text=True, timeout=60, cwd=units)
    assert v.returncode == 0, v.stderr
    assert "vfsdrv@" not in v.stderr, v.stderr  # no complaint about our unit


# the files install writes besides the helper, each of which may be an administrator's own
ADMIN_FILES = ("usr/local/sbin/vfsdrv", "etc/udev/rules.d/70-vfsdrv.rules",
               "etc/systemd/system/vfsdrv@.service", "etc/vfsdrv.conf.example",
               "usr/local/share/man/man8/vfsdrv.8",
               "usr/share/bash-completion/completions/mount.vfsdrv")


@pytest.mark.parametrize("rel", ADMIN_FILES)
def test_install_refuses_to_overwrite_a_foreign_file(tmp_path: Path, rel: str) -> None:
    """Not only the helper: any file install did not write is left alone, and nothing
    is half-written (all targets are checked first)."""
    mine = tmp_path / rel
    mine.parent.mkdir(parents=True)
    mine.write_text("the administrator's own\n")
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 1, r.stdout
    assert f"{mine} exists and was not written by `vfsdrv install`: remove it first" in r.stderr
    assert mine.read_text() == "the administrator's own\n"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [rel]  # nothing else was written
    r = vfsdrv("uninstall", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    assert mine.read_text() == "the administrator's own\n"
    assert f"kept {mine}" in r.stderr


def test_reinstall_and_an_install_from_elsewhere_are_overwritten(tmp_path: Path) -> None:
    from vfsdrv.tools import udev

    for _ in range(2):
        r = vfsdrv("install", "--root", tmp_path, "--no-reload")
        assert r.returncode == 0, r.stderr
    # what an install from another venv (another command) wrote, before the files were
    # stamped: the templates' output
    src = udev.templates_dir()
    for template, dest in (("70-vfsdrv.rules.in", udev.RULES_FILE),
                           ("vfsdrv@.service.in", udev.UNIT_FILE)):
        (tmp_path / dest).write_text((src / template).read_text()
                                     .replace("@VFSDRV@", "/opt/other venv/bin/vfsdrv"))
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    assert "/opt/other" not in (tmp_path / udev.UNIT_FILE).read_text()
    # ... and an older vfsdrv's (stamped, other text) goes on uninstall
    unit = tmp_path / udev.UNIT_FILE
    unit.write_text(udev.stamped("[Service]\nExecStart=/old/vfsdrv udev mount %I\n"))
    r = vfsdrv("uninstall", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_uninstall_keeps_an_edited_unit(tmp_path: Path) -> None:
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/vfsdrv@.service"
    unit.write_text(unit.read_text().replace("TimeoutStopSec=45", "TimeoutStopSec=90"))
    edited = unit.read_text()
    r = vfsdrv("uninstall", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    assert unit.read_text() == edited
    assert f"kept {unit}: not written by `vfsdrv install`, or changed since" in r.stderr
    assert f"removed {tmp_path / 'etc/udev/rules.d/70-vfsdrv.rules'}" in r.stdout
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["etc/systemd/system/vfsdrv@.service"]
    # and a new install will not overwrite the edit either
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 1 and f"{unit} exists and was not written" in r.stderr
    assert unit.read_text() == edited


# -- the mount(8) helper's options -------------------------------------------------------------
def test_helper_accepts_what_mount8_and_systemd_pass() -> None:
    req = parse_helper_args(["vhost-user:/run/x.sock", "/mnt/x", "-o",
                             "_netdev,nofail,defaults,noauto,auto,user,nouser,"
                             "x-systemd.automount,X-mount.mkdir,comment=foo,ro,tag=t,timeout=3"])
    assert req.vhost_user == "/run/x.sock"
    assert req.source == "vhost-user:/run/x.sock"
    assert req.options == ["ro"]
    assert req.tag == "t" and req.timeout == 3.0
    assert parse_helper_args(["pci:0000:00:04.0", "/m"]).source == "pci:0000:00:04.0"
    assert parse_helper_args(["shared", "/m"]).source == "shared"
    assert parse_helper_args(["/run/y.sock", "/m", "-o", "fsname=mine"]).source == "mine"


# -- the command line --------------------------------------------------------------------------
def test_version_and_verbose_after_the_command() -> None:
    r = vfsdrv("--version")
    assert r.returncode == 0 and r.stdout.startswith("vfsdrv ")
    from importlib.metadata import version

    assert r.stdout.split()[1] == version("vfsdrv")
    r = vfsdrv("udev", "show", "-v")
    assert r.returncode == 0, r.stderr
    # a config file named but not there is a typo, not "nothing opted in"
    r = vfsdrv("udev", "show", "-v", "--config", "/nonexistent")
    assert r.returncode == 1 and "--config /nonexistent: no such file" in r.stderr, r.stderr
    r = vfsdrv("status", "-vv", "--json")
    assert r.returncode == 0, r.stderr


# -- packaging ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("vfsdrv-*.whl")
    return whl


def test_wheel_is_tagged_abi3(wheel: Path) -> None:
    assert wheel.name.endswith("-cp311-abi3-linux_x86_64.whl") or "-abi3-" in wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Root-Is-Purelib: false" in text
    assert any(line.startswith("Tag: cp311-abi3-") for line in text.splitlines()), text
    assert [n for n in names if n.endswith(".so")] == ["vfsdrv/_native.abi3.so"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def other_python() -> str | None:
    """An interpreter of another minor version than this one (3.12, 3.13, ...)."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [shutil.which(f"python3.{m}") for m in range(12, 16)]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        for m in range(12, 16):
            candidates += sorted(Path(root, "versions").glob(f"3.{m}.*/bin/python3.{m}"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            ver = subprocess.run([str(c), "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.split()
            if len(ver) == 2 and ver != mine.split(".") and int(ver[1]) >= 11:
                return str(c)
    return None


def test_the_wheel_runs_the_demo_on_another_python(wheel: Path, tmp_path: Path) -> None:
    py = other_python()
    if py is None:
        pytest.skip("no Python >= 3.12 besides this one (python3.12+, pyenv)")
    venv = tmp_path / "venv"
    subprocess.run([py, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr  # pip refuses a wheel tagged for another Python
    r = subprocess.run([str(venv / "bin/vfsdrv"), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("vfsdrv "), r.stderr
    r = subprocess.run([str(venv / "bin/vfsdrv"), "demo"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("demo: OK")


def test_installed_data_is_found_outside_sys_prefix(wheel: Path, tmp_path: Path) -> None:
    """pip install --prefix (as a system-wide install puts data in /usr/local): the udev
    templates are found through the distribution's RECORD, not sys.prefix."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    prefix = tmp_path / "prefix"
    # the new venv's own pip: this one's would uninstall the vfsdrv it runs first
    r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
                        "--prefix", str(prefix), str(wheel)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    site = next(prefix.glob("lib/python3*/site-packages"))
    cffi_dir = Path(__import__("_cffi_backend").__file__).parent
    code = "from vfsdrv.tools.udev import templates_dir; print(templates_dir())"
    out = subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": f"{site}:{cffi_dir}"},
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(prefix / "share/vfsdrv/udev")


def test_sdist_is_a_complete_source_release(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (sdist,) = tmp_path.glob("vfsdrv-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for must in ("LICENSE", "docs/conformance.rst", "docs/driver-checklist.rst",
                 "tests/conftest.py", "tests/backends.py",
                 "tests/driver_helpers.py", "tests/mounting.py", "tests/run.sh",
                 "tools/setup-env.sh", "udev/vfsdrv@.service.in", "setup.cfg"):
        assert must in names, must
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_the_audit_checklist_is_shipped() -> None:
    """Every checklist number the audit cites is an item of docs/driver-checklist.rst."""
    import re

    from vfsdrv.refdev.audit import STATEMENTS

    text = (ROOT / "docs" / "driver-checklist.rst").read_text()
    items = {int(n) for n in re.findall(r"^(\d+)\. ", text, re.M)}
    assert items == set(range(1, 73))
    assert {s.checklist for s in STATEMENTS} <= items


def test_udev_config_takes_a_timeout(tmp_path: Path) -> None:
    from vfsdrv.tools import udev

    conf = tmp_path / "vfsdrv.conf"
    conf.write_text("[tag:a]\nmountpoint = /m\ntimeout = 2.5\n")
    (entry,) = udev.load_config(conf)
    assert entry.timeout == 2.5
    for bad in ("0", "soon"):
        conf.write_text(f"[tag:a]\ntimeout = {bad}\n")
        with pytest.raises(udev.UdevConfigError, match="give seconds"):
            udev.load_config(conf)


@pytest.mark.parametrize("cmd", [("install",), ("udev", "install")])
def test_a_root_that_is_a_file_is_a_one_line_error(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    root = tmp_path / "file"
    root.write_text("not a directory\n")
    r = vfsdrv(*cmd, "--root", root, "--no-reload")
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"vfsdrv: error: cannot write {root}/") and \
        "Not a directory" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert root.read_text() == "not a directory\n"


def test_an_install_that_fails_part_way_says_what_it_wrote(tmp_path: Path) -> None:
    (tmp_path / "usr/local/share").mkdir(parents=True)
    (tmp_path / "usr/local/share/man").write_text("a file where a directory goes")
    r = vfsdrv("install", "--root", tmp_path, "--no-reload")
    assert r.returncode == 1, r.stderr
    assert "Not a directory; written before it: " in r.stderr
    assert f"{tmp_path}/sbin/mount.vfsdrv" in r.stderr
    assert f"vfsdrv uninstall --root {tmp_path} removes them" in r.stderr
    r = vfsdrv("uninstall", "--root", tmp_path, "--no-reload")
    assert r.returncode == 0, r.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [tmp_path / "usr/local/share/man"], left
