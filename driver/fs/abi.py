"""The FUSE wire protocol: every struct declared once, with cffi, and the constants.

Sizes and offsets are those of Linux's include/uapi/linux/fuse.h (protocol 7.45) and
are pinned by tests/test_fuse_abi.py. Little-endian only: the driver sends a
little-endian FUSE_INIT, which fixes the session's byte order (virtio-fs 5.11.6.1).
Also used by the reference device, which shares these definitions with the driver.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

from cffi import FFI

from ..errors import ProtocolError

CDEF = """
struct fuse_in_header {
    uint32_t len; uint32_t opcode; uint64_t unique; uint64_t nodeid;
    uint32_t uid; uint32_t gid; uint32_t pid; uint16_t total_extlen; uint16_t padding;
};
struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; };

struct fuse_attr {
    uint64_t ino; uint64_t size; uint64_t blocks;
    uint64_t atime; uint64_t mtime; uint64_t ctime;
    uint32_t atimensec; uint32_t mtimensec; uint32_t ctimensec;
    uint32_t mode; uint32_t nlink; uint32_t uid; uint32_t gid; uint32_t rdev;
    uint32_t blksize; uint32_t flags;
};
struct fuse_entry_out {
    uint64_t nodeid; uint64_t generation; uint64_t entry_valid; uint64_t attr_valid;
    uint32_t entry_valid_nsec; uint32_t attr_valid_nsec; struct fuse_attr attr;
};
struct fuse_attr_out {
    uint64_t attr_valid; uint32_t attr_valid_nsec; uint32_t dummy; struct fuse_attr attr;
};
struct fuse_kstatfs {
    uint64_t blocks; uint64_t bfree; uint64_t bavail; uint64_t files; uint64_t ffree;
    uint32_t bsize; uint32_t namelen; uint32_t frsize; uint32_t padding; uint32_t spare[6];
};
struct fuse_statfs_out { struct fuse_kstatfs st; };
struct fuse_file_lock { uint64_t start; uint64_t end; uint32_t type; uint32_t pid; };

struct fuse_init_in {
    uint32_t major; uint32_t minor; uint32_t max_readahead; uint32_t flags;
    uint32_t flags2; uint32_t unused[11];
};
struct fuse_init_out {
    uint32_t major; uint32_t minor; uint32_t max_readahead; uint32_t flags;
    uint16_t max_background; uint16_t congestion_threshold; uint32_t max_write;
    uint32_t time_gran; uint16_t max_pages; uint16_t map_alignment;
    uint32_t flags2; uint32_t max_stack_depth; uint16_t request_timeout; uint16_t unused[11];
};
struct fuse_forget_in { uint64_t nlookup; };
struct fuse_forget_one { uint64_t nodeid; uint64_t nlookup; };
struct fuse_batch_forget_in { uint32_t count; uint32_t dummy; };
struct fuse_interrupt_in { uint64_t unique; };
struct fuse_getattr_in { uint32_t getattr_flags; uint32_t dummy; uint64_t fh; };
struct fuse_setattr_in {
    uint32_t valid; uint32_t padding; uint64_t fh; uint64_t size; uint64_t lock_owner;
    uint64_t atime; uint64_t mtime; uint64_t ctime;
    uint32_t atimensec; uint32_t mtimensec; uint32_t ctimensec;
    uint32_t mode; uint32_t unused4; uint32_t uid; uint32_t gid; uint32_t unused5;
};
struct fuse_mknod_in { uint32_t mode; uint32_t rdev; uint32_t umask; uint32_t padding; };
struct fuse_mkdir_in { uint32_t mode; uint32_t umask; };
struct fuse_rename_in { uint64_t newdir; };
struct fuse_rename2_in { uint64_t newdir; uint32_t flags; uint32_t padding; };
struct fuse_link_in { uint64_t oldnodeid; };
struct fuse_open_in { uint32_t flags; uint32_t open_flags; };
struct fuse_create_in { uint32_t flags; uint32_t mode; uint32_t umask; uint32_t open_flags; };
struct fuse_open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct fuse_release_in {
    uint64_t fh; uint32_t flags; uint32_t release_flags; uint64_t lock_owner;
};
struct fuse_flush_in { uint64_t fh; uint32_t unused; uint32_t padding; uint64_t lock_owner; };
struct fuse_read_in {
    uint64_t fh; uint64_t offset; uint32_t size; uint32_t read_flags;
    uint64_t lock_owner; uint32_t flags; uint32_t padding;
};
struct fuse_write_in {
    uint64_t fh; uint64_t offset; uint32_t size; uint32_t write_flags;
    uint64_t lock_owner; uint32_t flags; uint32_t padding;
};
struct fuse_write_out { uint32_t size; uint32_t padding; };
struct fuse_fsync_in { uint64_t fh; uint32_t fsync_flags; uint32_t padding; };
struct fuse_setxattr_in {
    uint32_t size; uint32_t flags; uint32_t setxattr_flags; uint32_t padding;
};
struct fuse_getxattr_in { uint32_t size; uint32_t padding; };
struct fuse_getxattr_out { uint32_t size; uint32_t padding; };
struct fuse_lk_in {
    uint64_t fh; uint64_t owner; struct fuse_file_lock lk; uint32_t lk_flags; uint32_t padding;
};
struct fuse_lk_out { struct fuse_file_lock lk; };
struct fuse_access_in { uint32_t mask; uint32_t padding; };
struct fuse_fallocate_in {
    uint64_t fh; uint64_t offset; uint64_t length; uint32_t mode; uint32_t padding;
};
struct fuse_lseek_in { uint64_t fh; uint64_t offset; uint32_t whence; uint32_t padding; };
struct fuse_lseek_out { uint64_t offset; };
struct fuse_copy_file_range_in {
    uint64_t fh_in; uint64_t off_in; uint64_t nodeid_out; uint64_t fh_out;
    uint64_t off_out; uint64_t len; uint64_t flags;
};
struct fuse_dirent { uint64_t ino; uint64_t off; uint32_t namelen; uint32_t type; };
struct fuse_direntplus { struct fuse_entry_out entry_out; struct fuse_dirent dirent; };
struct fuse_syncfs_in { uint64_t padding; };

