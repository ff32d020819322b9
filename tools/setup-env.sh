#!/usr/bin/env bash
# Install what vfsdrv needs on a Debian 12 machine (as root) and build ./.venv.
#   bash tools/setup-env.sh           the main job (`vfsdrv demo`, mounts): Python, a C
#                                     compiler for the cffi helper, virtiofsd, FUSE
#   bash tools/setup-env.sh --tests   also what the test suite needs (QEMU, a kernel
#                                     source, busybox, udev, pyfuse3, pytest, ruff);
#                                     tests/run.sh runs this
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=no
case "${1:-}" in
    --tests) tests=yes ;;
    "") ;;
    *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc        # the venv and the cffi helper
    qemu-system-common                          # virtiofsd: the real device
    fuse3                                       # /dev/fuse rules, fusermount3
)
TEST_APT_PACKAGES=(
    libfuse3-dev pkg-config                     # pyfuse3 (the second frontend) builds against libfuse3
    qemu-system-x86 busybox-static kmod cpio xz-utils linux-source-6.1 make  # guest tests
    attr                                        # getfattr/setfattr for the mount tests
    udev                                        # systemd-udevd for the udev auto-binding guest tests
    # the native core's C tests on aarch64 under emulation, and its instruction budget
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user valgrind
)
EXTRAS=""
CHECK="import vfsdrv._native"
if [ "$tests" = yes ]; then
    APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
    EXTRAS="[test,pyfuse3]"
    CHECK="import vfsdrv._native, pyfuse3, pytest, pytest_timeout"
fi

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
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c pass 2>/dev/null; then
    rm -rf .venv  # missing or broken (e.g. its Python went away)
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "$CHECK" 2>/dev/null; then
    .venv/bin/pip install -q -e ".$EXTRAS"
fi
.venv/bin/python -c "$CHECK" || { echo "setup-env: vfsdrv did not install" >&2; exit 1; }
