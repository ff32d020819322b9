"""The native core's declarations are written once (driver/native/vfsdrv_core.h) and
read twice, by cffi and by the C compiler: these tests pin that both agree on every
struct, that the FUSE reply sizes built into core.c match the FUSE structs, and
that the ring layout constants match the spec's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from vfsdrv._native import ffi, lib
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.sizing import reply_capacity

HEADER = Path(__file__).resolve().parents[1] / "driver" / "native" / "vfsdrv_core.h"
STRUCTS = ("vfsdrv_seg", "vfsdrv_used", "vfsdrv_vq", "vfsdrv_in_header", "vfsdrv_out_header",
           "vfsdrv_slot", "vfsdrv_pump_config", "vfsdrv_event", "vfsdrv_pump_stats")


def test_fixed_layouts_of_what_crosses_to_the_device_or_the_kernel() -> None:
    assert ffi.sizeof("struct vfsdrv_seg") == 16
    assert ffi.sizeof("struct vfsdrv_used") == 8  # virtq_used_elem
    assert ffi.sizeof("struct vfsdrv_out_header") == abi.OUT_HEADER_SIZE == 16
    assert [ffi.offsetof("struct vfsdrv_out_header", f) for f in ("len", "error", "unique")] \
        == [0, 4, 8]
    assert lib.VFSDRV_IN_HEADER == abi.IN_HEADER_SIZE == ffi.sizeof("struct vfsdrv_in_header")
    fields = ("len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen", "padding")
    assert [ffi.offsetof("struct vfsdrv_in_header", f) for f in fields] \
        == [abi.ffi.offsetof("struct fuse_in_header", f) for f in fields]
    assert lib.VFSDRV_WRITE_HEADERS == abi.IN_HEADER_SIZE + abi.sizeof("fuse_write_in")
    assert lib.VFSDRV_LOCK_WAIT == abi.FUSE_LOCK_WAIT


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to compare with")
def test_the_compiler_and_cffi_agree_on_every_struct(tmp_path: Path) -> None:
    fields = {s: [name for name, _ in ffi.typeof(f"struct {s}").fields] for s in STRUCTS}
    lines = ['#include <stdint.h>', '#include <stdio.h>', '#include <stddef.h>',
             f'#include "{HEADER}"', "int main(void) {"]
    for s, names in fields.items():
        lines.append(f'printf("{s} %zu\\n", sizeof(struct {s}));')
        for n in names:
            lines.append(f'printf("{s}.{n} %zu\\n", offsetof(struct {s}, {n}));')
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "probe"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                         check=True).stdout
    compiled = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for s, names in fields.items():
        assert int(compiled[s]) == ffi.sizeof(f"struct {s}"), s
        for n in names:
            assert int(compiled[f"{s}.{n}"]) == ffi.offsetof(f"struct {s}", n), f"{s}.{n}"


@pytest.mark.parametrize("opcode,struct", [
    (Opcode.LOOKUP, "fuse_entry_out"), (Opcode.GETATTR, "fuse_attr_out"),
    (Opcode.OPEN, "fuse_open_out"), (Opcode.WRITE, "fuse_write_out"),
    (Opcode.STATFS, "fuse_statfs_out"), (Opcode.GETLK, "fuse_lk_out"),
    (Opcode.INIT, "fuse_init_out"), (Opcode.LSEEK, "fuse_lseek_out"),
])
def test_reply_room_matches_the_fuse_struct(opcode: int, struct: str) -> None:
    assert reply_capacity(opcode, b"", 1 << 20) == abi.sizeof(struct)


def test_create_room_is_entry_and_open() -> None:
    assert reply_capacity(Opcode.CREATE, b"", 1 << 20) == (
        abi.sizeof("fuse_entry_out") + abi.sizeof("fuse_open_out"))


def test_request_and_reply_placement() -> None:
    """A WRITE's data lands page-aligned; every reply payload is page-aligned."""
    off = lib.vfsdrv_request_offset(Opcode.WRITE)
    assert (off + lib.VFSDRV_WRITE_HEADERS) % 4096 == 0
    assert lib.vfsdrv_request_offset(Opcode.READ) == 0
    for req_off, in_len in ((0, 40), (0, 4000), (off, 80 + (1 << 20)), (off, 80)):
        reply = lib.vfsdrv_reply_offset(req_off, in_len)
        assert (reply + 16) % 4096 == 0 and reply >= req_off + in_len


@pytest.mark.parametrize("error,ok", [(0, True), (-1, True), (-511, True), (-512, False),
                                      (-4095, False), (1, False), (-(1 << 31), False)])
def test_errors_the_kernel_takes(error: int, ok: bool) -> None:
    """/dev/fuse refuses error <= -512 and > 0 and leaves the request pending forever."""
    assert bool(lib.vfsdrv_valid_errno(error)) is ok
