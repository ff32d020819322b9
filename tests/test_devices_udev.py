"""`vfsdrv udev`: config parsing, matching, unit names, install, and the add handler's
decisions (against a fake sysfs tree; the real udevd: tests/vm/test_udev_autobind.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_pci_sysfs import fake_sysfs
from vfsdrv.errors import VfsdrvError
from vfsdrv.tools import devices, udev

BDF = "0000:00:03.0"


def write_conf(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vfsdrv.conf"
    p.write_text(text)
    return p


def test_config_sections_and_keys(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, """
# comment
[tag:shared]
mountpoint = /srv/shared   # inline comment
options = ro, noexec
frontend = relay

[pci:00:04.0]

[tag:kept]
bind = no
""")
    entries = udev.load_config(conf)
    assert entries == [
        udev.Entry("tag", "shared", True, "/srv/shared", ["ro", "noexec"], "relay"),
        udev.Entry("pci", "0000:00:04.0", True, None, [], None),
        udev.Entry("tag", "kept", False, None, [], None),
    ]
    assert udev.match(entries, "0000:00:04.0", "whatever").key == "0000:00:04.0"
    assert udev.match(entries, BDF, "shared").key == "shared"
    assert udev.match(entries, BDF, "other") is None
    assert udev.match(entries, BDF, None) is None
    assert udev.load_config(tmp_path / "absent.conf") == []  # no file: nothing opted in


def test_config_options_are_those_vfsdrv_mount_takes(tmp_path: Path) -> None:
    """options = as `vfsdrv mount -o`: fsname= too (it names the source)."""
    conf = write_conf(tmp_path, "[tag:a]\nmountpoint = /m\noptions = ro,fsname=share,"
                      "request_timeout=30,nofail\nfrontend = pyfuse3\n")
    (entry,) = udev.load_config(conf)
    assert entry.options == ["ro", "fsname=share", "request_timeout=30", "nofail"]
    with pytest.raises(udev.UdevConfigError, match="blksize= is for block-device FUSE"):
        udev.load_config(write_conf(tmp_path, "[tag:a]\noptions = blksize=4096\n"))


@pytest.mark.parametrize("text,words", [
    ("[shared]\n", ["[tag:TAG] or [pci:BDF]"]),
    ("[pci:zz]\n", ["[pci:zz]", "bad PCI address"]),
    ("[tag:a]\nmountpoint = rel/dir\n", ["absolute path"]),
    ("[tag:a]\nbind = perhaps\n", ["use yes or no"]),
    ("[tag:a]\nbind = no\nmountpoint = /m\n", ["needs bind = yes"]),
    ("[tag:a]\nmount = /m\n", ["unknown key(s) mount", "known: bind, mountpoint"]),
    ("[tag:a]\n[tag:a]\n", ["already exists"]),
    # checked when the file is read, not at boot inside the unit
    ("[tag:a]\nfrontend = fuse\n", ["frontend = 'fuse'", "pyfuse3, relay"]),
    ("[tag:a]\noptions = ro,bogus\n", ["[tag:a]: options:", "unknown mount option(s): bogus"]),
    (f"[tag:{'t' * 37}]\n", ["must be 1-36 bytes"]),
    ("[pci:00:04.0]\n[pci:0000:00:04.0]\n", ["the same function as [pci:00:04.0]"]),
])
def test_config_errors_name_the_file_and_the_fix(tmp_path: Path, text: str,
                                                 words: list[str]) -> None:
    conf = write_conf(tmp_path, text)
    with pytest.raises(udev.UdevConfigError) as err:
        udev.load_config(conf)
    for w in words + [str(conf)]:
        assert w in str(err.value)


def test_unit_names_match_systemd_escape() -> None:
    for tag in ("myfs", "my-fs", "a b/c", "ünï", ".hidden", "x.y"):
        e = udev.Entry("tag", tag)
        name = udev.unit_name(e)
        want = subprocess.run(["systemd-escape", "--template=vfsdrv@.service", tag],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert name == want, tag


def test_install_writes_rule_unit_and_example(tmp_path: Path) -> None:
    written = udev.install(str(tmp_path), reload=False, command="/opt/x/bin/vfsdrv")
    rules = (tmp_path / udev.RULES_FILE).read_text()
    assert 'ATTR{vendor}=="0x1af4", ATTR{device}=="0x105a"' in rules
    assert 'RUN+="/opt/x/bin/vfsdrv udev add $kernel"' in rules and "@VFSDRV@" not in rules
    unit = (tmp_path / udev.UNIT_FILE).read_text()
    assert "ExecStart=/opt/x/bin/vfsdrv udev mount --foreground %I" in unit
    assert (tmp_path / udev.CONF_EXAMPLE).read_text().startswith("# /etc/vfsdrv.conf")
    assert len(written) == 3
    # the example config is valid and opts nothing in (all commented out)
    assert udev.load_config(tmp_path / udev.CONF_EXAMPLE) == []
    assert udev.uninstall(str(tmp_path), reload=False) == written
    assert not (tmp_path / udev.RULES_FILE).exists()


@pytest.mark.parametrize("dest", [udev.RULES_FILE, udev.UNIT_FILE, udev.CONF_EXAMPLE])
def test_install_refuses_to_overwrite_a_foreign_file(tmp_path: Path, dest: str) -> None:
    mine = tmp_path / dest
    mine.parent.mkdir(parents=True)
    mine.write_text("the administrator's own\n")
    with pytest.raises(VfsdrvError, match=f"{mine} exists and was not written by "
                       "`vfsdrv udev install`: remove it first"):
        udev.install(str(tmp_path), reload=False, command="/opt/x/bin/vfsdrv")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [mine]  # nothing half-written
    kept: list[Path] = []
    assert udev.uninstall(str(tmp_path), reload=False, kept=kept) == []
    assert kept == [mine] and mine.read_text() == "the administrator's own\n"


def test_udev_uninstall_cli_takes_no_reload_and_keeps_edits(tmp_path: Path) -> None:
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "udev", *args,
                               "--root", str(tmp_path), "--no-reload"],
                              capture_output=True, text=True, timeout=120)

    r = cli("install")
    assert r.returncode == 0, r.stderr
    rules = tmp_path / udev.RULES_FILE
    rules.write_text(rules.read_text() + "# mine\n")
    r = cli("uninstall")
    assert r.returncode == 0, r.stderr
    assert f"kept {rules}: not written by `vfsdrv udev install`, or changed since" in r.stderr
    assert f"removed {tmp_path / udev.UNIT_FILE}" in r.stdout
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [rules]


def test_add_decisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = fake_sysfs(tmp_path)
    bound: list[str] = []
    started: list[str] = []
    monkeypatch.setattr(devices, "bind", lambda bdf, tag, sysfs: (bound.append(bdf),
                                                                  (bdf, "virtio-pci"))[1])
    monkeypatch.setattr(udev, "start_mount", lambda e, c: (started.append(e.key), "started")[1])
    monkeypatch.setattr(devices, "describe", lambda bdf, sysfs: devices.DeviceInfo(
        bdf, "devtag", "device", "virtio-pci", None, None, 3))

    conf = write_conf(tmp_path, "")
    assert "opts nothing in" in udev.handle_add(BDF, conf, s)
    conf = write_conf(tmp_path, "[tag:other]\n")
    assert "not in" in udev.handle_add(BDF, conf, s) and "left with virtio-pci" in \
        udev.handle_add(BDF, conf, s)
    conf = write_conf(tmp_path, "[tag:devtag]\nbind = no\n")
    assert "bind = no; left alone" in udev.handle_add(BDF, conf, s)
    assert bound == [] and started == []

    conf = write_conf(tmp_path, "[tag:devtag]\n")
    msg = udev.handle_add(BDF, conf, s)
    assert "[tag:devtag] bound to vfio-pci (was virtio-pci)" in msg and "mount" not in msg
    assert bound == [BDF] and started == []

    conf = write_conf(tmp_path, "[pci:0:3.0]\nmountpoint = /mnt/x\n")
    msg = udev.handle_add("00:03.0", conf, s)
    assert "[pci:0000:00:03.0]" in msg and "mount on /mnt/x: started" in msg
    assert bound == [BDF, BDF] and started == [BDF]


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit template as systemd reads it (an instance of it, ExecStart resolved)."""
    udev.install(str(tmp_path), reload=False)
    unit = tmp_path / "vfsdrv@myfs.service"
    unit.write_text((tmp_path / udev.UNIT_FILE).read_text())
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    exec_start = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert exec_start == [f"ExecStart={udev.vfsdrv_command()} udev mount --foreground %I"]


def test_start_mount_uses_systemctl_when_systemd_runs(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With systemd as init, the unit is started without waiting (udev must not block);
    a failing systemctl is an error that names the unit."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setattr(udev, "systemd_running", lambda: True)
    done = udev.start_mount(udev.Entry("tag", "my fs", mountpoint="/m"), tmp_path / "c")
    assert done == "started vfsdrv@my\\x20fs.service"
    assert calls.read_text() == "--no-block start vfsdrv@my\\x20fs.service\n"
    fake.write_text('#!/bin/sh\necho "Unit not found." >&2\nexit 5\n')
    with pytest.raises(VfsdrvError, match=r"systemctl start vfsdrv@x.service failed: Unit not"):
        udev.start_mount(udev.Entry("tag", "x", mountpoint="/m"), tmp_path / "c")
