"""Removal of a virtio-fs function while programs use a `vfsdrv mount` over VFIO.

The function sits behind a pcie-root-port (q35, native PCIe hotplug: pciehp in the
guest), bound to vfio-pci through the vIOMMU (type1). The guest (this file, run as
`python test_removal.py --guest`) mounts it with `vfsdrv mount`, starts programs
that read, write and list through the mount (cat, dd, ls -lR and two Python loops
that report their errno), then asks the host for a QMP `device_del` (the
attention button: pciehp powers the slot off after its 5 s grace period).
vfio-pci's remove waits until the user gives the device back, relaying the request
through the VFIO request IRQ; so the removal finishing at all shows vfsdrv honoured
it. Then:

  * every program ended with an error (none killed by us: nothing hung), within
    REMOVAL_BOUND s of the request (pciehp's delay and TCG included; no tight timing);
  * the function is gone from sysfs, QEMU reports DEVICE_DELETED, the IOMMU group's
    /dev/vfio node is gone, the serving process has exited;
  * the mount ends as any dead FUSE server's does: it stays, every access answers
    ENOTCONN (nothing created in the mount-point directory underneath), and a plain
    `umount` removes it;
  * re-plugged: with the udev rule installed (`vfsdrv udev install`, the tag opted in
    with a mountpoint in /etc/vfsdrv.conf, the real systemd-udevd), the host plugs a
    new function into the same root port (QMP chardev-add of a second virtiofsd,
    device_add): pciehp finds it, the rule binds it to vfio-pci and mounts it.

The dead-mount point is issue 10 item 2 (the relay used to unmount itself when the
device died, so later writes landed in the directory underneath).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MNT = "/mnt/x"
AUTO = "/mnt/auto"  # where the udev rule mounts the re-plugged function
#: seconds from the removal request to every program's error and the device's removal:
#: pciehp waits 5 s, then vfio-pci asks the user, who must release the device
REMOVAL_BOUND = 120
BIG = 4 << 20

# -- host side (pytest) -----------------------------------------------------------------------


def _removal_run(guest, tmp_path: Path) -> dict:
    from harness import GUEST_PYTHON, FsDevice

    share = tmp_path / "share"
    share.mkdir()
    (share / "big.bin").write_bytes(os.urandom(BIG))
    for i in range(20):
        (share / "tree" / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (share / "tree" / f"d{i % 4}" / f"f{i}").write_text(f"file {i}\n")
    host: dict = {}
    replug_sock = tmp_path / "replug.sock"

    def on_request(name: str, ctl) -> str:
        if name == "unplug":
            host["unplug_at"] = time.monotonic()
            ctl.qmp.execute("device_del", id="fs0")
            return "device_del sent"
        if name == "deleted":
            ev = ctl.qmp.wait_event("DEVICE_DELETED", REMOVAL_BOUND,
                                    lambda e: e["data"].get("device") == "fs0")
            host["deleted_after"] = round(time.monotonic() - host["unplug_at"], 1)
            return json.dumps(ev["data"])
        if name == "replug":  # a new function in the same slot, another virtiofsd
            ctl.qmp.execute("chardev-add", id="vfs0b", backend={
                "type": "socket", "data": {"addr": {"type": "unix",
                                                    "data": {"path": str(replug_sock)}},
                                           "server": False}})
            ctl.qmp.execute("device_add", driver="vhost-user-fs-pci", id="fs0b",
                            chardev="vfs0b", tag="myfs", bus="rp0", addr="0x0")
            return "device_add done"
        raise ValueError(f"unknown request {name}")

    from vfsdrv.tools.backends import Virtiofsd

    replug = Virtiofsd(share, replug_sock)
    try:
        r = guest(f"{GUEST_PYTHON} {Path(__file__).resolve()} --guest",
                  iommu=True, kernel_args=("no_timer_check",),
                  fs_devices=[FsDevice(fs_dir=share, hotplug=True)],
                  on_request=on_request, timeout=900)
    finally:
        replug.stop()
    lines = [ln for ln in r.output.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{r}\n--- console:\n{r.console[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    res["host"] = host
    print(json.dumps({k: v for k, v in res.items() if k != "dmesg"}, indent=1))
    return res


def test_removal_during_io(guest, tmp_path: Path) -> None:
    res = _removal_run(guest, tmp_path)
    assert res["errors"] == {}, "\n\n".join(f"{k}: {v}" for k, v in res["errors"].items())
    assert res["mounted_before"] and res["driver_before"] == "vfio-pci"
    assert all(w["progress"] for w in res["workers"].values()), res["workers"]

    # every program got an error in time; none had to be killed
    for name, w in res["workers"].items():
        assert not w["hung"], (name, w)
        assert w["rc"] != 0, (name, w)
        assert w["after"] <= REMOVAL_BOUND, (name, w)
    for name in ("py_reader", "py_writer"):
        # ECONNABORTED: in flight when the connection was aborted; ENOTCONN: after
        assert res["workers"][name]["errno"] in (errno.ENOTCONN, errno.ECONNABORTED,
                                                  errno.EIO, errno.ENODEV), res["workers"][name]

    # the request IRQ was honoured: the removal finished, the group and server are gone
    assert res["device_gone_after"] is not None, res["dmesg_tail"]
    assert res["device_gone_after"] <= REMOVAL_BOUND
    assert res["relayed_request"], res["dmesg_tail"]
    assert not res["blocked_without_channel"], res["dmesg_tail"]
    assert res["deleted_event"]["device"] == "fs0" and res["host"]["deleted_after"] <= \
        REMOVAL_BOUND
    assert not res["group_node_after"], res["group_node_after"]
    assert not res["server_alive_after"], res["server_alive_after"]

    # re-plugged: bound and mounted again by the udev rule
    rp = res["replug"]
    assert rp["device_back"] and rp["driver"] == "vfio-pci", rp
    assert rp["mounted"] and rp["content"] == "file 0\n", rp
    assert rp["umount_rc"] == 0 and rp["servers_after"] == [], rp

    # a dead FUSE server's mount (issue 10 item 2): stays, ENOTCONN, umount works,
    # nothing written to the directory underneath
    dead = res["dead_mount"]
    assert dead["still_mounted"], dead
    assert dead["stat_errno"] == dead["create_errno"] == errno.ENOTCONN, dead
    assert dead["umount_rc"] == 0 and dead["unmounted"] and dead["underneath"] == [], dead
    assert res["left_processes"] == []


# -- guest side -------------------------------------------------------------------------------

PY_READER = r"""
import os, sys, time
n = 0
while True:
    try:
        with open(sys.argv[1], "rb") as f:
            while f.read(1 << 16):
                pass
    except OSError as e:
        print(f"errno {e.errno}", flush=True)
        sys.exit(1)
    n += 1
    if n == 1:
        open(sys.argv[2], "w").close()
