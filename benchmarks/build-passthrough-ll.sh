#!/bin/sh
# Build libfuse's C passthrough_ll example (the source Debian's libfuse3-dev ships in
# /usr/share/doc/libfuse3-dev/examples) into a cache directory and print the binary's
# path. It is the C FUSE server benchmarks/fs_bench.py compares a vfsdrv mount with.
#
#   sh benchmarks/build-passthrough-ll.sh        (apt-get install libfuse3-dev gcc pkg-config)
set -eu
examples=${LIBFUSE_EXAMPLES:-/usr/share/doc/libfuse3-dev/examples}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vfsdrv
mkdir -p "$cache"
src=$examples/passthrough_ll.c
if [ ! -f "$src" ] && [ -f "$src.gz" ]; then  # some releases compress the examples
    zcat "$src.gz" > "$cache/passthrough_ll.c"
    [ -f "$examples/passthrough_helpers.h.gz" ] && zcat "$examples/passthrough_helpers.h.gz" \
        > "$cache/passthrough_helpers.h"
    [ -f "$examples/passthrough_helpers.h" ] && cp "$examples/passthrough_helpers.h" "$cache/"
    src=$cache/passthrough_ll.c
fi
if [ ! -f "$src" ]; then
    echo "build-passthrough-ll: no $src; apt-get install libfuse3-dev" >&2
    exit 1
fi
flags=$(pkg-config --cflags --libs fuse3)
key=$( (cat "$src"; echo "$flags") | sha256sum | cut -c1-16)
out=$cache/passthrough_ll-$key
if [ ! -x "$out" ]; then
    ${CC:-cc} -O2 -Wall -I"$(dirname "$src")" -o "$out.tmp$$" "$src" $flags
    mv "$out.tmp$$" "$out"  # atomic: a concurrent build finds a whole binary or none
fi
echo "$out"
