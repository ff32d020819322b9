"""How much device-writable room each FUSE request needs.

Sized exactly per opcode: virtiofsd fills the whole writable part of a READ
whatever the requested size, so room beyond the reply is not harmless.
"""

from __future__ import annotations

import struct

from . import abi
from .abi import Opcode

PATH_MAX = 4096
_ENTRY = abi.sizeof("fuse_entry_out")
_ATTR = abi.sizeof("fuse_attr_out")
_OPEN = abi.sizeof("fuse_open_out")

FIXED_REPLY = {
    Opcode.LOOKUP: _ENTRY,
    Opcode.MKNOD: _ENTRY,
    Opcode.MKDIR: _ENTRY,
    Opcode.SYMLINK: _ENTRY,
    Opcode.LINK: _ENTRY,
    Opcode.GETATTR: _ATTR,
    Opcode.SETATTR: _ATTR,
    Opcode.READLINK: PATH_MAX,
    Opcode.OPEN: _OPEN,
    Opcode.OPENDIR: _OPEN,
    Opcode.CREATE: _ENTRY + _OPEN,
    Opcode.TMPFILE: _ENTRY + _OPEN,
    Opcode.WRITE: abi.sizeof("fuse_write_out"),
    Opcode.COPY_FILE_RANGE: abi.sizeof("fuse_write_out"),
    Opcode.STATFS: abi.sizeof("fuse_statfs_out"),
    Opcode.GETLK: abi.sizeof("fuse_lk_out"),
    Opcode.INIT: abi.sizeof("fuse_init_out"),
    Opcode.LSEEK: abi.sizeof("fuse_lseek_out"),
    Opcode.BMAP: 8,
    Opcode.POLL: 8,
}
NO_REPLY_DATA = frozenset(
    {
        Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.RELEASE,
        Opcode.RELEASEDIR, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.FLUSH, Opcode.SETXATTR,
        Opcode.REMOVEXATTR, Opcode.SETLK, Opcode.SETLKW, Opcode.ACCESS, Opcode.FALLOCATE,
        Opcode.DESTROY, Opcode.SYNCFS, Opcode.NOTIFY_REPLY,
    }
)
#: room for replies of opcodes this table does not know (forwarded by the relay)
UNKNOWN_REPLY = 4096

_READ_SIZE = struct.Struct("<I")  # fuse_read_in.size at offset 16 of the args


def reply_capacity(opcode: int, args: memoryview | bytes, max_io: int) -> int | None:
    """Bytes of reply payload (after the out header) for a request; None when the
    request gets no reply at all (FORGET, BATCH_FORGET, INTERRUPT on hiprio)."""
    if opcode in abi.HIPRIO_OPCODES:
        return None
    fixed = FIXED_REPLY.get(opcode)
    if fixed is not None:
        return fixed
    if opcode in NO_REPLY_DATA:
        return 0
    if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
        if len(args) < 20:
            return 0
        return min(_READ_SIZE.unpack_from(args, 16)[0], max_io)
    if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR):
        if len(args) < 4:
            return 0
        size = _READ_SIZE.unpack_from(args, 0)[0]
        return abi.sizeof("fuse_getxattr_out") if size == 0 else min(size, max_io)
    return UNKNOWN_REPLY
