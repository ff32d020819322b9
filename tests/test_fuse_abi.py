"""The FUSE wire structs declared in vfsdrv.fs.abi against the protocol.

EXPECTED is written out from Linux include/uapi/linux/fuse.h, protocol 7.45 (plus
the virtio-fs config of virtio 1.3 and the proposed fuse_notify_lock_out), field by
field: name, byte offset and C type. A second test compiles a C program against
this machine's uapi headers (/usr/include/linux/fuse.h, virtio_fs.h) and compares
every struct, field, opcode and flag they share with the cffi declarations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from vfsdrv.errors import ProtocolError
from vfsdrv.fs import abi

U8, U16, U32, U64 = "uint8_t", "uint16_t", "uint32_t", "uint64_t"
I32, I64 = "int32_t", "int64_t"

# struct -> (sizeof, [(field, offset, C type)])
EXPECTED: dict[str, tuple[int, list[tuple[str, int, str]]]] = {
    "fuse_in_header": (40, [
        ("len", 0, U32), ("opcode", 4, U32), ("unique", 8, U64), ("nodeid", 16, U64),
        ("uid", 24, U32), ("gid", 28, U32), ("pid", 32, U32), ("total_extlen", 36, U16),
        ("padding", 38, U16),
    ]),
    "fuse_out_header": (16, [("len", 0, U32), ("error", 4, I32), ("unique", 8, U64)]),
    "fuse_attr": (88, [
        ("ino", 0, U64), ("size", 8, U64), ("blocks", 16, U64), ("atime", 24, U64),
        ("mtime", 32, U64), ("ctime", 40, U64), ("atimensec", 48, U32),
        ("mtimensec", 52, U32), ("ctimensec", 56, U32), ("mode", 60, U32),
        ("nlink", 64, U32), ("uid", 68, U32), ("gid", 72, U32), ("rdev", 76, U32),
        ("blksize", 80, U32), ("flags", 84, U32),
    ]),
    "fuse_entry_out": (128, [
        ("nodeid", 0, U64), ("generation", 8, U64), ("entry_valid", 16, U64),
        ("attr_valid", 24, U64), ("entry_valid_nsec", 32, U32), ("attr_valid_nsec", 36, U32),
        ("attr", 40, "struct fuse_attr"),
    ]),
    "fuse_attr_out": (104, [
        ("attr_valid", 0, U64), ("attr_valid_nsec", 8, U32), ("dummy", 12, U32),
        ("attr", 16, "struct fuse_attr"),
    ]),
    "fuse_kstatfs": (80, [
        ("blocks", 0, U64), ("bfree", 8, U64), ("bavail", 16, U64), ("files", 24, U64),
        ("ffree", 32, U64), ("bsize", 40, U32), ("namelen", 44, U32), ("frsize", 48, U32),
        ("padding", 52, U32), ("spare", 56, "uint32_t[6]"),
    ]),
    "fuse_statfs_out": (80, [("st", 0, "struct fuse_kstatfs")]),
    "fuse_file_lock": (24, [("start", 0, U64), ("end", 8, U64), ("type", 16, U32),
                            ("pid", 20, U32)]),
    "fuse_init_in": (64, [
        ("major", 0, U32), ("minor", 4, U32), ("max_readahead", 8, U32), ("flags", 12, U32),
        ("flags2", 16, U32), ("unused", 20, "uint32_t[11]"),
    ]),
    "fuse_init_out": (64, [
        ("major", 0, U32), ("minor", 4, U32), ("max_readahead", 8, U32), ("flags", 12, U32),
        ("max_background", 16, U16), ("congestion_threshold", 18, U16),
        ("max_write", 20, U32), ("time_gran", 24, U32), ("max_pages", 28, U16),
        ("map_alignment", 30, U16), ("flags2", 32, U32), ("max_stack_depth", 36, U32),
        ("request_timeout", 40, U16), ("unused", 42, "uint16_t[11]"),
    ]),
    "fuse_forget_in": (8, [("nlookup", 0, U64)]),
    "fuse_forget_one": (16, [("nodeid", 0, U64), ("nlookup", 8, U64)]),
    "fuse_batch_forget_in": (8, [("count", 0, U32), ("dummy", 4, U32)]),
    "fuse_interrupt_in": (8, [("unique", 0, U64)]),
    "fuse_getattr_in": (16, [("getattr_flags", 0, U32), ("dummy", 4, U32), ("fh", 8, U64)]),
    "fuse_setattr_in": (88, [
        ("valid", 0, U32), ("padding", 4, U32), ("fh", 8, U64), ("size", 16, U64),
        ("lock_owner", 24, U64), ("atime", 32, U64), ("mtime", 40, U64), ("ctime", 48, U64),
        ("atimensec", 56, U32), ("mtimensec", 60, U32), ("ctimensec", 64, U32),
        ("mode", 68, U32), ("unused4", 72, U32), ("uid", 76, U32), ("gid", 80, U32),
        ("unused5", 84, U32),
    ]),
    "fuse_mknod_in": (16, [("mode", 0, U32), ("rdev", 4, U32), ("umask", 8, U32),
                           ("padding", 12, U32)]),
    "fuse_mkdir_in": (8, [("mode", 0, U32), ("umask", 4, U32)]),
    "fuse_rename_in": (8, [("newdir", 0, U64)]),
    "fuse_rename2_in": (16, [("newdir", 0, U64), ("flags", 8, U32), ("padding", 12, U32)]),
    "fuse_link_in": (8, [("oldnodeid", 0, U64)]),
    "fuse_open_in": (8, [("flags", 0, U32), ("open_flags", 4, U32)]),
    "fuse_create_in": (16, [("flags", 0, U32), ("mode", 4, U32), ("umask", 8, U32),
                            ("open_flags", 12, U32)]),
    "fuse_open_out": (16, [("fh", 0, U64), ("open_flags", 8, U32), ("backing_id", 12, I32)]),
    "fuse_release_in": (24, [("fh", 0, U64), ("flags", 8, U32), ("release_flags", 12, U32),
                             ("lock_owner", 16, U64)]),
    "fuse_flush_in": (24, [("fh", 0, U64), ("unused", 8, U32), ("padding", 12, U32),
                           ("lock_owner", 16, U64)]),
    "fuse_read_in": (40, [
        ("fh", 0, U64), ("offset", 8, U64), ("size", 16, U32), ("read_flags", 20, U32),
        ("lock_owner", 24, U64), ("flags", 32, U32), ("padding", 36, U32),
    ]),
    "fuse_write_in": (40, [
        ("fh", 0, U64), ("offset", 8, U64), ("size", 16, U32), ("write_flags", 20, U32),
        ("lock_owner", 24, U64), ("flags", 32, U32), ("padding", 36, U32),
    ]),
    "fuse_write_out": (8, [("size", 0, U32), ("padding", 4, U32)]),
    "fuse_fsync_in": (16, [("fh", 0, U64), ("fsync_flags", 8, U32), ("padding", 12, U32)]),
    "fuse_setxattr_in": (16, [("size", 0, U32), ("flags", 4, U32), ("setxattr_flags", 8, U32),
                              ("padding", 12, U32)]),
    "fuse_getxattr_in": (8, [("size", 0, U32), ("padding", 4, U32)]),
    "fuse_getxattr_out": (8, [("size", 0, U32), ("padding", 4, U32)]),
    "fuse_lk_in": (48, [
        ("fh", 0, U64), ("owner", 8, U64), ("lk", 16, "struct fuse_file_lock"),
        ("lk_flags", 40, U32), ("padding", 44, U32),
    ]),
    "fuse_lk_out": (24, [("lk", 0, "struct fuse_file_lock")]),
    "fuse_access_in": (8, [("mask", 0, U32), ("padding", 4, U32)]),
    "fuse_fallocate_in": (32, [("fh", 0, U64), ("offset", 8, U64), ("length", 16, U64),
                               ("mode", 24, U32), ("padding", 28, U32)]),
    "fuse_lseek_in": (24, [("fh", 0, U64), ("offset", 8, U64), ("whence", 16, U32),
                           ("padding", 20, U32)]),
    "fuse_lseek_out": (8, [("offset", 0, U64)]),
    "fuse_copy_file_range_in": (56, [
        ("fh_in", 0, U64), ("off_in", 8, U64), ("nodeid_out", 16, U64), ("fh_out", 24, U64),
        ("off_out", 32, U64), ("len", 40, U64), ("flags", 48, U64),
    ]),
    "fuse_dirent": (24, [("ino", 0, U64), ("off", 8, U64), ("namelen", 16, U32),
                         ("type", 20, U32)]),
    "fuse_direntplus": (152, [("entry_out", 0, "struct fuse_entry_out"),
                              ("dirent", 128, "struct fuse_dirent")]),
    "fuse_syncfs_in": (8, [("padding", 0, U64)]),
    "fuse_notify_poll_wakeup_out": (8, [("kh", 0, U64)]),
    "fuse_notify_inval_inode_out": (24, [("ino", 0, U64), ("off", 8, I64), ("len", 16, I64)]),
    "fuse_notify_inval_entry_out": (16, [("parent", 0, U64), ("namelen", 8, U32),
                                         ("flags", 12, U32)]),
    "fuse_notify_delete_out": (24, [("parent", 0, U64), ("child", 8, U64),
                                    ("namelen", 16, U32), ("padding", 20, U32)]),
    "fuse_notify_store_out": (24, [("nodeid", 0, U64), ("offset", 8, U64), ("size", 16, U32),
                                   ("padding", 20, U32)]),
    "fuse_notify_retrieve_out": (32, [
        ("notify_unique", 0, U64), ("nodeid", 8, U64), ("offset", 16, U64), ("size", 24, U32),
        ("padding", 28, U32),
    ]),
    "fuse_notify_retrieve_in": (40, [
        ("dummy1", 0, U64), ("offset", 8, U64), ("size", 16, U32), ("dummy2", 20, U32),
        ("dummy3", 24, U64), ("dummy4", 32, U64),
    ]),
    # proposal for virtio-fs blocking locks, not in mainline fuse.h
    "fuse_notify_lock_out": (16, [("unique", 0, U64), ("error", 8, I32), ("padding", 12, I32)]),
    # virtio 1.3 5.11.4 (notify_buf_size with VIRTIO_FS_F_NOTIFICATION)
    "virtio_fs_config": (44, [("tag", 0, "uint8_t[36]"), ("num_request_queues", 36, U32),
                              ("notify_buf_size", 40, U32)]),
}


def declared_structs() -> list[str]:
    return sorted(abi.ffi.list_types()[1])


def test_every_declared_struct_is_pinned_here() -> None:
    assert declared_structs() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_struct_size_offsets_and_types(name: str) -> None:
    size, fields = EXPECTED[name]
    assert abi.sizeof(name) == size
    ctype = abi.ffi.typeof(f"struct {name}")
    declared = [(f, ctype.fields[i][1].offset, ctype.fields[i][1].type.cname)
                for i, (f, _) in enumerate(ctype.fields)]
    assert declared == fields
    for field, offset, _ in fields:
        assert abi.ffi.offsetof(f"struct {name}", field) == offset


def test_header_sizes() -> None:
    assert abi.IN_HEADER_SIZE == 40
    assert abi.OUT_HEADER_SIZE == 16


def test_signed_fields_keep_their_sign_through_pack_and_unpack() -> None:
    raw = abi.pack("fuse_out_header", len=16, error=-2, unique=7)
    assert raw == (16).to_bytes(4, "little") + (-2).to_bytes(4, "little", signed=True) + (
        7).to_bytes(8, "little")
    assert abi.unpack("fuse_out_header", raw).error == -2
    inval = abi.unpack("fuse_notify_inval_inode_out",
                       abi.pack("fuse_notify_inval_inode_out", ino=5, off=-1, len=-1))
    assert (inval.ino, inval.off, inval.len) == (5, -1, -1)
    lock = abi.unpack("fuse_notify_lock_out", abi.pack("fuse_notify_lock_out", unique=9, error=-11))
    assert (lock.unique, lock.error) == (9, -11)


def test_pack_writes_little_endian_at_the_protocol_offsets() -> None:
    raw = abi.pack("fuse_in_header", len=0x28, opcode=26, unique=0x0102030405060708,
                   nodeid=1, uid=1000, gid=100, pid=4242, total_extlen=3)
    assert len(raw) == 40
    assert raw[0:4] == b"\x28\0\0\0"
    assert raw[4:8] == b"\x1a\0\0\0"
    assert raw[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert int.from_bytes(raw[32:36], "little") == 4242
    assert int.from_bytes(raw[36:38], "little") == 3


def test_pack_nested_and_as_dict() -> None:
    raw = abi.pack("fuse_entry_out", nodeid=2, attr={"ino": 2, "mode": 0o40755, "nlink": 3})
    assert len(raw) == 128
    assert int.from_bytes(raw[40:48], "little") == 2  # attr.ino
    assert int.from_bytes(raw[40 + 60 : 40 + 64], "little") == 0o40755  # attr.mode
    d = abi.as_dict(abi.unpack("fuse_entry_out", raw))
    assert d["nodeid"] == 2 and d["attr"]["mode"] == 0o40755 and d["attr"]["nlink"] == 3
    init = abi.as_dict(abi.new("fuse_init_out", major=7, unused=[1] * 11))
    assert init["unused"] == [1] * 11 and init["major"] == 7


def test_unpack_at_an_offset_and_short_input() -> None:
    data = b"\xff" * 5 + abi.pack("fuse_write_out", size=4096)
    assert abi.unpack("fuse_write_out", data, 5).size == 4096
    with pytest.raises(ProtocolError, match="needs 8 bytes, only 7 available"):
        abi.unpack("fuse_write_out", data, 6)
    with pytest.raises(ProtocolError):
        abi.unpack("fuse_write_out", data, -1)
    with pytest.raises(ProtocolError, match="only 0 available"):
        abi.unpack("fuse_in_header", b"", 0)


def test_pack_into() -> None:
    buf = bytearray(64)
    n = abi.pack_into(buf, 8, "fuse_write_out", size=0x1122)
    assert n == 8
    assert buf[8:10] == b"\x22\x11" and buf[:8] == bytes(8) and buf[16:] == bytes(48)


def test_pack_into_a_struct_with_a_field_named_offset() -> None:
    buf = bytearray(48)
    n = abi.pack_into(buf, 8, "fuse_read_in", fh=1, offset=0x1122, size=4096)
    assert n == 40
    assert abi.unpack("fuse_read_in", buf, 8).offset == 0x1122


@pytest.mark.parametrize("namelen,size", [(0, 24), (1, 32), (8, 32), (9, 40), (255, 280)])
def test_dirent_size_pads_to_8(namelen: int, size: int) -> None:
    assert abi.dirent_size(namelen) == size
    assert abi.direntplus_size(namelen) == size + 128


# -- cross-check against the C headers of this machine --------------------------------------
FUSE_H = Path("/usr/include/linux/fuse.h")
VIRTIO_FS_H = Path("/usr/include/linux/virtio_fs.h")


def _struct_fields(header: str, name: str) -> list[str] | None:
    m = re.search(rf"\bstruct\s+{name}\s*\{{(.*?)\}}", header, re.S)
    if not m:
        return None
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return re.findall(r"(\w+)\s*(?:\[[^\]]*\])?\s*;", body)


def _enum_names(header: str, enum: str) -> set[str]:
    m = re.search(rf"\benum\s+{enum}\s*\{{(.*?)\}}", header, re.S)
    assert m, f"enum {enum} not found in {FUSE_H}"
    return set(re.findall(r"\b(FUSE_\w+)\s*=", m.group(1)))


def test_layout_matches_the_system_uapi_headers(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to cross-check the FUSE ABI (tools/setup-env.sh installs it)"
    assert FUSE_H.exists() and VIRTIO_FS_H.exists(), "linux uapi headers missing (linux-libc-dev)"
    header = FUSE_H.read_text() + VIRTIO_FS_H.read_text()
    lines: list[str] = []  # printf lines: "<key> <value>"
    expect: dict[str, int] = {}
    structs_checked = 0
    for name in declared_structs():
        fields = _struct_fields(header, name)
        if fields is None:
            continue
        structs_checked += 1
        ctype = abi.ffi.typeof(f"struct {name}")
        ours = [f for f, _ in ctype.fields]
        same = ours == fields
        if same:  # same fields: the whole struct must match
            lines.append(f'printf("size.{name} %zu\\n", sizeof(struct {name}));')
            expect[f"size.{name}"] = abi.sizeof(name)
        for f in ours:
            # an older header's reserved tail may since have been given to new fields
            reserved = re.fullmatch(r"unused\d*|padding\d*|dummy\d*", f)
            if f in fields and (same or not reserved):
                key = f"off.{name}.{f}"
                lines.append(
                    f'printf("{key} %zu %zu\\n", offsetof(struct {name}, {f}), '
                    f"sizeof(((struct {name} *)0)->{f}));"
                )
                expect[key] = abi.ffi.offsetof(f"struct {name}", f)
                expect[key + ".size"] = abi.ffi.sizeof(dict(ctype.fields)[f].type)
    opcodes = _enum_names(header, "fuse_opcode")
    for op in abi.Opcode:
        if f"FUSE_{op.name}" in opcodes:
            lines.append(f'printf("op.{op.name} %llu\\n", (unsigned long long)FUSE_{op.name});')
            expect[f"op.{op.name}"] = op.value
    notify = _enum_names(header, "fuse_notify_code")
    for code in abi.NotifyCode:
        if f"FUSE_NOTIFY_{code.name}" in notify:
            lines.append(
                f'printf("notify.{code.name} %llu\\n", '
                f"(unsigned long long)FUSE_NOTIFY_{code.name});"
            )
            expect[f"notify.{code.name}"] = code.value
    macros = set(re.findall(r"#define\s+(\w+)", header))
    for flag in abi.InitFlag:
        if f"FUSE_{flag.name}" in macros:
            # bits below 32 are int expressions in the header ((1 << 31) is negative)
            cast = "(unsigned long long)" + ("" if flag.value >> 32 else "(uint32_t)")
            lines.append(f'printf("init.{flag.name} %llu\\n", {cast}FUSE_{flag.name});')
            expect[f"init.{flag.name}"] = flag.value
    for const in dir(abi):
        if re.fullmatch(r"(FATTR|FUSE)_[A-Z0-9_]+", const) and const in macros:
            lines.append(f'printf("const.{const} %llu\\n", (unsigned long long){const});')
            expect[f"const.{const}"] = getattr(abi, const)
    lines.append('printf("const.version %d.%d\\n", FUSE_KERNEL_VERSION, 0);')

    src = tmp_path / "abi.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/fuse.h>\n"
        "#include <linux/virtio_fs.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    exe = tmp_path / "abi"
    subprocess.run([gcc, "-std=gnu11", "-o", str(exe), str(src)], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got: dict[str, int] = {}
    for line in out.splitlines():
        key, *values = line.split()
        if key == "const.version":
            assert values[0].split(".")[0] == str(abi.KERNEL_VERSION)
            continue
        got[key] = int(values[0])
        if len(values) > 1:
            got[key + ".size"] = int(values[1])
    assert got == expect
    # the check must not pass vacuously: most structs and opcodes exist in any 7.3x header
    assert structs_checked >= 45
    assert sum(k.startswith("size.") for k in got) >= 40
    assert sum(k.startswith("op.") for k in got) >= 45
    assert sum(k.startswith("init.") for k in got) >= 32
    assert "fuse_notify_lock_out" not in {k.split(".")[1] for k in got}
