"""Real programs on a real `vfsdrv mount` over VFIO in the QEMU guest: type1, no-IOMMU,
and iommufd (the backports kernel: /dev/iommu and the device cdev /dev/vfio/devices/vfioN
bound to an IOAS, chosen by `vfsdrv mount` on its own).

One guest boot per mode, everything in one guest script (this file, run as
`python test_mount_vfio.py --guest MODE`):

  1. the function starts on virtio-pci; `vfsdrv mount --tag myfs /mnt/x` (relay
     frontend, the command binds the function to vfio-pci itself) returns once the
     mount is usable, with nothing on stderr (no-IOMMU: huge pages are reserved first,
     so the DMA block is on pages that never move);
  2. real programs on the mount: cp in and out (byte for byte against the host's
     copy), mv, rename over an existing file (mv and os.replace), ln, ln -s, chmod,
     chown, touch -d, truncate, du, find, tar of a tree in and out, diff -r, the
     Python file API with mmap, xattrs (setfattr/getfattr and os.*xattr), hard links,
     fsync, statfs and fcntl/flock locks;
  3. `vfsdrv umount /mnt/x`: the serving process ends, the function goes back to
     virtio-pci, and the kernel's `mount -t virtiofs myfs` works again and sees what
     the vfsdrv mount wrote;
  4. (no-IOMMU) two servers killed with SIGKILL: the binding they leave is named by
     `vfsdrv list`, taken over by the next mount, and given back by `vfsdrv umount`.

The serving process's open files show which VFIO interface it uses (container and
group, or /dev/iommu and the device cdev). In iommufd mode the same kernel then
mounts with `--iommu type1` (the group and container, forced) and refuses
`--iommu noiommu` (the function is behind an IOMMU).

The host then checks the exported directory: contents, modes, owners, times,
links, xattrs, sizes, the trees.

virtiofsd is started here (the product's launcher, `-o xattr`), so that xattrs work;
in type1 mode also with `-o posix_lock -o flock`: the relay then offers the kernel
POSIX and flock locks and they are the device's (not in the guest's /proc/locks, a
blocking request answered EOPNOTSUPP by virtiofsd 7.2, which does not wait); in
no-IOMMU mode virtiofsd grants none and the guest kernel keeps them (in /proc/locks,
a blocking request really waits).

The type1 run once more with Debian 13's Rust virtiofsd behind the function
(vfsdrv.tools.backends, fetched by python -m vfsdrv.tools.virtiofsd_rs): started
without --tag (QEMU 7.2's vhost-user-fs-pci ignores a backend's config space: the
tag is QEMU's), it takes over no locks, so the guest kernel keeps them as in
no-IOMMU mode.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

MNT = "/mnt/x"
KMNT = "/mnt/k"
BIG_SIZE = 3 << 20  # + 12345: not a multiple of any page or block size
MTIME = 981173106  # 2001-02-03 04:05:06 UTC
CHOWN = (1234, 5678)
#: see test_pci_vfio.py: a slow TCG boot with interrupt remapping can fail the timer check
IOMMU_KARGS = ("no_timer_check",)
#: 2 MiB pages reserved in no-IOMMU mode: the mount's DMA block (~18 MiB) fits
HUGEPAGES = 16
LOCKING_VIRTIOFSD = ("-o", "posix_lock", "-o", "flock", "--thread-pool-size=4")


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def tree_files() -> dict[str, bytes]:
    """The tree cp -a / tar / diff -r work on: nested dirs, empty and odd-sized files."""
    files: dict[str, bytes] = {}
    for i in range(24):
        sub = ["", "a/", "a/b/", "c/d/e/"][i % 4]
        files[f"tree/{sub}f{i:02d}.dat"] = payload(100 + i, (i * 7919) % 70_000)
    files["tree/empty"] = b""
    files["tree/a/b/text.txt"] = b"hello from the host\n" * 50
    return files


# -- host side (pytest) -----------------------------------------------------------------------


def _prepare(tmp_path: Path) -> tuple[Path, Path]:
    src, share = tmp_path / "src", tmp_path / "share"
    for name, data in tree_files().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "tree/c/link").symlink_to("d/e/f03.dat")
    (src / "tree/a/f01.dat").chmod(0o755)
    (src / "big.bin").write_bytes(payload(1, BIG_SIZE + 12345))
    (src / "hostfile.bin").write_bytes(payload(2, 1 << 20))
    share.mkdir()
    (share / "hostfile.bin").write_bytes(payload(2, 1 << 20))
    (share / "lk").write_bytes(b"0123456789" * 100)
    (share / "victim").write_bytes(b"old content")
    os.chmod(share, 0o755)
    return src, share


def _run(guest, tmp_path: Path, mode: str,
         backend: str = "virtiofsd") -> tuple[dict, Path, Path]:
    from harness import GUEST_PYTHON, FsDevice
    from vfsdrv.tools.backends import Backend

    src, share = _prepare(tmp_path)
    sock = tmp_path / "vfsd.sock"
    extra = LOCKING_VIRTIOFSD if mode != "noiommu" and backend == "virtiofsd" else ()
    with Backend(backend, share, sock, extra=extra):
        r = guest(
            f"{GUEST_PYTHON} {Path(__file__).resolve()} --guest {mode} {src}",
            iommu=mode == "type1",
            iommufd=mode == "iommufd",
            noiommu=mode == "noiommu",
            kernel_args=IOMMU_KARGS if mode != "noiommu" else (),
            fs_devices=[FsDevice(socket=sock)],
            timeout=900,
        )
    lines = [ln for ln in r.output.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{r}\n--- console:\n{r.console[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    print(f"{mode}: guest run {r.duration:.1f}s (boot {r.boot_time}s), steps "
          f"{res['timings']}; locks {res.get('locks')}; mount stderr "
          f"{res.get('mount_stderr', '').strip()!r}")
    assert res["errors"] == {}, "\n\n".join(f"{k}: {v}" for k, v in res["errors"].items())
    return res, src, share


def _check_host(res: dict, src: Path, share: Path) -> None:
    """What the guest did, seen in the exported directory on the host."""
    assert (share / "in/big.bin").read_bytes() == (src / "big.bin").read_bytes()
    # cp -a of the tree, tar into the mount: both equal to the source, links included
    for top in ("cpa", "untar"):
        for name, data in tree_files().items():
            assert (share / top / name).read_bytes() == data, (top, name)
            # cp -a and tar keep modification times
            assert int((share / top / name).stat().st_mtime) == \
                int((src / name).stat().st_mtime), (top, name)
        assert os.readlink(share / top / "tree/c/link") == "d/e/f03.dat"
        assert (share / top / "tree/a/f01.dat").stat().st_mode & 0o777 == 0o755
    # mv, and rename over existing files
    assert not (share / "in/moved.src").exists()
    assert (share / "moved/dst").read_bytes() == b"moved file\n"
    assert (share / "victim").read_bytes() == b"new content via mv\n"
    assert (share / "victim2").read_bytes() == b"replaced by os.replace\n"
    assert not (share / "repl.tmp").exists()
    # hard links: one inode, three names (one was removed again)
    h1, h2, h3 = (share / f"links/h{i}" for i in (1, 2, 3))
    assert h1.stat().st_ino == h2.stat().st_ino == h3.stat().st_ino
    assert h1.stat().st_nlink == 3 and not (share / "links/h4").exists()
    assert h1.read_bytes() == b"written via h2\n"
    assert os.readlink(share / "links/sym") == "h1"
    assert os.readlink(share / "links/dangling") == "no/such/file"
    # chmod, chown, touch -d
    assert (share / "attrs/f").stat().st_mode & 0o7777 == 0o640
    assert (share / "attrs/x").stat().st_mode & 0o777 == 0o751
    st = (share / "attrs/owned").stat()
    assert (st.st_uid, st.st_gid) == CHOWN
    assert int((share / "attrs/f").stat().st_mtime) == MTIME
    assert int((share / "attrs/f").stat().st_atime) == MTIME
    # truncate
    grown = share / "trunc/grown"
    assert grown.stat().st_size == 10 << 20 and grown.stat().st_blocks * 512 < 1 << 20
    assert grown.read_bytes() == b"start" + bytes((10 << 20) - 5)
    assert (share / "trunc/shrunk").read_bytes() == (src / "big.bin").read_bytes()[:1000]
    # the Python file API and mmap
    assert (share / "py/api.bin").read_bytes() == _py_api_expected()
    assert (share / "py/mapped.bin").read_bytes() == _mmap_expected()
    # xattrs
    assert os.getxattr(share / "attrs/f", "user.color") == b"blue"
    assert os.getxattr(share / "attrs/f", "user.bin") == bytes(range(256)) * 4
    assert "user.gone" not in os.listxattr(share / "attrs/f")
    # fsync'd file
    assert (share / "fsync.bin").read_bytes() == payload(5, 300_000)
    # statfs: the guest saw the exported file system's figures
    host = os.statvfs(share)
    g = res["statfs"]
    assert (g["bsize"], g["blocks"], g["files"], g["namemax"]) == \
        (host.f_bsize, host.f_blocks, host.f_files, host.f_namemax)
    assert abs(g["bfree"] - host.f_bfree) < host.f_blocks // 10 + 1000
    # written by the kernel's own virtiofs mount after the vfsdrv umount
    assert (share / "kernel-wrote").read_text() == "kernel virtiofs after vfsdrv\n"


def _check_guest(res: dict, mode: str, device_locks: bool | None = None) -> None:
    """`device_locks`: the device takes over locks (default: the C virtiofsd in every
    mode but no-IOMMU, where it is started without -o posix_lock -o flock)."""
    if device_locks is None:
        device_locks = mode != "noiommu"
    assert res["driver_before"] == "virtio-pci"
    assert res["driver_mounted"] == "vfio-pci"
    assert res["mount_type"] == "fuse.vfsdrv" and res["mount_source"] == "myfs"
    # type1: DMA through the IOMMU; no-IOMMU: on the reserved huge pages, so no warning
    assert res["mount_stderr"] == ""
    node = res["vfio_node"]
    assert node.startswith("/dev/vfio/noiommu-" if mode == "noiommu" else "/dev/vfio/")
    assert (mode == "noiommu") == ("noiommu" in node)
    # what the serving process holds open: iommufd and the device cdev, or the
    # container and the group (the group node exists in every mode)
    fds = res["server_vfio_fds"]
    if mode == "iommufd":
        assert "/dev/iommu" in fds, fds
        assert any(f.startswith("/dev/vfio/devices/vfio") for f in fds), fds
        assert "/dev/vfio/vfio" not in fds and node not in fds, fds
    else:
        assert "/dev/vfio/vfio" in fds and node in fds, fds
        assert "/dev/iommu" not in fds, fds
    assert res["hostfile_out_ok"] and res["big_out_ok"] and res["big_in_ok"]
    assert res["du_apparent"] == sum(len(d) for d in tree_files().values()) + len("d/e/f03.dat")
    assert res["du_sparse_kib"] < 1024
    expect_found = sorted(f"{MNT}/cpa/{n}" for n in tree_files())
    assert res["find_files"] == expect_found
    assert res["find_name"] == [f"{MNT}/cpa/tree/a/b/text.txt"]
    assert res["find_link"] == [f"{MNT}/cpa/tree/c/link"]
    for name in ("diff_cpa", "diff_untar", "diff_tar_out", "diff_mount_trees"):
        assert res[name] == [0, ""], (name, res[name])
    assert res["diff_detects"][0] == 1 and "differ" in res["diff_detects"][1]
    assert res["hardlink_nlink"] == [3, 3, 3] and res["hardlink_same_ino"]
    assert res["nlink_after_rm"] == 3
    assert res["readlink"] == "h1" and res["through_symlink"] == "written via h2\n"
    assert res["dangling_enoent"]
    assert res["chmod_modes"] == [0o640, 0o751] and res["chown"] == list(CHOWN)
    assert res["touch_mtime"] == MTIME
    assert res["truncate_sizes"] == [10 << 20, 1000]
    assert res["py_api_ok"] and res["py_mmap_ok"] and res["mmap_host_file_ok"]
    assert res["py_errors"] == ["FileNotFoundError", "FileExistsError", "IsADirectoryError",
                                "OSError:39"]
    assert res["xattr_get"] == "blue" and res["xattr_list"] >= ["user.bin", "user.color"]
    assert res["xattr_missing"] == 61  # ENODATA
    assert res["rename_over_ino"] and res["fsync_ok"]
    locks = res["locks"]
    assert locks["getlk_type"] == 1  # F_WRLCK: the holder's lock is seen
    assert locks["conflict"] == 11 and locks["flock_conflict"] == 11  # EAGAIN
    assert locks["free_range_ok"] and locks["after_release_ok"]
    if device_locks:  # virtiofsd -o posix_lock -o flock: the device's locks
        assert locks["in_proc_locks"] is False
        assert locks["setlkw"] == 95 and locks["flock_wait"] == 95  # EOPNOTSUPP, no waiting
    else:  # no locks from virtiofsd: the guest kernel's own
        assert locks["in_proc_locks"] is True
        assert locks["setlkw"] == "waited" and locks["flock_wait"] == "waited"
    # umount: the serving process ended and gave the function back
    assert res["unmounted"] and res["driver_after"] == "virtio-pci"
    assert res["kernel_mount_ok"] and res["kernel_sees_vfsdrv_files"]
    assert res["left_processes"] == []


def test_mount_vfio_type1(guest, tmp_path: Path) -> None:
    res, src, share = _run(guest, tmp_path, "type1")
    _check_guest(res, "type1")
    _check_host(res, src, share)


def test_mount_vfio_type1_rust_virtiofsd(guest, tmp_path: Path) -> None:
    """The type1 run with Debian 13's Rust virtiofsd as the device: it takes over no
    locks (the guest kernel keeps them), everything else as with the C one."""
    from vfsdrv.tools import virtiofsd_rs

    virtiofsd_rs.fetch(log=lambda _m: None)
    res, src, share = _run(guest, tmp_path, "type1", backend="virtiofsd-rs")
    _check_guest(res, "type1", device_locks=False)
    _check_host(res, src, share)


def test_mount_vfio_noiommu(guest, tmp_path: Path) -> None:
    res, src, share = _run(guest, tmp_path, "noiommu")
    _check_guest(res, "noiommu")
    _check_host(res, src, share)
    # two servers killed with SIGKILL, one after the other (Guest.killed)
    k = res["killed"]
    for name, mnt in (("first", "/mnt/z"), ("second", "/mnt/w")):
        rc, err, killed, driver, left = k[name]
        assert rc == 0 and killed == 1, (name, k)
        assert driver == "vfio-pci" and [x["mountpoint"] for x in left if x] == [mnt], k
    rc, err, driver = k["umount_first"]  # the binding is the second server's now
    assert rc == 0 and err == "" and driver == "vfio-pci", k
    rc, err, driver, left = k["umount_second"]
    assert rc == 0 and "given back to virtio-pci" in err and driver == "virtio-pci", k
    assert left == [None], k


def test_mount_vfio_iommufd(guest, vm_kernel_backports, tmp_path: Path) -> None:
    res, src, share = _run(guest, tmp_path, "iommufd")
    _check_guest(res, "iommufd")
    _check_host(res, src, share)
    # the same kernel, forced: the type1 container works, no-IOMMU is refused
    forced = res["forced"]
    major, minor = (int(x) for x in forced["uname"].split(".")[:2])
    assert (major, minor) >= (6, 6), forced  # VFIO device cdevs arrived in 6.6
    assert forced["type1_rc"] == 0, forced
    assert "/dev/vfio/vfio" in forced["type1_fds"] and "/dev/iommu" not in forced["type1_fds"]
    assert forced["type1_read_ok"] and forced["type1_driver_after"] == "virtio-pci", forced
    assert forced["noiommu_rc"] != 0 and "behind an IOMMU" in forced["noiommu_err"], forced
    assert forced["noiommu_driver_after"] == "virtio-pci", forced


# -- guest side -------------------------------------------------------------------------------


def _py_api_expected() -> bytes:
    # "A" * 5000, "HELLO" at 100, "appended" at the end, "end" at 8000 past a hole
    return (b"A" * 100 + b"HELLO" + b"A" * 4895 + b"appended" + bytes(8000 - 5008)
            + b"end")


def _mmap_expected() -> bytes:
    b = bytearray(payload(6, 3 * 4096 + 100))
    b[10:15] = b"MMAP1"
    b[4096 * 2 + 7 : 4096 * 2 + 12] = b"MMAP2"
    return bytes(b)


class Guest:
    """The guest script: each step records into `res`; a failing step is recorded
    with its traceback and the script goes on (the host shows every failure)."""

    def __init__(self, mode: str, src: str) -> None:
        self.mode, self.src = mode, Path(src)
        self.bdf = os.environ["VFSDRV_VM_BDF"]
        self.m = Path(MNT)
        self.res: dict = {"mode": mode, "errors": {}, "timings": {}}

    # helpers
    def sh(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        import subprocess

        p = subprocess.run(argv, input=input, capture_output=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"{argv} exited {p.returncode}: "
                               f"{p.stdout.decode(errors='replace')}"
                               f"{p.stderr.decode(errors='replace')}")
        return p.stdout.decode(errors="replace")

    def run(self, *argv: str) -> list:
        import subprocess

        p = subprocess.run(argv, capture_output=True, text=True)
        return [p.returncode, (p.stdout + p.stderr).strip()]

    def driver(self) -> str:
        link = Path(f"/sys/bus/pci/devices/{self.bdf}/driver")
        return os.path.basename(os.readlink(link)) if link.exists() else "none"

    def drop_caches(self) -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def step(self, name: str, fn) -> None:
        import time
        import traceback

        t0 = time.monotonic()
        try:
            fn()
        except Exception:
            self.res["errors"][name] = traceback.format_exc()
        self.res["timings"][name] = round(time.monotonic() - t0, 1)
        print(f"step {name}: {self.res['timings'][name]}s", flush=True)

    # steps
    def mount(self) -> None:
        import subprocess

        res = self.res
        res["driver_before"] = self.driver()
        os.makedirs(MNT, exist_ok=True)
        if self.mode == "noiommu":  # without an IOMMU: DMA on huge pages, which never move
            Path("/proc/sys/vm/nr_hugepages").write_text(f"{HUGEPAGES}\n")
        p = subprocess.run(["vfsdrv", "mount", "--tag", "myfs", MNT], capture_output=True,
                           text=True)
        res["mount_stderr"] = p.stderr
        if p.returncode != 0:
            raise RuntimeError(f"vfsdrv mount exited {p.returncode}: {p.stderr}")
        mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
        mine = [m for m in mounts if m[1] == MNT]
        res["mount_type"], res["mount_source"] = mine[-1][2], mine[-1][0]
        res["driver_mounted"] = self.driver()
        res["vfio_node"] = self.sh("bash", "-c", f"vfsdrv_vfio_group {self.bdf}").strip()
        res["server_vfio_fds"] = self._vfio_fds(MNT)

    def copies(self) -> None:
        res, m, src = self.res, self.m, self.src
        (m / "in").mkdir()
        self.sh("cp", str(src / "big.bin"), str(m / "in/big.bin"))
        (m / "cpa").mkdir()
        self.sh("cp", "-a", str(src / "tree"), str(m / "cpa"))  # -> cpa/tree
        out = Path("/tmp/out")
        out.mkdir()
        self.drop_caches()  # what comes back out is read from the device
        self.sh("cp", str(m / "hostfile.bin"), str(out / "hostfile.bin"))
        self.sh("cp", str(m / "in/big.bin"), str(out / "big.bin"))
        res["hostfile_out_ok"] = (out / "hostfile.bin").read_bytes() == \
            (src / "hostfile.bin").read_bytes()
        res["big_out_ok"] = (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        res["big_in_ok"] = self.run("cmp", str(src / "big.bin"), str(m / "in/big.bin"))[0] == 0

    def moves(self) -> None:
        m = self.m
        (m / "in/moved.src").write_text("moved file\n")
        (m / "moved").mkdir()
        self.sh("mv", str(m / "in/moved.src"), str(m / "moved/dst"))  # across directories
        (m / "new.tmp").write_text("new content via mv\n")
        before = (m / "victim").stat().st_ino
        self.sh("mv", "-f", str(m / "new.tmp"), str(m / "victim"))  # over an existing file
        (m / "victim2").write_text("to be replaced\n")
        (m / "repl.tmp").write_text("replaced by os.replace\n")
        new_ino = (m / "repl.tmp").stat().st_ino
        os.replace(m / "repl.tmp", m / "victim2")
        self.res["rename_over_ino"] = ((m / "victim2").stat().st_ino == new_ino
                                       and (m / "victim").stat().st_ino != before
                                       and (m / "victim").read_text() == "new content via mv\n")

    def links(self) -> None:
        res, m = self.res, self.m / "links"
        m.mkdir()
        (m / "h1").write_text("first\n")
        self.sh("ln", str(m / "h1"), str(m / "h2"))
        self.sh("ln", str(m / "h1"), str(m / "h3"))
        self.sh("ln", str(m / "h1"), str(m / "h4"))
        self.sh("rm", str(m / "h4"))
        with open(m / "h2", "w") as f:
            f.write("written via h2\n")
        sts = [(m / f"h{i}").stat() for i in (1, 2, 3)]
        res["hardlink_nlink"] = [s.st_nlink for s in sts]
        res["hardlink_same_ino"] = len({s.st_ino for s in sts}) == 1
        res["nlink_after_rm"] = sts[0].st_nlink
        self.sh("ln", "-s", "h1", str(m / "sym"))
        self.sh("ln", "-s", "no/such/file", str(m / "dangling"))
        res["readlink"] = self.sh("readlink", str(m / "sym")).strip()
        res["through_symlink"] = self.sh("cat", str(m / "sym"))
        res["dangling_enoent"] = self.run("cat", str(m / "dangling"))[0] != 0 and \
            (m / "dangling").is_symlink()

    def attrs(self) -> None:
        res, m = self.res, self.m / "attrs"
        m.mkdir()
        for n in ("f", "x", "owned"):
            (m / n).write_text(n)
        self.sh("chmod", "640", str(m / "f"))
        self.sh("chmod", "u=rwx,g=rx,o=x", str(m / "x"))
        self.sh("chown", f"{CHOWN[0]}:{CHOWN[1]}", str(m / "owned"))
        self.sh("touch", "-d", "2001-02-03 04:05:06 UTC", str(m / "f"))
        res["chmod_modes"] = [(m / n).stat().st_mode & 0o7777 for n in ("f", "x")]
        st = (m / "owned").stat()
        res["chown"] = [st.st_uid, st.st_gid]
        res["touch_mtime"] = int((m / "f").stat().st_mtime)
        # xattrs: the attr tools, then the Python API
        self.sh("setfattr", "-n", "user.color", "-v", "blue", str(m / "f"))
        self.sh("setfattr", "-n", "user.gone", "-v", "x", str(m / "f"))
        self.sh("setfattr", "-x", "user.gone", str(m / "f"))
        res["xattr_get"] = self.sh("getfattr", "--only-values", "-n", "user.color",
                                   str(m / "f"))
        os.setxattr(m / "f", "user.bin", bytes(range(256)) * 4)
        assert os.getxattr(m / "f", "user.bin") == bytes(range(256)) * 4
        res["xattr_list"] = sorted(a for a in os.listxattr(m / "f") if a.startswith("user."))
        try:
            os.getxattr(m / "f", "user.gone")
            res["xattr_missing"] = 0
        except OSError as e:
            res["xattr_missing"] = e.errno

    def truncates(self) -> None:
        m = self.m / "trunc"
        m.mkdir()
        (m / "grown").write_bytes(b"start")
        self.sh("truncate", "-s", "10M", str(m / "grown"))
        self.sh("cp", str(self.src / "big.bin"), str(m / "shrunk"))
        self.sh("truncate", "-s", "1000", str(m / "shrunk"))
        self.res["truncate_sizes"] = [(m / n).stat().st_size for n in ("grown", "shrunk")]
        self.res["du_sparse_kib"] = int(self.sh("du", "-sk", str(m / "grown")).split()[0])

    def trees(self) -> None:
        res, m, src = self.res, self.m, self.src
        res["du_apparent"] = int(self.sh("du", "-sb", "--", str(m / "cpa")).split()[0]) - \
            sum(os.lstat(d).st_size for d, _, _ in os.walk(m / "cpa"))
        res["find_files"] = sorted(self.sh("find", str(m / "cpa"), "-type", "f").split())
        res["find_name"] = self.sh("find", str(m / "cpa"), "-name", "text.txt").split()
        res["find_link"] = self.sh("find", str(m / "cpa"), "-type", "l").split()
        # tar into the mount, tar out of the mount
        (m / "untar").mkdir()
        self.sh("tar", "-C", str(src), "-cf", "/tmp/in.tar", "tree")
        self.sh("tar", "-C", str(m / "untar"), "-xf", "/tmp/in.tar")
        self.drop_caches()
        self.sh("tar", "-C", str(m / "cpa"), "-cf", "/tmp/out.tar", "tree")
        Path("/tmp/tarout").mkdir()
        self.sh("tar", "-C", "/tmp/tarout", "-xf", "/tmp/out.tar")
        res["diff_cpa"] = self.run("diff", "-r", "--no-dereference", str(src / "tree"),
                                   str(m / "cpa/tree"))
        res["diff_untar"] = self.run("diff", "-r", "--no-dereference", str(src / "tree"),
                                     str(m / "untar/tree"))
        res["diff_tar_out"] = self.run("diff", "-r", "--no-dereference", str(src / "tree"),
                                       "/tmp/tarout/tree")
        res["diff_mount_trees"] = self.run("diff", "-r", str(m / "cpa/tree"),
                                           str(m / "untar/tree"))
        # and diff notices a change made through the mount
        (m / "untar/tree/a/b/text.txt").write_bytes(b"changed\n")
        res["diff_detects"] = self.run("diff", "-rq", str(m / "cpa/tree"), str(m / "untar/tree"))
        (m / "untar/tree/a/b/text.txt").write_bytes(b"hello from the host\n" * 50)
        self.sh("touch", "-r", str(src / "tree/a/b/text.txt"), str(m / "untar/tree/a/b/text.txt"))

    def python_api(self) -> None:
        import mmap

        res, m = self.res, self.m / "py"
        m.mkdir()
        p = m / "api.bin"
        with open(p, "wb") as f:
            f.write(b"A" * 5000)
            f.seek(100)
            f.write(b"HELLO")
        with open(p, "ab") as f:
            f.write(b"appended")
        fd = os.open(p, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"end", 8000) == 3
            assert os.pread(fd, 5, 100) == b"HELLO"
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(p, "r+b") as f:
            buf = bytearray(8003)
            assert f.readinto(buf) == 8003
        res["py_api_ok"] = bytes(buf) == _py_api_expected() and p.stat().st_size == 8003
        errs = []
        for fn in (lambda: open(m / "missing"), lambda: (m / "sub").mkdir() or (m / "sub").mkdir(),
                   lambda: open(m / "sub", "w"),
                   lambda: ((m / "sub/f").write_text("x"), os.rmdir(m / "sub"))):
            try:
                fn()
                errs.append("no error")
            except OSError as e:
                name = type(e).__name__
                errs.append(f"OSError:{e.errno}" if name == "OSError" else name)
        res["py_errors"] = errs
        # mmap: write through a shared mapping, msync, read back from the device
        q = m / "mapped.bin"
        q.write_bytes(payload(6, 3 * 4096 + 100))
        with open(q, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[10:15] = b"MMAP1"
            mm[4096 * 2 + 7 : 4096 * 2 + 12] = b"MMAP2"
            mm.flush()
        self.drop_caches()
        res["py_mmap_ok"] = q.read_bytes() == _mmap_expected()
        with open(self.m / "hostfile.bin", "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            res["mmap_host_file_ok"] = mm[:] == (self.src / "hostfile.bin").read_bytes()

    def sync_and_statfs(self) -> None:
        fd = os.open(self.m / "fsync.bin", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            data = payload(5, 300_000)
            assert os.write(fd, data) == len(data)
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.drop_caches()
        self.res["fsync_ok"] = (self.m / "fsync.bin").read_bytes() == data
        s = os.statvfs(self.m)
        self.res["statfs"] = {"bsize": s.f_bsize, "blocks": s.f_blocks, "bfree": s.f_bfree,
                              "files": s.f_files, "namemax": s.f_namemax}

    def locks(self) -> None:
        import fcntl
        import struct
        import subprocess

        out: dict = {}
        self.res["locks"] = out
        path = self.m / "lk"
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline().strip() == "locked"
            st = path.stat()
            dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
            out["in_proc_locks"] = dev in Path("/proc/locks").read_text()
            fd = os.open(path, os.O_RDWR)
            try:
                got = fcntl.fcntl(fd, fcntl.F_GETLK,
                                  struct.pack("hhqqi", fcntl.F_WRLCK, 0, 50, 10, 0))
                out["getlk_type"] = struct.unpack("hhqqi", got)[0]
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0))
                    out["conflict"] = 0
                except OSError as e:
                    out["conflict"] = e.errno
                fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 200, 10, 0))
                out["free_range_ok"] = True
                out["setlkw"] = self._blocking(
                    lambda: fcntl.fcntl(fd, fcntl.F_SETLKW,
                                        struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0)))
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDWR)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    out["flock_conflict"] = 0
                except OSError as e:
                    out["flock_conflict"] = e.errno
                out["flock_wait"] = self._blocking(lambda: fcntl.flock(fd, fcntl.LOCK_EX))
            finally:
                os.close(fd)
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(30)
        fd = os.open(path, os.O_RDWR)
        try:  # free once the holder is gone
            fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out["after_release_ok"] = True
        finally:
            os.close(fd)

    @staticmethod
    def _blocking(fn) -> int | str:
        """A blocking lock request on a held lock: its errno, or "waited" when it was
        still blocked after 2 s (then broken off by SIGALRM: the handler raises, since
        Python retries a call interrupted by a handler that returns)."""
        import signal

        class Waited(Exception):
            pass

        def alarm(*_: object) -> None:
            raise Waited

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            fn()
            return "granted"
        except Waited:
            return "waited"
        except OSError as e:
            return e.errno
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def umount(self) -> None:
        import time

        res = self.res
        self.sh("vfsdrv", "umount", MNT)
        deadline = time.monotonic() + 60  # the serving process gives the function back
        while time.monotonic() < deadline and (
                self.driver() != "virtio-pci" or self._servers()):
            time.sleep(0.2)
        res["unmounted"] = f" {MNT} " not in Path("/proc/mounts").read_text()
        res["driver_after"] = self.driver()
        res["left_processes"] = self._servers()

    def _servers(self, mnt: str = MNT) -> list[str]:
        return [cmd for _, cmd in self._server_procs(mnt)]

    def _server_procs(self, mnt: str) -> list[tuple[Path, str]]:
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if " mount " in cmd and mnt in cmd:
                    found.append((d, cmd.strip()))
        return found

    def _vfio_fds(self, mnt: str) -> list[str]:
        """The VFIO/iommufd files the serving process of `mnt` holds open."""
        out = set()
        for d, _ in self._server_procs(mnt):
            for fd in (d / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(("/dev/vfio", "/dev/iommu")):
                    out.add(target)
        return sorted(out)

    def forced(self) -> None:
        """iommufd mode: the same function and kernel through the forced backends."""
        import subprocess
        import time

        f = self.res["forced"] = {"uname": os.uname().release}
        mnt = "/mnt/y"
        os.makedirs(mnt, exist_ok=True)
        # the rings hold guest-physical addresses (virtiofsd ignores the vIOMMU) and must
        # be physically contiguous: after the first mount, 4 KiB pages rarely are
        Path("/proc/sys/vm/nr_hugepages").write_text(f"{HUGEPAGES}\n")
        p = subprocess.run(["vfsdrv", "mount", "--iommu", "type1", "--tag", "myfs", mnt],
                           capture_output=True, text=True)
        f["type1_rc"], f["type1_err"] = p.returncode, p.stderr
        if p.returncode == 0:
            f["type1_fds"] = self._vfio_fds(mnt)
            f["type1_read_ok"] = (Path(mnt) / "hostfile.bin").read_bytes() == \
                (self.src / "hostfile.bin").read_bytes()
            self.sh("vfsdrv", "umount", mnt)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                    self.driver() != "virtio-pci" or self._servers(mnt)):
                time.sleep(0.2)
        f["type1_driver_after"] = self.driver()
        p = subprocess.run(["vfsdrv", "mount", "--iommu", "noiommu", "--tag", "myfs", mnt],
                           capture_output=True, text=True)
        f["noiommu_rc"], f["noiommu_err"] = p.returncode, p.stderr
        if p.returncode == 0:
            self.sh("vfsdrv", "umount", mnt)
        f["noiommu_driver_after"] = self.driver()

    def kernel_mount(self) -> None:
        res = self.res
        self.sh("modprobe", "virtiofs")
        os.makedirs(KMNT, exist_ok=True)
        self.sh("mount", "-t", "virtiofs", "myfs", KMNT)
        try:
            k = Path(KMNT)
            res["kernel_mount_ok"] = (k / "hostfile.bin").read_bytes() == \
                (self.src / "hostfile.bin").read_bytes()
            res["kernel_sees_vfsdrv_files"] = (
                (k / "in/big.bin").read_bytes() == (self.src / "big.bin").read_bytes()
                and (k / "links/h1").read_text() == "written via h2\n"
                and os.getxattr(k / "attrs/f", "user.color") == b"blue")
            (k / "kernel-wrote").write_text("kernel virtiofs after vfsdrv\n")
        finally:
            self.sh("umount", KMNT)

    def killed(self) -> None:
        """Servers killed with SIGKILL give nothing back: `vfsdrv list` names the
        binding, the next mount of the function takes it over, and `vfsdrv umount` of
        the last dead server's mount point gives the function back."""
        import signal
        import subprocess
        import time

        k = self.res["killed"] = {}

        def run(*cmd: str) -> list:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            return [p.returncode, p.stderr]

        def left() -> list:
            out = subprocess.run(["vfsdrv", "list", "--json"], capture_output=True,
                                 text=True, timeout=60).stdout
            return [d["left_bound_by"] for d in json.loads(out)]

        def mount_and_kill(mnt: str) -> list:
            os.makedirs(mnt, exist_ok=True)
            rc = run("vfsdrv", "mount", "--tag", "myfs", mnt)
            procs = self._server_procs(mnt)
            for d, _ in procs:
                os.kill(int(d.name), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._server_procs(mnt):
                time.sleep(0.2)
            return rc + [len(procs), self.driver(), left()]

        k["first"] = mount_and_kill("/mnt/z")
        k["second"] = mount_and_kill("/mnt/w")  # takes the first one's binding over
        k["umount_first"] = run("vfsdrv", "umount", "/mnt/z") + [self.driver()]
        k["umount_second"] = run("vfsdrv", "umount", "/mnt/w") + [self.driver(), left()]

    def main(self) -> int:
        self.step("mount", self.mount)
        if "mount" not in self.res["errors"]:
            for name in ("copies", "moves", "links", "attrs", "truncates", "trees",
                         "python_api", "sync_and_statfs", "locks"):
                self.step(name, getattr(self, name))
            self.step("umount", self.umount)
            if self.mode == "iommufd" and "umount" not in self.res["errors"]:
                self.step("forced", self.forced)
        if "umount" in self.res["errors"] or "mount" in self.res["errors"]:
            self.sh("umount", "-l", MNT, check=False)  # leave nothing mounted
        else:
            self.step("kernel_mount", self.kernel_mount)
            if self.mode == "noiommu":
                self.step("killed", self.killed)
        print("RESULT " + json.dumps(self.res), flush=True)
        return 0


HOLDER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 100, 0))
fd2 = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
"""


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--guest":
    sys.exit(Guest(sys.argv[2], sys.argv[3]).main())
