# Shell helpers for guest scripts (bash). guest-init.sh sources this file and
# exports the functions, so the script given to run_in_guest() can call them.

# vfsdrv_virtiofs_bdfs: print the PCI addresses of all virtio-fs functions (1af4:105a)
vfsdrv_virtiofs_bdfs() {
  local d
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x105a ] && basename "$d"
  done
  return 0
}

# vfsdrv_vfio_bind BDF: bind the function to vfio-pci (loads the modules first)
vfsdrv_vfio_bind() {
  local bdf=$1 dev=/sys/bus/pci/devices/$1 drv=
  [ -d "$dev" ] || { echo "vfsdrv_vfio_bind: no PCI device $bdf" >&2; return 1; }
  modprobe vfio-pci || return 1
  [ -e "$dev/driver" ] && drv=$(readlink -f "$dev/driver")
  [ "${drv##*/}" = vfio-pci ] && return 0
  echo vfio-pci > "$dev/driver_override"
  [ -z "$drv" ] || echo "$bdf" > "$drv/unbind"
  echo "$bdf" > /sys/bus/pci/drivers_probe
  [ "$(basename "$(readlink -f "$dev/driver")")" = vfio-pci ] ||
    { echo "vfsdrv_vfio_bind: binding $bdf to vfio-pci failed:" >&2; dmesg | tail -5 >&2; return 1; }
}

# vfsdrv_vfio_group BDF: print the VFIO group node of a bound function
# (/dev/vfio/N with an IOMMU, /dev/vfio/noiommu-N without)
vfsdrv_vfio_group() {
  local grp
  grp=$(basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")") || return 1
  if [ -e "/dev/vfio/noiommu-$grp" ]; then echo "/dev/vfio/noiommu-$grp"
  elif [ -e "/dev/vfio/$grp" ]; then echo "/dev/vfio/$grp"
  else echo "vfsdrv_vfio_group: no /dev/vfio node for group $grp of $1" >&2; return 1
  fi
}

# vfsdrv_host NAME [TIMEOUT]: ask the host to do NAME (run_in_guest's on_request, e.g. a
# QMP device_del) and wait for it (default 300 s); prints the handler's answer and
# fails when the handler failed. The run directory is an uncached 9p share: a file
# written here is on the host at once, and the host's answer is seen at the next stat.
vfsdrv_host() {
  local name=$1 t=${2:-300} d=$VFSDRV_VM_RUN_DIR/req status
  : > "$d/$name.want"
  local end=$((SECONDS + t))
  while [ ! -e "$d/$name.done" ]; do
    [ $SECONDS -lt $end ] || { echo "vfsdrv_host $name: no answer in ${t}s" >&2; return 1; }
    sleep 0.1
  done
  {
    read -r status
    if [ "$status" = ok ]; then cat; echo; else cat >&2; echo >&2; return 1; fi
  } < "$d/$name.done"
}
