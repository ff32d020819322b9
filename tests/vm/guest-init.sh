#!/bin/bash
# PID 1 of the guest, exec'ed by initramfs-init (which did the mounts) on the
# overlay of the host root. $vfsdrv_run is the per-run directory, shared with
# the host; it holds, from the host (harness.py):
#   setup.sh   sourced first: rw mounts, modules, env, cwd (generated)
#   script     the caller's script, run as `bash -e -o pipefail script`
# and gets back: output (stdout+stderr of setup and script), setup-ok, rc,
# t-start (guest uptime when the script started), dmesg (the kernel log after it). The 9p share is uncached
# (write-through), so these are on the host as soon as they are written.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
quit() {
  # isa-debug-exit (port 0xf4) makes qemu exit at once; the others are fallbacks
  printf '\0' | dd of=/dev/port bs=1 seek=$((0xf4)) count=1 status=none
  echo o > /proc/sysrq-trigger; sleep 10; exit 1
}
R=${vfsdrv_run:-}
[ -n "$R" ] || { echo "guest-init: no vfsdrv_run= on the kernel command line" >&2; quit; }
unset vfsdrv_run vfsdrv_kroot vfsdrv_init
. "$(dirname "$0")/guest-lib.sh"
export -f vfsdrv_virtiofs_bdfs vfsdrv_vfio_bind vfsdrv_vfio_group vfsdrv_host
(
  set -e
  . "$R/setup.sh"
  : > "$R/setup-ok"
  read -r up _ < /proc/uptime && echo "$up" > "$R/t-start"
  exec bash -e -o pipefail "$R/script"
) </dev/null >"$R/output" 2>&1
rc=$?
dmesg > "$R/dmesg" 2>&1
echo $rc > "$R/rc"
quit