struct fuse_notify_poll_wakeup_out { uint64_t kh; };
struct fuse_notify_inval_inode_out { uint64_t ino; int64_t off; int64_t len; };
struct fuse_notify_inval_entry_out { uint64_t parent; uint32_t namelen; uint32_t flags; };
struct fuse_notify_delete_out {
    uint64_t parent; uint64_t child; uint32_t namelen; uint32_t padding;
};
struct fuse_notify_store_out {
    uint64_t nodeid; uint64_t offset; uint32_t size; uint32_t padding;
};
struct fuse_notify_retrieve_out {
    uint64_t notify_unique; uint64_t nodeid; uint64_t offset; uint32_t size; uint32_t padding;
};
struct fuse_notify_retrieve_in {
    uint64_t dummy1; uint64_t offset; uint32_t size; uint32_t dummy2;
    uint64_t dummy3; uint64_t dummy4;
};
/* Proposed for virtio-fs blocking locks (not in mainline fuse.h): see docs/notify-lock.rst */
struct fuse_notify_lock_out { uint64_t unique; int32_t error; int32_t padding; };

/* virtio-fs device configuration space (virtio 1.2 5.11.4) */
struct virtio_fs_config { uint8_t tag[36]; uint32_t num_request_queues; uint32_t notify_buf_size; };
"""

ffi = FFI()
ffi.cdef(CDEF)

IN_HEADER_SIZE = ffi.sizeof("struct fuse_in_header")
OUT_HEADER_SIZE = ffi.sizeof("struct fuse_out_header")

#: protocol this driver speaks (it accepts a device offering any minor >= MIN_MINOR)
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
MIN_MINOR = 27
#: FUSE_COMPAT_SETXATTR_IN_SIZE: the 8-byte setxattr_in used without FUSE_SETXATTR_EXT
COMPAT_SETXATTR_IN_SIZE = 8
#: positive "wait" reply to FUSE_SETLKW: completed later by FUSE_NOTIFY_LOCK
FUSE_LOCK_WAIT = 1


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


def opcode_name(opcode: int) -> str:
    """OPCODE's name (READ), or "opcode N" for one this table does not know."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


def signed64(value: int) -> int:
    """A u64 wire field the kernel reads as a signed 64-bit number (time seconds,
    loff_t offsets): two's complement, so a time before 1970 comes negative."""
    return value - (1 << 64) if value & (1 << 63) else value


