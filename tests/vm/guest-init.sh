#!/bin/bash
# PID 1 of the guest, exec'ed by initramfs-init on the overlay of the host root.
# From the kernel command line (harness.py): vfsdrv_run (the per-run directory,
# a rw 9p share with tag vfsdrv_run, mounted at the same path) and vfsdrv_kroot
# (the unpacked kernel package). The run directory holds, from the host:
#   setup.sh   sourced first: rw mounts, modules, env, cwd (generated)
#   script     the caller's script, run as `bash -e -o pipefail script`
# and gets back: output (stdout+stderr of setup and script), setup-ok, rc,
# t-start (guest uptime when the script started).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "guest-init: $*" >/dev/console; }
quit() {
  # isa-debug-exit (port 0xf4) makes qemu exit at once; the others are fallbacks
  printf '\0' | dd of=/dev/port bs=1 seek=$((0xf4)) count=1 status=none
  echo o > /proc/sysrq-trigger; sleep 10; exit 1
}
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# modprobe (and the kernel's module auto-loading) find the guest kernel's modules
KVER=$(uname -r)
mkdir -p /lib/modules && rm -rf "/lib/modules/$KVER" && ln -s "$vfsdrv_kroot/lib/modules/$KVER" /lib/modules/
[ -n "${vfsdrv_run:-}" ] || { say "no vfsdrv_run= on the kernel command line"; quit; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vfsdrv_run "$vfsdrv_run" ||
  { say "mounting the run directory failed"; quit; }
modprobe fuse                               # /dev/fuse: no udev here to load it on demand
stty -F /dev/console -onlcr 2>/dev/null     # plain \n on the serial console
. "$(dirname "$0")/guest-lib.sh"
export -f vfsdrv_virtiofs_bdfs vfsdrv_vfio_bind vfsdrv_vfio_group
unset vfsdrv_kroot vfsdrv_init
R=$vfsdrv_run
(
  set -e
  . "$R/setup.sh"
  : > "$R/setup-ok"
  read -r up _ < /proc/uptime && echo "$up" > "$R/t-start"
  exec bash -e -o pipefail "$R/script"
) </dev/null >"$R/output" 2>&1
echo $? > "$R/rc"
# no global sync: a virtio-fs mount whose backend stopped answering would block it
cd / && sync -f "$R/rc" && umount "$R"
quit
