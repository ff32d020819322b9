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
# Kernels that have iommufd in their source (6.2+) but not in their config (Debian's
# 6.12 has CONFIG_IOMMUFD off): iommufd.ko is built too, and the VFIO modules
# (vfio, vfio_iommu_type1, vfio-pci-core, vfio-pci) are rebuilt with
# CONFIG_IOMMUFD=m and CONFIG_VFIO_DEVICE_CDEV=y (/dev/iommu, /dev/vfio/devices/vfioN)
# besides no-IOMMU. Together, since struct vfio_device changes with those options;
# the other VFIO modules (mdev) are removed rather than left mismatched. The kernel
# lacks CONFIG_INTERVAL_TREE_SPAN_ITER, which iommufd needs: lib/interval_tree.c's
# span iterator goes into iommufd.ko, unexported (the kernel's own exports stay).
#
# Env: STAMP (written to KDIR/ok); APT_CONFIG (e.g. a private one that names
# bookworm-backports, see harness.py). Needs: apt-get, dpkg-deb, xz, zstd, kmod
# (depmod), gcc, make; linux-source-X.Y is used from /usr/src when its version matches.
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

# vmlinuz = setup code + an xz (6.1) or zstd (6.12) stream: cut at the magic and decompress.
CONFIG=kroot/boot/config-$KVER
if grep -q '^CONFIG_KERNEL_ZSTD=y' "$CONFIG"; then magic=$'\x28\xb5\x2f\xfd' unz=(zstd -dcq)
else magic=$'\xfd7zXZ\x00' unz=(xz -dcq); fi
off=$(LC_ALL=C grep -abo "$magic" "kroot/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1)
[ -n "$off" ] || { log "no ${unz[0]} stream in vmlinuz-$KVER"; exit 1; }
# the tools complain about the trailing data after the stream; the ELF check below is what counts
tail -c +$((off + 1)) "kroot/boot/vmlinuz-$KVER" | "${unz[@]}" > vmlinux 2>/dev/null || true
[ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" = '177ELF' ] ||
  { log "decompressing vmlinuz-$KVER gave no ELF image"; exit 1; }

# vfio.ko with no-IOMMU support (and iommufd, see above)
KMAJ=$(echo "$SRCVER" | cut -d. -f1,2)        # 6.1
mkdir vfio && cd vfio
pkgs=("linux-headers-$KVER=$SRCVER" "linux-headers-${KVER%-*}-common=$SRCVER" "linux-kbuild-$KMAJ=$SRCVER")
[ -n "$(apt-cache show "linux-kbuild-$KMAJ=$SRCVER" 2>/dev/null)" ] ||  # 6.12: per ABI
  pkgs[2]="linux-kbuild-${KVER%-*}=$SRCVER"
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
  rm linux-source-*.deb
  SRC_TAR=$PWD/usr/src/linux-source-$KMAJ.tar.xz
fi
IOMMUFD=  # VFIO device cdevs (on iommufd) arrived in 6.6
if ! grep -q '^CONFIG_IOMMUFD=' "../$CONFIG" && dpkg --compare-versions "$KMAJ" ge 6.6; then
  IOMMUFD=1
fi
# one pass over the ~150 MB tarball (xz: ~8 s)
members=("linux-source-$KMAJ/drivers/vfio")
[ -z "$IOMMUFD" ] || members+=("linux-source-$KMAJ/drivers/iommu/iommufd"
  "linux-source-$KMAJ/drivers/iommu/iommu-priv.h" "linux-source-$KMAJ/lib/interval_tree.c")
tar -xJf "$SRC_TAR" --strip-components=1 "${members[@]}"
[ -z "${SRC_TAR##"$PWD"/*}" ] && rm -rf usr
# BTF needs pahole and the kernel's vmlinux: not for these modules
common=(CONFIG_VFIO_NOIOMMU=y CONFIG_DEBUG_INFO_BTF_MODULES=)
if [ -z "$IOMMUFD" ]; then
  log "building vfio.ko with CONFIG_VFIO_NOIOMMU=y"
  # only vfio.ko: the other objects in drivers/vfio are switched off on the command line
  mods=(vfio)
  args=(M="$PWD/drivers/vfio" "${common[@]}" KCFLAGS=-DCONFIG_VFIO_NOIOMMU=1
        CONFIG_VFIO_VIRQFD= CONFIG_VFIO_IOMMU_TYPE1= CONFIG_VFIO_PCI= CONFIG_VFIO_MDEV=)
else
  log "building iommufd.ko and the VFIO modules with CONFIG_IOMMUFD=m, CONFIG_VFIO_DEVICE_CDEV=y, CONFIG_VFIO_NOIOMMU=y"
  printf '%s\n' '#include <linux/export.h>' '#undef EXPORT_SYMBOL_GPL' \
    '#define EXPORT_SYMBOL_GPL(sym)' '#define CONFIG_INTERVAL_TREE_SPAN_ITER 1' \
    '#include "../../../lib/interval_tree.c"' > drivers/iommu/iommufd/span_iter.c
  echo 'iommufd-y += span_iter.o' >> drivers/iommu/iommufd/Makefile
  echo 'obj-m += drivers/iommu/iommufd/ drivers/vfio/' > Kbuild
  mods=(iommufd vfio vfio_iommu_type1 vfio-pci-core vfio-pci)
  # the VFIO variant drivers and mdev stay out: only the modules above are rebuilt
  args=(M="$PWD" "${common[@]}" CONFIG_IOMMUFD=m CONFIG_VFIO_DEVICE_CDEV=y
        CONFIG_IOMMUFD_TEST= CONFIG_VFIO_MDEV= CONFIG_MLX5_VFIO_PCI= CONFIG_HISI_ACC_VFIO_PCI=
        CONFIG_PDS_VFIO_PCI= CONFIG_VIRTIO_VFIO_PCI= CONFIG_QAT_VFIO_PCI= CONFIG_NVGRACE_GPU_VFIO_PCI=
        KCFLAGS="-DCONFIG_VFIO_NOIOMMU=1 -DCONFIG_IOMMUFD_MODULE=1 -DCONFIG_VFIO_DEVICE_CDEV=1")
fi
if ! make -C "$H" -j"$(nproc)" modules "${args[@]}" >build.log 2>&1; then
  tail -30 build.log >&2; log "building the VFIO modules failed"; exit 1
fi
grep -q enable_unsafe_noiommu_mode <(modinfo -F parm drivers/vfio/vfio.ko) ||
  { log "the rebuilt vfio.ko has no enable_unsafe_noiommu_mode parameter"; exit 1; }
KMODS=../$MODS/kernel
if [ -n "$IOMMUFD" ]; then  # every VFIO module is ours or gone (no mixed layouts)
  rm -rf "$KMODS/drivers/vfio"
  mkdir -p "$KMODS/drivers/iommu/iommufd"
fi
for m in "${mods[@]}"; do
  ko=$(find drivers -name "$m.ko")
  rm -f "$KMODS/$ko" "$KMODS/$ko".*   # the package's (maybe compressed) copy
  mkdir -p "$(dirname "$KMODS/$ko")" && cp "$ko" "$KMODS/$ko"
done
cd .. && rm -rf vfio

depmod -b kroot "$KVER"
echo "${STAMP:-}" > ok
rm -rf "$KDIR" && mv "$WORK" "$KDIR"
trap - EXIT
log "done: $KDIR"
