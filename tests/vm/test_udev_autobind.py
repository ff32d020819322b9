"""udev auto-binding and `vfsdrv list/bind/unbind` in a QEMU guest, with the real
systemd-udevd and three virtio-fs functions (no-IOMMU VFIO):

  * autofs   opted in by tag with a mountpoint: bound to vfio-pci and mounted by vfsdrv;
  * bybdf    opted in by PCI address, bind only: bound to vfio-pci;
  * kernelfs not in /etc/vfsdrv.conf: stays with virtio-pci (the kernel mounts it).

The guest installs the rule (`vfsdrv udev install`), writes /etc/vfsdrv.conf, starts
systemd-udevd and triggers the add events (`udevadm trigger --action=add`); then a real
hotplug: bybdf is given back to the kernel, removed and found again by a PCI rescan, and
the rule binds it again. systemd is not PID 1 in the guest, so `vfsdrv udev add` starts
the unit's command (`vfsdrv udev mount TAG`) directly, as it does on any host without
systemd; the unit file itself is checked by systemd-analyze in tests/test_devices_udev.py.
Afterwards `vfsdrv list/bind/unbind` are exercised on the same functions, and the
installed unit's ExecStart is run as systemd would (foreground, stopped by SIGTERM).
"""

from __future__ import annotations

import json
from pathlib import Path

GUEST_SCRIPT = r"""
say() { echo "STEP $*"; }
drv() { basename "$(readlink "/sys/bus/pci/devices/$1/driver")" 2>/dev/null || echo none; }
wait_for() {  # wait_for SECONDS COMMAND...
  local n=$(( $1 * 10 )); shift
  until "$@"; do n=$((n-1)); [ $n -gt 0 ] || { echo "timed out: $*"; return 1; }; sleep 0.1; done
}
read -r AUTO BYBDF KERNEL <<< "$VFSDRV_VM_BDFS"
modprobe virtiofs
# no IOMMU here: DMA on 4 KiB pages is refused, a mount takes 32 MiB of huge pages
echo 32 > /proc/sys/vm/nr_hugepages
echo "DRIVERS_BEFORE $(drv $AUTO) $(drv $BYBDF) $(drv $KERNEL)"

say install
vfsdrv udev install --no-reload
cat > /etc/vfsdrv.conf <<CONF
# opt-in: autofs by tag (mounted), bybdf by address (bound only); kernelfs is not here
[tag:autofs]
mountpoint = /mnt/auto
options = noexec

[pci:$BYBDF]
CONF
vfsdrv udev show

say udevd
/lib/systemd/systemd-udevd --daemon
wait_for 10 udevadm control --ping
udevadm trigger --action=add --subsystem-match=pci --attr-match=vendor=0x1af4 \
  --attr-match=device=0x105a
udevadm settle --timeout=120
wait_for 60 grep -q ' /mnt/auto fuse.vfsdrv ' /proc/mounts
echo "DRIVERS_AFTER_TRIGGER $(drv $AUTO) $(drv $BYBDF) $(drv $KERNEL)"
echo "MOUNT $(grep ' /mnt/auto ' /proc/mounts)"
echo "CONTENT $(cat /mnt/auto/hello.txt)"
vfsdrv list --json > /tmp/list1.json
echo "LIST1 $(tr -d '\n' < /tmp/list1.json)"

say hotplug
vfsdrv unbind $BYBDF
echo "AFTER_UNBIND $(drv $BYBDF)"
echo 1 > /sys/bus/pci/devices/$BYBDF/remove
[ ! -e /sys/bus/pci/devices/$BYBDF ]
echo 1 > /sys/bus/pci/rescan
udevadm settle --timeout=120
wait_for 30 test "$(drv $BYBDF)" = vfio-pci
echo "DRIVERS_AFTER_HOTPLUG $(drv $AUTO) $(drv $BYBDF) $(drv $KERNEL)"

say kernel
mkdir -p /mnt/k && mount -t virtiofs kernelfs /mnt/k
echo "KMOUNT $(grep ' /mnt/k ' /proc/mounts)"
if vfsdrv bind --tag kernelfs 2> /tmp/err; then echo "BIND_MOUNTED unexpectedly bound"; else
  echo "BIND_MOUNTED_ERR $(cat /tmp/err)"; fi
vfsdrv list --json > /tmp/list2.json
echo "LIST2 $(tr -d '\n' < /tmp/list2.json)"
umount /mnt/k
vfsdrv bind --tag kernelfs
echo "BIND_KERNELFS $(drv $KERNEL)"
vfsdrv unbind $KERNEL
echo "UNBIND_KERNELFS $(drv $KERNEL)"
mount -t virtiofs kernelfs /mnt/k && umount /mnt/k && echo "KMOUNT_AGAIN ok"

say unbind-mounted
if vfsdrv unbind $AUTO 2> /tmp/err; then echo "UNBIND_BUSY unexpectedly unbound"; else
  echo "UNBIND_BUSY_ERR $(cat /tmp/err)"; fi
vfsdrv umount /mnt/auto
wait_for 30 sh -c '! pgrep -f "vfsdrv udev [m]ount" > /dev/null'

say unit-command
# what systemd would run for vfsdrv@autofs.service: the installed unit's ExecStart, then
# SIGTERM for `systemctl stop` (KillMode=mixed: the main process first)
EXEC=$(sed -n 's/^ExecStart=//p' /etc/systemd/system/vfsdrv@.service)
echo "UNIT_EXEC $EXEC"
${EXEC//%I/autofs} > /tmp/unit.log 2>&1 & pid=$!
wait_for 60 grep -q ' /mnt/auto fuse.vfsdrv ' /proc/mounts
echo "UNIT_CONTENT $(cat /mnt/auto/hello.txt)"
kill -TERM $pid
rc=0; wait $pid || rc=$?
echo "UNIT_EXIT $rc"
if grep -q ' /mnt/auto ' /proc/mounts; then echo "UNIT_STOPPED still mounted"; else
  echo "UNIT_STOPPED unmounted"; fi
wait_for 30 vfsdrv unbind $AUTO
echo "DRIVERS_END $(drv $AUTO) $(drv $BYBDF) $(drv $KERNEL)"
vfsdrv unbind $BYBDF
echo "UDEV_LOG $(tr '\n' '|' < /run/vfsdrv/udev.log)"
"""


