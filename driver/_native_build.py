"""Build script for vfsdrv._native: the native core, built by cffi at install time.

It holds what Python cannot do or cannot do fast enough, each rule once:
  * memory ordering and device registers: Python issues no barriers and gives no
    guarantee about the width of a store (core.c says why at each barrier);
  * the split and packed virtqueues (driver side; core.c, packed.c) with the
    validation of every used entry;
  * the FUSE rules shared by every request path: reply room per opcode, where a
    request and its reply sit in a slot, validation of a device's reply;
  * the request pump (pump.c): one thread per request queue moving requests
    between /dev/fuse and the ring without the GIL;
  * batched replies (uring.c): a round's replies to /dev/fuse in one io_uring_enter;
  * the hiprio sender (hiprio.c): FORGETs from the pumps and the control thread
    onto the hiprio queue, with the one rule for splitting a BATCH_FORGET;
  * the typed client's batched path (client.c): a batch of requests added and
    published in one call, every used entry harvested and its reply checked in one.
The declarations live once, in native/vfsdrv_core.h, read by both cffi and the C
compiler. A failed build is an install error: there is no Python fallback.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"
HEADER = NATIVE / "vfsdrv_core.h"
SOURCES = [NATIVE / "core.c", NATIVE / "pump.c", NATIVE / "packed.c", NATIVE / "hiprio.c",
           NATIVE / "client.c", NATIVE / "uring.c"]

ffibuilder = FFI()
ffibuilder.cdef(HEADER.read_text())
ffibuilder.set_source(
    "vfsdrv._native",
    '#include <stdint.h>\n#include "vfsdrv_core.h"\n',
    sources=[str(p.relative_to(HERE.parent)) for p in SOURCES],
    include_dirs=[str(NATIVE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
