"""The mount.vfsdrv helper's command line (what mount(8) passes it): every value is
checked the way `vfsdrv mount` checks it, a bad one is a one-line error naming the
option with status 1, a failed mount is status 32 (mount(8)'s convention), and -f
(fake) checks the line and mounts nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vfsdrv.tools.mount import HelperUsageError, mount_helper_main, parse_helper_args


@pytest.mark.parametrize("opt,why", [
    ("timeout=nan", "seconds must be more than 0"),
    ("timeout=inf", "seconds must be more than 0"),
    ("timeout=0", "seconds must be more than 0"),
    ("timeout=-1", "seconds must be more than 0"),
    ("timeout=x", "not a number of seconds"),
    ("request_queues=abc", "not a whole number"),
    ("request_queues=5000", "from 1 to"),
    ("threads=0", "from 1 to"),
    ("iommu=bogus", "give one of"),
    ("frontend=nope", "give one of"),
    ("ring=round", "give split or packed"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], opt: str, why: str) -> None:
    assert mount_helper_main([str(tmp_path / "s.sock"), str(tmp_path), "-o", opt]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mount.vfsdrv: -o {opt}: ") and why in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_options_are_taken() -> None:
    req = parse_helper_args(["/run/x.sock", "/m", "-o",
                             "threads=2,request_queues=3,timeout=2.5,iommu=type1,ring=split"])
    assert (req.threads, req.request_queues, req.timeout, req.iommu, req.ring) == \
        (2, 3, 2.5, "type1", "split")
    assert not req.fake


def test_the_completed_words_are_the_parsed_ones() -> None:
    """Shell completion offers exactly what the parsers take: every word of it is known
    (with a value where it ends in =), and the helper consumes its own words itself."""
    from vfsdrv.frontends.fuse_dev import MountOptions, option_words
    from vfsdrv.tools.manpages import helper_option_words, mount_option_words

    values = {"request_timeout=": "2", "io_uring=": "1", "frontend=": "relay",
              "ring=": "split", "iommu=": "type1", "log=": "/tmp/x.log", "tag=": "t",
              "max_read=": "65536"}
    for word in option_words():
        opt = word + values.get(word, "1") if word.endswith("=") else word
        mo = MountOptions.parse([opt])
        assert not mo.unknown and not mo.invalid, (opt, mo)
    assert set(option_words()) < set(mount_option_words()) < set(helper_option_words())
    own = [w for w in helper_option_words() if w not in mount_option_words()]
    for word in own:
        opt = word + values.get(word, "1") if word.endswith("=") else word
        req = parse_helper_args(["/run/x.sock", "/m", "-o", opt])
        assert req.options == [] or word == "remount", (opt, req.options)


def test_fake_mounts_nothing(tmp_path: Path) -> None:
    """-f (also in a group, -fv): the socket does not exist, so a real mount would fail."""
    for flags in (["-f"], ["-fv"], ["-s", "-f"]):
        assert mount_helper_main([*flags, str(tmp_path / "none.sock"), str(tmp_path)]) == 0
    assert mount_helper_main(["-f", str(tmp_path / "s.sock"), str(tmp_path),
                              "-o", "timeout=0"]) == 1  # the line is still checked
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


@pytest.mark.parametrize("opt", ["bogus=1", "poll_us=5000", "request_timeout=0.5",
                                 "max_background=70000", "blksize=4096"])
def test_fake_checks_the_options_as_the_mount_does(tmp_path: Path, opt: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A line the real mount refuses for its options is status 1 with -f and without."""
    for flags in (["-f"], []):
        assert mount_helper_main([*flags, str(tmp_path / "s.sock"), str(tmp_path),
                                  "-o", opt]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("mount.vfsdrv: ") and err.count("\n") == 1, err


def test_mount8_helper_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mount(8)'s helper interface: -t TYPE and -N NAMESPACE take values, -s drops
    unknown options, and a spec without its device is a bad line."""
    sock, mnt = str(tmp_path / "s.sock"), str(tmp_path)
    assert mount_helper_main([sock, mnt, "-f", "-t", "vfsdrv.x", "-o", "ro"]) == 0
    assert mount_helper_main([sock, mnt, "-f", "-N", str(os.getpid())]) == 0  # our own
    assert mount_helper_main([sock, mnt, "-f", "-N", "/nonexistent/ns"]) == 1
    assert "-N /nonexistent/ns" in capsys.readouterr().err
    assert mount_helper_main([sock, mnt, "-f", "-s", "-o", "bogus=1,ro"]) == 0
    assert "ignoring the unknown option bogus=1" in capsys.readouterr().err
    assert parse_helper_args([sock, mnt, "-s", "-o", "bogus=1,ro"]).options == ["ro"]
    for spec in ("vhost-user:", "pci:"):
        assert mount_helper_main([spec, mnt, "-f"]) == 1
        assert "names no device" in capsys.readouterr().err
    assert mount_helper_main([sock, mnt, "-f", "-x"]) == 1
    assert mount_helper_main([sock, mnt, "-f", "-N"]) == 1


def test_a_failed_mount_is_status_32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mount_helper_main([str(tmp_path / "none.sock"), str(tmp_path)]) == 32
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--threads", "0"], ["--small-slots", "0"],
                                  ["--large-slots", "x"]])
def test_vfsdrv_mount_counts_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "mount", "--vhost-user",
                        str(tmp_path / "s.sock"), *args, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"argument {args[0]}" in r.stderr, r.stderr


@pytest.mark.parametrize("args,why", [
    (["--frontend", "pyfuse3", "--threads", "2"], "--threads sets the relay's native pumps"),
    (["--iommu", "type1"], "--iommu is for a PCI function"),
    (["--force-4k-noiommu"], "--force-4k-noiommu is for a PCI function"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path: Path, args: list[str],
                                                   why: str) -> None:
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))  # a socket nobody serves: the check comes before any exchange
        r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "mount", "--vhost-user",
                            str(sock), *args, str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr, r.stderr  # a bad command line
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


@pytest.mark.parametrize("spec", ["no-such-tag-here", "pci:0000:ff:1f.7"])
def test_nofail_forgives_a_pci_function_that_is_not_there(tmp_path: Path, spec: str,
                                                          capsys) -> None:
    """fstab's nofail: no function with that tag or address is reported and the mount
    succeeds (status 0), as libmount does for a missing block device; without nofail
    it is a failed mount (32). Looked up before the server forks, so the helper can
    tell "not there" from any other failure."""
    if os.geteuid() != 0:
        pytest.skip("mount.vfsdrv checks for root before it looks")
    assert mount_helper_main([spec, str(tmp_path)]) == 32
    assert mount_helper_main([spec, str(tmp_path), "-o", "nofail"]) == 0
    err = capsys.readouterr().err
    assert "nofail: not mounted, no error" in err and "no " in err


def test_mount_log_is_moved_aside_when_it_has_grown(tmp_path: Path) -> None:
    """A starting background server moves a mount.log past the limit to mount.log.1
    (the one before is replaced) and starts a new one; a smaller one is appended to."""
    from vfsdrv.tools.mount import MOUNT_LOG_LIMIT, _rotated

    log = tmp_path / "mount.log"
    log.write_text("small\n")
    assert _rotated(log) == log and log.read_text() == "small\n"
    (tmp_path / "mount.log.1").write_text("oldest\n")
    log.write_bytes(b"x" * (MOUNT_LOG_LIMIT + 1))
    assert _rotated(log) == log and not log.exists()
    assert (tmp_path / "mount.log.1").stat().st_size == MOUNT_LOG_LIMIT + 1
    assert _rotated(tmp_path / "none.log") == tmp_path / "none.log"  # nothing yet: fine


def test_a_socket_named_without_a_slash_is_a_path_not_a_tag(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "ref.sock"))
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            req = parse_helper_args(["ref.sock", "/m"])
            other = parse_helper_args(["myfs", "/m"])
        finally:
            os.chdir(cwd)
    assert (req.vhost_user, req.tag) == ("ref.sock", None)
    assert (other.vhost_user, other.tag) == (None, "myfs")


@pytest.mark.parametrize("opt", ["max_read=65536", "poll_us=10", "strictatime"])
def test_an_option_pyfuse3_refuses_is_refused_before_the_device(
        tmp_path: Path, opt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked with the line (-f too), never after connecting: a virtiofsd serves one
    connection, and a refusal after it would cost the user the device."""
    for flags in (["-f"], []):
        assert mount_helper_main([*flags, str(tmp_path / "none.sock"), str(tmp_path),
                                  "-o", f"frontend=pyfuse3,{opt}"]) == 1, flags
        err = capsys.readouterr().err
        assert "not for the pyfuse3 frontend" in err, err


def test_a_remount_by_hand_keeps_the_flags_it_does_not_name(monkeypatch) -> None:
    """`mount.vfsdrv SPEC DIR -o remount,ro` run by hand (mount(8) would pass every
    present option): ro is applied over the mount's present flags, nosuid stays."""
    from vfsdrv.frontends import fuse_dev
    from vfsdrv.tools import mount as m

    got = []
    monkeypatch.setattr(m, "find_mount", lambda path: (path, "fuse.vfsdrv"))
    monkeypatch.setattr(m, "mount_flags_of", lambda mp: ["rw", "nosuid", "nodev", "relatime"])
    monkeypatch.setattr(m, "remount", lambda mp, flags: got.append((mp, flags)))
    assert m.mount_helper_main(["vhost-user:/s", "/mnt/x", "-o", "remount,ro"]) == 0
    want = fuse_dev.MS_RDONLY | fuse_dev.MS_NOSUID | fuse_dev.MS_NODEV | fuse_dev.MS_RELATIME
    assert got == [("/mnt/x", want)]
    got.clear()
    assert m.mount_helper_main(["vhost-user:/s", "/mnt/x", "-o", "remount,rw,suid"]) == 0
    assert got == [("/mnt/x", fuse_dev.MS_NODEV | fuse_dev.MS_RELATIME)]


def test_a_remount_takes_what_mount_passes_back_and_refuses_the_unknown() -> None:
    """mount(8) passes the mount's present options, FUSE's own and the fstab line's,
    on a remount: all taken (only the flags change); an unknown word is refused as on
    a mount, unless -s."""
    line = ("remount,ro,user_id=0,group_id=0,rootmode=40000,default_permissions,"
            "allow_other,max_read=131072,tag=t,frontend=relay,request_timeout=5,noatime,"
            "x-systemd.automount,_netdev,nofail")
    req = parse_helper_args(["/run/x.sock", "/m", "-o", line])
    assert req.remount == ["ro", "noatime"]
    with pytest.raises(HelperUsageError, match="unknown option.* bogus"):
        parse_helper_args(["/run/x.sock", "/m", "-o", "remount,rw,bogus"])
    assert parse_helper_args(["-s", "/run/x.sock", "/m", "-o", "remount,rw,bogus"]).remount \
        == ["rw"]


def test_a_line_copied_from_the_mount_table_mounts() -> None:
    """/proc/mounts shows FUSE's own user_id=, group_id= (and fstab copies may carry
    rootmode=): the server sets those itself, so a copied line mounts without them."""
    req = parse_helper_args(["/run/x.sock", "/m", "-t", "fuse.vfsdrv", "-o",
                             "rw,nosuid,nodev,relatime,user_id=0,group_id=0,rootmode=40000,"
                             "default_permissions,allow_other"])
    assert req.remount is None
    assert req.options == ["rw,nosuid,nodev,relatime,default_permissions,allow_other"]


def test_udev_install_refuses_an_empty_root(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "udev", "install", "--root",
                        "", "--no-reload"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 1 and "--root needs a directory" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
