#!/usr/bin/env bash
# Build the native core's C tests with one compiler:
#   tests/native/build.sh CC OUTDIR [EXTRA_CFLAGS...]
# OUTDIR gets core.o, packed.o, pump.o, hiprio.o, client.o, uring.o (each driver source alone,
# compiled as cffi compiles it for vfsdrv._native: -O2 -fPIC, the flags of
# driver/_native_build.py), test_core (the unit tests: test_core.c, whose runner
# also runs test_hiprio_client.c's), budget (the instruction budget's ring workload,
# budget.c) and pump_bench (the whole pump on a FUSE mount,
# pump_bench.c), each linked with the driver's sources.
# A cross compiler links statically, so that qemu-user needs no target libraries.
set -euo pipefail
cc=${1:?usage: build.sh CC OUTDIR [EXTRA_CFLAGS...]}
out=${2:?usage: build.sh CC OUTDIR [EXTRA_CFLAGS...]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
# VFSDRV_NATIVE_DIR: another copy of driver/native (a deliberate defect proves the
# tests see it)
native=$(cd "${VFSDRV_NATIVE_DIR:-$here/../../driver/native}" && pwd)
command -v "$cc" >/dev/null || { echo "build.sh: no compiler $cc" >&2; exit 127; }
mkdir -p "$out"
# the flags driver/_native_build.py gives cffi
flags=(-O2 -Wall -Wextra -Wno-unused-parameter -std=gnu11 -I"$native" "$@")
link=()
case "$("$cc" -dumpmachine)" in
    "$(cc -dumpmachine 2>/dev/null || true)") ;;
    *) link=(-static) ;;  # cross: run under qemu-user without a target sysroot
esac
for src in core packed pump hiprio client uring; do
    "$cc" "${flags[@]}" -fPIC -c -o "$out/$src.o" "$native/$src.c"
done
sources=("$native/core.c" "$native/packed.c" "$native/pump.c" "$native/hiprio.c" "$native/client.c" "$native/uring.c")
"$cc" "${flags[@]}" -g -o "$out/test_core" "$here/test_core.c" "$here/test_hiprio_client.c" \
    "$here/test_uring.c" "$here/test_pump.c" \
    "${sources[@]}" "${link[@]}" -lpthread
"$cc" "${flags[@]}" -g -o "$out/budget" "$here/budget.c" "${sources[@]}" "${link[@]}" -lpthread
# the whole pump over a real /dev/fuse mount (root; tests/test_native_budget.py)
"$cc" "${flags[@]}" -g -o "$out/pump_bench" "$here/pump_bench.c" "${sources[@]}" "${link[@]}" -lpthread
