#!/bin/bash
# build-initramfs.sh KDIR OUT -- the guest's initramfs (gzip'ed newc cpio):
# static busybox, initramfs-init as /init, and the kernel modules (from
# KDIR/kroot, see prepare-kernel.sh) needed to mount the host root over 9p
# with an overlay on top, listed in load order in /modules.list.
# Cheap (<1 s); harness.py rebuilds it when this script or initramfs-init change.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 KDIR OUT" >&2; exit 2; }
KDIR=$1 OUT=$2 HERE=$(dirname "$(readlink -f "$0")")
BUSYBOX=${BUSYBOX:-/bin/busybox}
KVER=$(ls "$KDIR/kroot/lib/modules")
case $(ldd "$BUSYBOX" 2>&1 || true) in
  *"not a dynamic executable"*) ;;
  *) echo "build-initramfs: $BUSYBOX is not static (apt-get install busybox-static)" >&2; exit 1 ;;
esac

T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T"/{bin,mod,proc,sys,dev}
cp "$BUSYBOX" "$T/bin/busybox"
cp "$HERE/initramfs-init" "$T/init" && chmod 755 "$T/init"
for m in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe -d "$KDIR/kroot" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r f; do
  # busybox insmod takes plain modules only (Debian 6.12's are .ko.xz)
  b=$(basename "$f")
  case $b in
    *.ko.xz) b=${b%.xz}; xz -dc "$f" > "$T/mod/$b" ;;
    *.ko.zst) b=${b%.zst}; zstd -dcq "$f" > "$T/mod/$b" ;;
    *) cp "$f" "$T/mod/" ;;
  esac
  echo "$b"
done > "$T/modules.list"
[ -s "$T/modules.list" ] || { echo "build-initramfs: no modules found in $KDIR/kroot" >&2; exit 1; }
(cd "$T" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
