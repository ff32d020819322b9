#!/bin/bash
# prepare-kernel.sh KDIR PKG -- unpack the Debian kernel package PKG (e.g.
# linux-image-6.1.0-56-amd64) into KDIR for the QEMU guest tests. Run once per
# kernel by harness.py (under a lock); the result is reused by every guest run.
#
#   KDIR/vmlinux   the uncompressed kernel: QEMU boots it through its PVH entry,
#                  which skips the xz decompression that costs ~5 s under TCG
#   KDIR/kroot/    the unpacked .deb (/boot/config-*, /lib/modules/KVER), depmod'ed
#   KDIR/ok        written last; holds the stamp harness.py checks
#
# The package is downloaded and unpacked, never installed (no hooks, no initramfs
# tools, the host's /boot is untouched). kroot's vfio.ko is replaced by one built
# with CONFIG_VFIO_NOIOMMU=y (Debian leaves it off), out of tree from the
# linux-source + linux-headers of the same version; its symbol CRCs match, so the
# stock vfio-pci loads on top. It only behaves differently when loaded with
# enable_unsafe_noiommu_mode=1.
#
# Env: STAMP (written to KDIR/ok). Needs: apt-get, dpkg-deb, xz, kmod (depmod),
# gcc, make; linux-source-X.Y is used from /usr/src when its version matches.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 KDIR PKG" >&2; exit 2; }
KDIR=$1 PKG=$2
log() { echo "prepare-kernel: $*" >&2; }

# Build next to KDIR and rename at the end: an interrupted run leaves no half tree.
mkdir -p "$(dirname "$KDIR")"
WORK=$(mktemp -d "$KDIR.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

log "downloading $PKG"
apt-get download -q "$PKG" >download.log 2>&1 ||
  { cat download.log >&2; log "apt-get download $PKG failed (run apt-get update?)"; exit 1; }
DEB=$(ls "$PKG"_*.deb)
SRCVER=$(dpkg-deb -f "$DEB" Version)          # e.g. 6.1.192-2
dpkg-deb -x "$DEB" kroot && rm "$DEB"
KVER=$(ls kroot/lib/modules)                  # e.g. 6.1.0-56-amd64
MODS=kroot/lib/modules/$KVER

# vmlinuz = setup code + an xz stream: cut at the xz magic and decompress.
off=$(grep -abo $'\xfd7zXZ\x00' "kroot/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1)
[ -n "$off" ] || { log "no xz stream in vmlinuz-$KVER"; exit 1; }
# xz complains about the trailing data after the stream; the ELF check below is what counts
tail -c +$((off + 1)) "kroot/boot/vmlinuz-$KVER" | xz -dcq > vmlinux 2>/dev/null || true
[ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" = '177ELF' ] ||
  { log "decompressing vmlinuz-$KVER gave no ELF image"; exit 1; }

# vfio.ko with no-IOMMU support
KMAJ=$(echo "$SRCVER" | cut -d. -f1,2)        # 6.1
mkdir vfio && cd vfio
pkgs=("linux-headers-$KVER=$SRCVER" "linux-headers-${KVER%-*}-common=$SRCVER" "linux-kbuild-$KMAJ=$SRCVER")
SRC_TAR=/usr/src/linux-source-$KMAJ.tar.xz
if [ "$(dpkg-query -W -f='${Version}' "linux-source-$KMAJ" 2>/dev/null)" != "$SRCVER" ] || [ ! -f "$SRC_TAR" ]; then
  pkgs+=("linux-source-$KMAJ=$SRCVER")
  SRC_TAR=
fi
log "downloading ${pkgs[*]}"
apt-get download -q "${pkgs[@]}" >download.log 2>&1 ||
  { cat download.log >&2; log "apt-get download failed"; exit 1; }
for d in linux-headers-*.deb linux-kbuild-*.deb; do dpkg-deb -x "$d" root; done
H=$PWD/root/usr/src/linux-headers-$KVER
sed -i "s|include /usr/src/|include $PWD/root/usr/src/|" "$H/Makefile"
if [ -z "$SRC_TAR" ]; then
  dpkg-deb --fsys-tarfile linux-source-*.deb | tar -x "./usr/src/linux-source-$KMAJ.tar.xz"
  SRC_TAR=$PWD/usr/src/linux-source-$KMAJ.tar.xz
fi
tar -xJf "$SRC_TAR" --strip-components=1 "linux-source-$KMAJ/drivers/vfio"
log "building vfio.ko with CONFIG_VFIO_NOIOMMU=y"
# only vfio.ko: the other objects in drivers/vfio are switched off on the command line
if ! make -C "$H" M="$PWD/drivers/vfio" -j"$(nproc)" modules \
    CONFIG_VFIO_NOIOMMU=y KCFLAGS=-DCONFIG_VFIO_NOIOMMU=1 \
    CONFIG_VFIO_VIRQFD= CONFIG_VFIO_IOMMU_TYPE1= CONFIG_VFIO_PCI= CONFIG_VFIO_MDEV= \
    >build.log 2>&1; then
  tail -30 build.log >&2; log "building vfio.ko failed"; exit 1
fi
grep -q enable_unsafe_noiommu_mode <(modinfo -F parm drivers/vfio/vfio.ko) ||
  { log "the rebuilt vfio.ko has no enable_unsafe_noiommu_mode parameter"; exit 1; }
cp drivers/vfio/vfio.ko "../$MODS/kernel/drivers/vfio/vfio.ko"
cd .. && rm -rf vfio

depmod -b kroot "$KVER"
echo "${STAMP:-}" > ok
rm -rf "$KDIR" && mv "$WORK" "$KDIR"
trap - EXIT
log "done: $KDIR"
