#!/usr/bin/env bash
# Build a copy of vfsdrv._native with AddressSanitizer and UndefinedBehaviorSanitizer
# (the same sources and cffi set_source as driver/_native_build.py) into OUTDIR, and
# print what runs Python with it:
#
#   tests/fuzz/build-sanitized.sh OUTDIR [SOURCE_DIR]
#   -> OUTDIR/_native.abi3.so (or the platform's suffix), OUTDIR/env:
#      VFSDRV_NATIVE_SO=...  LD_PRELOAD=<gcc's libasan>  ASAN_OPTIONS=...  UBSAN_OPTIONS=...
#
# SOURCE_DIR (default: the checkout's driver/) is where native/*.c and
# _native_build.py are taken from: a copy with a deliberate defect proves that the
# fuzzer sees it. tests/fuzz/native_override.py loads the build in place of the
# installed one. Python itself is not instrumented, so libasan is preloaded and
# leak checking is off (the interpreter keeps memory until exit on purpose).
set -euo pipefail
out=${1:?usage: build-sanitized.sh OUTDIR [SOURCE_DIR]}
here=$(cd "$(dirname "$0")/../.." && pwd)
src=${2:-$here/driver}
py=${PYTHON:-$here/.venv/bin/python}
mkdir -p "$out"
out=$(cd "$out" && pwd)
libasan=$(${CC:-gcc} -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "no libasan.so for ${CC:-gcc} (apt-get install gcc)" >&2; exit 1; }
# _native_build.py names its sources relative to the directory above driver/
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/driver"
cp -r "$src/native" "$src/_native_build.py" "$stage/driver/"
# -fno-wrapv: Python's own CFLAGS (which distutils adds) define signed overflow; here
# it is reported instead
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-wrapv -fno-omit-frame-pointer -g -O1"
(
    cd "$stage"
    CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" "$py" -c '
import runpy, sys
ns = runpy.run_path("driver/_native_build.py")  # not __main__: it does not build itself
ns["ffibuilder"].compile(tmpdir=".", verbose=False)  # sources are relative to "."
' >"$out/build.log" 2>&1
) || { tail -30 "$out/build.log" >&2; exit 1; }
so=$(find "$stage" -maxdepth 3 -name '_native*.so' | head -n1)
[ -n "$so" ] || { echo "no _native*.so built in $stage" >&2; exit 1; }
cp "$so" "$out/"
so=$out/$(basename "$so")
cat >"$out/env" <<EOF
VFSDRV_NATIVE_SO=$so
LD_PRELOAD=$libasan
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
EOF
echo "$so"