def _values(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        key, _, rest = line.partition(" ")
        if key.isupper() and key != "STEP":
            out[key] = rest
    return out


def test_udev_binds_opted_in_functions_only(guest, tmp_path: Path) -> None:
    from harness import FsDevice, fs_bdf

    share = tmp_path / "auto"
    share.mkdir()
    (share / "hello.txt").write_text("mounted by udev\n")
    r = guest(GUEST_SCRIPT, noiommu=True, timeout=500,
              fs_devices=[FsDevice(tag="autofs", fs_dir=share), FsDevice(tag="bybdf"),
                          FsDevice(tag="kernelfs")])
    print(f"udev guest run: {r.duration:.1f}s (boot {r.boot_time}s)")
    assert r.returncode == 0, f"{r}\n--- console:\n{r.console[-3000:]}"
    v = _values(r.output)
    auto, bybdf, kernel = fs_bdf(0), fs_bdf(1), fs_bdf(2)

    assert v["DRIVERS_BEFORE"] == "virtio-pci virtio-pci virtio-pci"
    # the rule fired for all three; only the opted-in ones moved
    assert v["DRIVERS_AFTER_TRIGGER"] == "vfio-pci vfio-pci virtio-pci"
    assert "autofs /mnt/auto fuse.vfsdrv" in v["MOUNT"] and "noexec" in v["MOUNT"]
    assert v["CONTENT"] == "mounted by udev"
    log = v["UDEV_LOG"]
    assert f"{auto} (tag 'autofs'): [tag:autofs] bound to vfio-pci (was virtio-pci)" in log
    assert "no systemd: started `vfsdrv udev mount autofs` directly" in log
    assert f"{bybdf}: [pci:{bybdf}] bound to vfio-pci (was virtio-pci)" in log
    assert f"{kernel} (tag 'kernelfs'): not in /etc/vfsdrv.conf; left with virtio-pci" in log

    # vfsdrv list in the guest: tags, drivers, groups, mounts
    listed = {d["bdf"]: d for d in json.loads(v["LIST1"])}
    assert set(listed) == {auto, bybdf, kernel}
    assert {b: (d["tag"], d["driver"]) for b, d in listed.items()} == {
        auto: ("autofs", "vfio-pci"), bybdf: ("bybdf", "vfio-pci"),
        kernel: ("kernelfs", "virtio-pci")}
    assert listed[auto]["mounts"] == [{"mountpoint": "/mnt/auto", "type": "fuse.vfsdrv"}]
    assert isinstance(listed[auto]["iommu_group"], int)  # no-IOMMU group made by vfio
    assert listed[auto]["group_members"] == []
    assert listed[kernel]["iommu_group"] is None  # no IOMMU and not on vfio
    assert listed[kernel]["virtio_device"] and listed[kernel]["virtio_driver"] == "virtiofs"

    # a real hotplug (remove + rescan): the kernel's add event, the rule binds it again
    assert v["AFTER_UNBIND"] == "virtio-pci"
    assert v["DRIVERS_AFTER_HOTPLUG"] == "vfio-pci vfio-pci virtio-pci"
    assert log.count(f"{bybdf}: [pci:{bybdf}] bound to vfio-pci") == 2

    # the unconfigured function stays usable by the kernel; bind refuses it while mounted
    assert "kernelfs /mnt/k virtiofs" in v["KMOUNT"]
    assert "in use by the kernel" in v["BIND_MOUNTED_ERR"] and "umount /mnt/k" in v[
        "BIND_MOUNTED_ERR"]
    listed2 = {d["bdf"]: d for d in json.loads(v["LIST2"])}
    assert listed2[kernel]["mounts"] == [{"mountpoint": "/mnt/k", "type": "virtiofs"}]
    assert v["BIND_KERNELFS"] == "vfio-pci" and v["UNBIND_KERNELFS"] == "virtio-pci"
    assert v["KMOUNT_AGAIN"] == "ok"

    # unbind refuses a function a vfsdrv mount holds, names the process; after umount it works
    assert "in use through VFIO by" in v["UNBIND_BUSY_ERR"]
    assert "vfsdrv udev mount" in v["UNBIND_BUSY_ERR"] and "vfsdrv umount" in v[
        "UNBIND_BUSY_ERR"]
    assert v["DRIVERS_END"] == "virtio-pci vfio-pci virtio-pci"

    # the unit's command, run as systemd would, mounts in the foreground; SIGTERM unmounts
    assert v["UNIT_EXEC"].endswith(" udev mount --foreground %I")
    assert v["UNIT_CONTENT"] == "mounted by udev"
    assert v["UNIT_EXIT"] == "0" and v["UNIT_STOPPED"] == "unmounted"
