#!/usr/bin/env bash
# The native core on aarch64, under emulation: build driver/native and its C unit
# tests (tests/native/test_core.c) with Debian's cross gcc, disassemble the
# objects, check that the barriers are the outer-shareable ones the device needs,
# and run the tests, a short budget workload and the pump (over a socket pair)
# under qemu-user.
#
#   tests/native/run-aarch64.sh [OUTDIR [TEST_NAME...]]
#
# OUTDIR (default: a temporary directory, removed afterwards) keeps the binaries
# and core.dis, packed.dis, pump.dis (objdump -d), which tests/test_native_aarch64.py
# inspects function by function. Needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross
# and qemu-user: `bash tools/setup-env.sh --tests` installs them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-}
[ $# -gt 0 ] && shift
if [ -z "$out" ]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
cc=aarch64-linux-gnu-gcc
objdump=aarch64-linux-gnu-objdump
qemu=qemu-aarch64
missing=()
for tool in "$cc" "$objdump" "$qemu"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run-aarch64: missing ${missing[*]}: apt-get install gcc-aarch64-linux-gnu" \
         "libc6-dev-arm64-cross qemu-user (bash tools/setup-env.sh --tests does)" >&2
    exit 127
fi
"$here/build.sh" "$cc" "$out"
for o in core packed pump; do
    "$objdump" -d --no-show-raw-insn "$out/$o.o" >"$out/$o.dis"
done
# The device is a DMA master in the outer-shareable domain: core.c's fences must
# be dmb osh (full), oshld (acquire side), oshst (release side); an "ish" fence
# would order only against other CPUs.
for b in osh oshld oshst; do
    grep -Pq "\tdmb\t$b\$" "$out/core.dis" || { echo "run-aarch64: no 'dmb $b' in core.o" >&2; exit 1; }
done
if grep -Pq "\tdmb\tish" "$out/core.dis" "$out/packed.dis"; then
    echo "run-aarch64: an inner-shareable dmb in the ring code" >&2
    exit 1
fi
echo "run-aarch64: core.o has dmb osh, dmb oshld, dmb oshst (and no dmb ish*)"
"$qemu" "$out/budget" split 16 2000
"$qemu" "$out/budget" packed 16 2000
# the whole pump (epoll, eventfds, the stop signal) with a socket for /dev/fuse
"$qemu" "$out/pump_bench" --socket 2000 split
"$qemu" "$out/pump_bench" --socket 2000 packed
"$qemu" "$out/test_core" "$@"