def wire_time(ns: int) -> tuple[int, int]:
    """A time in ns as FUSE's (u64 seconds, nsec): negative seconds in two's
    complement, nsec always 0..999999999 (as in a timespec)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & ((1 << 64) - 1), nsec


def time_ns(sec: int, nsec: int) -> int:
    """A FUSE time (u64 seconds on the wire, read as signed) in ns."""
    return signed64(sec) * 1_000_000_000 + nsec


#: requests that go on the hiprio queue and get no reply (virtio 1.2 5.11.6.2)
HIPRIO_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    #: mainline 7.40 RESEND (no payload) and the virtio-fs LOCK proposal share 7;
    #: they are told apart by length (LOCK carries a 16-byte fuse_notify_lock_out).
    RESEND_OR_LOCK = 7
    INC_EPOCH = 8
    PRUNE = 9


#: default notify code of FUSE_NOTIFY_LOCK (the 2021 proposal); configurable
DEFAULT_NOTIFY_LOCK_CODE = 7


class InitFlag(enum.IntFlag):
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    # flags2, shifted up by 32
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FUSE_LK_FLOCK = 1 << 0
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_GETATTR_FH = 1 << 0
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0


@functools.cache
def _pointer_type(struct: str) -> Any:
    # parsing a C type string costs more than the copy itself: do it once per struct
    return ffi.typeof(f"struct {struct} *")


@functools.cache
def sizeof(struct: str) -> int:
    return ffi.sizeof(f"struct {struct}")


def new(struct: str, /, **fields: Any) -> Any:
    """A zeroed struct (owned by Python) with the given fields set (nested structs
    as dicts)."""
    return ffi.new(_pointer_type(struct), fields)


def pack(struct: str, /, **fields: Any) -> bytes:
    """The wire bytes of a struct with the given fields (others zero)."""
    return bytes(ffi.buffer(new(struct, **fields)))


def unpack(struct: str, data: bytes | bytearray | memoryview, offset: int = 0) -> Any:
    """A copy of the struct found at `offset` in `data`; ProtocolError if it is short.

    Keep the result alive while using a nested struct taken from it (`x.attr`):
    cffi hands out nested structs as views into their owner."""
    size = sizeof(struct)
    if offset < 0 or len(data) - offset < size:
        raise ProtocolError(
            f"struct {struct} needs {size} bytes, only {max(0, len(data) - offset)} available"
        )
    obj = ffi.new(_pointer_type(struct))
    ffi.memmove(obj, memoryview(data)[offset : offset + size], size)
    return obj


def pack_into(
    buf: memoryview | bytearray, offset: int, struct: str, /, **fields: Any
) -> int:
    """Write a struct into `buf` at `offset`; returns the number of bytes written."""
    data = pack(struct, **fields)
    buf[offset : offset + len(data)] = data
    return len(data)


def as_dict(obj: Any) -> dict[str, Any]:
    """Field values of a cffi struct, nested structs as dicts (for logs and tests)."""
    out: dict[str, Any] = {}
    for name, field in ffi.typeof(obj[0] if ffi.typeof(obj).kind == "pointer" else obj).fields:
        value = getattr(obj, name)
        if field.type.kind == "struct":
            out[name] = as_dict(value)
        elif field.type.kind == "array":
            out[name] = list(value)
        else:
            out[name] = value
    return out


def notify_problem(code: int, payload: bytes | memoryview) -> str | None:
    """What is wrong with a notification's payload by the kernel's own checks
    (fuse_notify_* in fs/fuse/dev.c refuse it with EINVAL), or None. Codes 1-6 are
    judged; 7 (RESEND or the LOCK proposal) and later ones are the caller's."""
    n = len(payload)
    fixed = {NotifyCode.POLL: "fuse_notify_poll_wakeup_out",
             NotifyCode.INVAL_INODE: "fuse_notify_inval_inode_out",
             NotifyCode.RETRIEVE: "fuse_notify_retrieve_out"}
    named = {NotifyCode.INVAL_ENTRY: "fuse_notify_inval_entry_out",
             NotifyCode.DELETE: "fuse_notify_delete_out"}
    if code in fixed:
        want = sizeof(fixed[code])
        return None if n == want else f"{NotifyCode(code).name} of {n} bytes, not {want}"
    if code in named:
        head = sizeof(named[code])
        if n < head:
            return f"{NotifyCode(code).name} of {n} bytes, under its {head}-byte header"
        namelen = unpack(named[code], payload).namelen
        if n != head + namelen + 1:
            return (f"{NotifyCode(code).name} of {n} bytes for a {namelen}-byte name "
                    f"(expected {head + namelen + 1}, NUL included)")
        return None
    if code == NotifyCode.STORE:
        head = sizeof("fuse_notify_store_out")
        if n < head:
            return f"STORE of {n} bytes, under its {head}-byte header"
        size = unpack("fuse_notify_store_out", payload).size
        return None if n - head == size else f"STORE of {size} bytes carries {n - head}"
    return None


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE: header plus name, padded to 8 bytes."""
    return (sizeof("fuse_dirent") + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return (sizeof("fuse_direntplus") + namelen + 7) & ~7
