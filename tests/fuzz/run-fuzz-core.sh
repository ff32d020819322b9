#!/usr/bin/env bash
# Build tests/fuzz/fuzz_core.c against the native core's sources and fuzz it for
# SECONDS (exit 0: no sanitizer report, no rule broken; otherwise the report and
# the crashing input are in OUTDIR).
#
#   tests/fuzz/run-fuzz-core.sh SECONDS [OUTDIR]
#
# With clang and its libFuzzer runtime (Debian: apt-get install clang
# libclang-rt-14-dev) the target is coverage-guided (-fsanitize=fuzzer,address,
# undefined). Without them it falls back to gcc and a random-input main() with the
# same sanitizers and checks, and says so: no coverage guidance, a weaker search.
set -euo pipefail
seconds=${1:?usage: run-fuzz-core.sh SECONDS [OUTDIR]}
out=${2:-$(mktemp -d /tmp/fuzz-core.XXXXXX)}
here=$(cd "$(dirname "$0")/../.." && pwd)
native=${NATIVE_DIR:-$here/driver/native}  # NATIVE_DIR: another copy (a planted defect)
mkdir -p "$out/corpus"
srcs=("$here/tests/fuzz/fuzz_core.c" "$native"/core.c)
for f in "$native"/*.c; do  # every ring layout the core has; pump.c (threads, I/O) is the mount fuzz's
    case $(basename "$f") in core.c|pump.c) ;; *) srcs+=("$f") ;; esac
done
common=(-g -O1 -std=gnu11 -I "$native" -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
if command -v clang >/dev/null && echo 'int LLVMFuzzerTestOneInput(const char *d, long n){return 0;}' \
        | clang -x c - -fsanitize=fuzzer -o "$out/probe" 2>/dev/null; then
    clang "${common[@]}" -fsanitize=fuzzer,address,undefined "${srcs[@]}" -o "$out/fuzz_core"
    echo "fuzz_core: libFuzzer (coverage-guided), $seconds s, corpus $out/corpus"
    cd "$out"
    exec ./fuzz_core -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -use_value_profile=1 -print_final_stats=1 -artifact_prefix="$out/" corpus
fi
echo "fuzz_core: clang's libFuzzer is not installed: random inputs with gcc (no coverage guidance)"
gcc "${common[@]}" -fsanitize=address,undefined -DVFSDRV_RANDOM_MAIN "${srcs[@]}" -o "$out/fuzz_core"
ASAN_OPTIONS=abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    exec "$out/fuzz_core" "$seconds"