"""

PY_WRITER = r"""
import os, sys
chunk = os.urandom(1 << 16)
n = 0
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while True:
        os.pwrite(fd, chunk, (n % 64) << 16)
        n += 1
        if n % 16 == 0:
            os.fsync(fd)
        if n == 16:
            open(sys.argv[2], "w").close()
except OSError as e:
    print(f"errno {e.errno}", flush=True)
    sys.exit(1)
"""

#: shell programs: each loops until its first failure, touching a progress file once
SHELL = {
    "cat": f"while :; do cat {MNT}/big.bin > /dev/null || exit; touch $P; done",
    "dd": f"while :; do dd if=/dev/zero of={MNT}/dd.out bs=64k count=32 conv=fsync "
          "status=none || exit; touch $P; done",
    "ls": f"while :; do ls -lR {MNT}/tree > /dev/null || exit; touch $P; done",
}


class Guest:
    def __init__(self) -> None:
        self.bdf = os.environ["VFSDRV_VM_BDF"]
        self.res: dict = {"errors": {}, "workers": {}}

    def driver(self) -> str:
        link = Path(f"/sys/bus/pci/devices/{self.bdf}/driver")
        return os.path.basename(os.readlink(link)) if link.exists() else "none"

    def mounted(self, mnt: str = MNT) -> bool:
        return any(ln.split()[1] == mnt for ln in Path("/proc/mounts").read_text().splitlines())

    def servers(self, mnt: str = MNT) -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                # `vfsdrv mount ... MNT`; the udev rule's `vfsdrv udev mount myfs` for AUTO
                if " mount " in cmd and (mnt in cmd or (mnt == AUTO and " udev " in cmd)):
                    found.append(int(d.name))
        return found

    def main(self) -> int:
        res = self.res
        try:
            self.run()
        except Exception:
            import traceback
            res["errors"]["guest"] = traceback.format_exc()
            subprocess.run(["umount", "-l", MNT], capture_output=True)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    def run(self) -> None:
        res = self.res
        os.makedirs(MNT, exist_ok=True)
        p = subprocess.run(["vfsdrv", "mount", "--tag", "myfs", MNT], capture_output=True,
                           text=True, timeout=180)
        if p.returncode != 0:
            raise RuntimeError(f"vfsdrv mount exited {p.returncode}: {p.stderr}")
        res["mounted_before"] = self.mounted()
        res["driver_before"] = self.driver()
        grp = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{self.bdf}/iommu_group"))
        group_node = f"/dev/vfio/{grp}"
        res["group_node_before"] = os.path.exists(group_node)

        # the programs
        procs: dict[str, subprocess.Popen] = {}
        progress: dict[str, str] = {}
        for name, code, arg in (("py_reader", PY_READER, f"{MNT}/big.bin"),
                                ("py_writer", PY_WRITER, f"{MNT}/w.dat")):
            progress[name] = f"/tmp/progress.{name}"
            procs[name] = subprocess.Popen([sys.executable, "-c", code, arg, progress[name]],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        for name, loop in SHELL.items():
            progress[name] = f"/tmp/progress.{name}"
            procs[name] = subprocess.Popen(["bash", "-c", loop],
                                           env=dict(os.environ, P=progress[name]),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                os.path.exists(f) or procs[n].poll() is not None for n, f in progress.items()):
            time.sleep(0.2)

        # the removal
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", "vfsdrv_host unplug"], check=True, timeout=60)
        left = dict(procs)
        ended: dict[str, float] = {}
        while left and time.monotonic() - t0 < REMOVAL_BOUND + 30:
            for name, proc in list(left.items()):
                if proc.poll() is not None:
                    ended[name] = round(time.monotonic() - t0, 1)
                    del left[name]
            time.sleep(0.2)
        for name, proc in procs.items():
            hung = name in left
            if hung:
                proc.kill()
            out = proc.communicate(timeout=30)[0]
            err = [int(w.split()[1]) for w in out.splitlines() if w.startswith("errno ")]
            res["workers"][name] = {
                "progress": os.path.exists(progress[name]), "hung": hung,
                "rc": proc.returncode, "after": ended.get(name), "errno": err[0] if err else None,
                "output": out[-300:],
            }
        gone = None
        while time.monotonic() - t0 < REMOVAL_BOUND + 30:
            if not os.path.exists(f"/sys/bus/pci/devices/{self.bdf}"):
                gone = round(time.monotonic() - t0, 1)
                break
            time.sleep(0.2)
        res["device_gone_after"] = gone
        deleted = subprocess.run(["bash", "-c", "vfsdrv_host deleted"], capture_output=True,
                                 text=True, timeout=REMOVAL_BOUND + 60)
        res["deleted_event"] = json.loads(deleted.stdout) if deleted.returncode == 0 else {
            "error": deleted.stderr}
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        res["relayed_request"] = "Relaying device request to user" in dmesg
        res["blocked_without_channel"] = "No device request channel registered" in dmesg
        res["dmesg_tail"] = dmesg.splitlines()[-25:]
        res["group_node_after"] = os.path.exists(group_node)
        end = time.monotonic() + 30  # the server may still be finishing its teardown
        while self.servers() and time.monotonic() < end:
            time.sleep(0.2)
        res["server_alive_after"] = self.servers()

        # what a program sees now on the mount point
        dead: dict = {"still_mounted": self.mounted()}
        for key, fn in (("stat_errno", lambda: os.stat(f"{MNT}/big.bin")),
                        ("create_errno", lambda: open(f"{MNT}/after-removal", "w").close())):
            try:
                fn()
                dead[key] = 0
            except OSError as e:
                dead[key] = e.errno
        if self.mounted():
            u = subprocess.run(["umount", MNT], capture_output=True, text=True, timeout=60)
            dead["umount_rc"], dead["umount_err"] = u.returncode, u.stderr.strip()
        else:
            dead["umount_rc"] = None
        dead["unmounted"] = not self.mounted()
        if not dead["unmounted"]:
            subprocess.run(["umount", "-l", MNT], capture_output=True)
        dead["underneath"] = sorted(os.listdir(MNT)) if not self.mounted() else None
        res["dead_mount"] = dead
        res["left_processes"] = self.servers()
        self.replug()

    def replug(self) -> None:
        """The udev rule binds and mounts a function plugged into the same slot."""
        rp: dict = {}
        self.res["replug"] = rp
        sh = functools.partial(subprocess.run, capture_output=True, text=True, timeout=180)
        Path("/etc/vfsdrv.conf").write_text(f"[tag:myfs]\nmountpoint = {AUTO}\n")
        # the rings hold guest-physical addresses (virtiofsd ignores the vIOMMU) and must be
        # physically contiguous; after the first mount 4 KiB pages rarely are: huge pages
        Path("/proc/sys/vm/nr_hugepages").write_text("32\n")
        rp["install"] = sh(["vfsdrv", "udev", "install", "--no-reload"]).returncode
        sh(["/lib/systemd/systemd-udevd", "--daemon"])
        end = time.monotonic() + 30
        while sh(["udevadm", "control", "--ping"]).returncode != 0 and time.monotonic() < end:
            time.sleep(0.2)
        try:
            subprocess.run(["bash", "-c", "vfsdrv_host replug"], check=True, timeout=60)
            end = time.monotonic() + REMOVAL_BOUND
            while not os.path.exists(f"/sys/bus/pci/devices/{self.bdf}") and \
                    time.monotonic() < end:
                time.sleep(0.2)
            rp["device_back"] = os.path.exists(f"/sys/bus/pci/devices/{self.bdf}")
            sh(["udevadm", "settle", "--timeout=120"])
            while not self.mounted(AUTO) and time.monotonic() < end:
                time.sleep(0.2)
            rp["mounted"] = self.mounted(AUTO)
            rp["driver"] = self.driver()
            if rp["mounted"]:
                rp["content"] = Path(f"{AUTO}/tree/d0/f0").read_text()
                rp["umount_rc"] = sh(["vfsdrv", "umount", AUTO]).returncode
                end = time.monotonic() + 60
                while self.servers(AUTO) and time.monotonic() < end:
                    time.sleep(0.2)
            rp["servers_after"] = self.servers(AUTO)
            rp["logs"] = {f.name: f.read_text()[-1500:] for f in Path("/run/vfsdrv").glob("*.log")}
        finally:
            sh(["udevadm", "control", "--exit"])


if __name__ == "__main__" and sys.argv[1:] == ["--guest"]:
    sys.exit(Guest().main())
