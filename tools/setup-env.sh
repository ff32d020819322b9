#!/usr/bin/env bash
# Install what vfsdrv needs on a Debian 12 machine (as root) and build ./.venv.
# Idempotent: a second run only checks. Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc        # the venv and the cffi helper
    qemu-system-common                          # virtiofsd: the real device
    fuse3 libfuse3-dev pkg-config               # fusermount3; pyfuse3 builds against libfuse3
    qemu-system-x86 busybox-static kmod cpio xz-utils linux-source-6.1 make  # guest tests
    attr                                        # getfattr/setfattr for the mount tests
    udev                                        # systemd-udevd for the udev auto-binding guest tests
)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-env: run as root (apt-get, /dev/fuse, VFIO need it): sudo $0" >&2
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-env: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own python, not a pyenv shim: the QEMU guest tests run this venv too,
# and a shim costs seconds per start under TCG.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import vfsdrv._native, pyfuse3' 2>/dev/null; then
    rm -rf .venv
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,pyfuse3]'
fi
.venv/bin/python -c 'import vfsdrv._native' || { echo "setup-env: vfsdrv did not install" >&2; exit 1; }
