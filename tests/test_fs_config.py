"""virtio-fs device configuration (tag, num_request_queues, notify_buf_size) as read
from an untrusted device, and the reply room sized per FUSE opcode."""

from __future__ import annotations

import struct

import pytest
from vfsdrv.errors import ConfigError
from vfsdrv.fs import config, sizing
from vfsdrv.fs.abi import Opcode


def raw_config(tag: bytes, nrq: int = 1, nbs: int | None = None) -> bytes:
    """The config space bytes exactly as a device lays them out (little-endian)."""
    out = tag + struct.pack("<I", nrq)
    if nbs is not None:
        out += struct.pack("<I", nbs)
    return out


def padded(tag: bytes) -> bytes:
    return tag + bytes(36 - len(tag))


# -- tag -----------------------------------------------------------------------------------
def test_nul_padded_tag() -> None:
    assert config.decode_tag(padded(b"myfs")) == "myfs"
    assert config.decode_tag(padded(b"a")) == "a"


def test_full_36_byte_tag_has_no_nul() -> None:
    tag = b"abcdefghijklmnopqrstuvwxyz0123456789"
    assert len(tag) == 36
    assert config.decode_tag(tag) == tag.decode()


def test_full_tag_of_multibyte_utf8() -> None:
    tag = "é" * 18  # 36 bytes
    assert config.decode_tag(tag.encode()) == tag
    assert config.decode_tag(padded("föö-ß".encode())) == "föö-ß"


@pytest.mark.parametrize(
    "raw",
    [padded(b"fs\0x"), padded(b"fs\0\0\0\0\0\0\x01"), b"fs" + bytes(33) + b"z", padded(b"\0fs")],
)
def test_bytes_after_the_nul_are_refused(raw: bytes) -> None:
    with pytest.raises(ConfigError, match="after its NUL"):
        config.decode_tag(raw)


@pytest.mark.parametrize(
    "raw",
    [
        padded(b"\xff\xfe"),
        padded(b"ok\xc3"),  # truncated two-byte sequence before the padding
        b"a" * 35 + b"\xc3",  # truncated at the end of a full tag
        padded(b"\xed\xa0\x80"),  # an encoded surrogate
        padded(b"\xc0\xaf"),  # overlong '/'
    ],
)
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        config.decode_tag(raw)


def test_empty_tag_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        config.decode_tag(bytes(36))


@pytest.mark.parametrize("n", [0, 35, 37])
def test_tag_field_must_be_36_bytes(n: int) -> None:
    with pytest.raises(ConfigError, match="36"):
        config.decode_tag(b"x" * n)


def test_encode_tag_round_trips_and_refuses_bad_tags() -> None:
    for tag in ("a", "myfs", "x" * 36, "é" * 18):
        raw = config.encode_tag(tag)
        assert len(raw) == 36 and raw.rstrip(b"\0") == tag.encode()
        assert config.decode_tag(raw) == tag
    for bad in ("", "x" * 37, "é" * 19, "a\0b"):
        with pytest.raises(ConfigError):
            config.encode_tag(bad)


# -- whole config --------------------------------------------------------------------------
def test_parse_without_notification() -> None:
    cfg = config.parse_config(raw_config(padded(b"share"), 3), notification=False)
    assert cfg == config.FsConfig("share", 3, None)
    # whatever follows the 40 bytes is not looked at without the feature
    cfg = config.parse_config(raw_config(padded(b"share"), 3, 0), notification=False)
    assert cfg.notify_buf_size is None


def test_parse_with_notification() -> None:
    cfg = config.parse_config(raw_config(padded(b"share"), 2, 4096), notification=True)
    assert cfg == config.FsConfig("share", 2, 4096)


def test_fields_are_little_endian() -> None:
    raw = padded(b"t") + bytes([2, 1, 0, 0]) + bytes([0, 2, 0, 0])
    cfg = config.parse_config(raw, notification=True)
    assert (cfg.num_request_queues, cfg.notify_buf_size) == (0x102, 0x200)


@pytest.mark.parametrize("n,notification", [(39, False), (0, False), (43, True), (40, True)])
def test_short_config_is_refused(n: int, notification: bool) -> None:
    raw = raw_config(padded(b"share"), 1, 64)[:n]
    with pytest.raises(ConfigError, match=f"is {n} bytes"):
        config.parse_config(raw, notification=notification)


def test_encode_config_matches_the_layout() -> None:
    raw = config.encode_config("share", 4, 256)
    assert raw == raw_config(padded(b"share"), 4, 256)
    assert len(raw) == config.CONFIG_SIZE == 44


@pytest.mark.parametrize("nrq", [1, 2, 1024])
def test_num_request_queues_in_range(nrq: int) -> None:
    cfg = config.parse_config(raw_config(padded(b"s"), nrq), notification=False)
    assert cfg.num_request_queues == nrq


@pytest.mark.parametrize("nrq,msg", [(0, "is 0"), (1025, "1025"), (0xFFFFFFFF, "4294967295")])
def test_num_request_queues_out_of_range(nrq: int, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        config.parse_config(raw_config(padded(b"s"), nrq), notification=False)


@pytest.mark.parametrize("nbs", [32, 33, 4096, 1 << 20])
def test_notify_buf_size_in_range(nbs: int) -> None:
    cfg = config.parse_config(raw_config(padded(b"s"), 1, nbs), notification=True)
    assert cfg.notify_buf_size == nbs


@pytest.mark.parametrize("nbs,msg", [(0, "too small"), (16, "too small"), (31, "too small"),
                                     ((1 << 20) + 1, "larger"), (0xFFFFFFFF, "larger")])
def test_notify_buf_size_out_of_range(nbs: int, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        config.parse_config(raw_config(padded(b"s"), 1, nbs), notification=True)
    with pytest.raises(ConfigError, match=msg):
        config.check_notify_buf_size(nbs)


def test_minimum_notify_buffer_holds_a_lock_notification() -> None:
    # fuse_out_header (16) + fuse_notify_lock_out (16)
    assert config.MIN_NOTIFY_BUF_SIZE == 32


def test_bad_tag_fails_the_whole_config() -> None:
    with pytest.raises(ConfigError, match="UTF-8"):
        config.parse_config(raw_config(padded(b"\xff"), 1, 64), notification=True)


# -- reply room per opcode ------------------------------------------------------------------
MAX_IO = 256 * 1024

FIXED = {
    Opcode.LOOKUP: 128, Opcode.MKNOD: 128, Opcode.MKDIR: 128, Opcode.SYMLINK: 128,
    Opcode.LINK: 128,  # fuse_entry_out
    Opcode.GETATTR: 104, Opcode.SETATTR: 104,  # fuse_attr_out
    Opcode.OPEN: 16, Opcode.OPENDIR: 16,  # fuse_open_out
    Opcode.CREATE: 144, Opcode.TMPFILE: 144,  # entry_out + open_out
    Opcode.WRITE: 8, Opcode.COPY_FILE_RANGE: 8,  # fuse_write_out
    Opcode.STATFS: 80, Opcode.GETLK: 24, Opcode.INIT: 64, Opcode.LSEEK: 8,
    Opcode.BMAP: 8, Opcode.POLL: 8, Opcode.READLINK: 4096,
}
NO_DATA = [
    Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.RELEASE,
    Opcode.RELEASEDIR, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.FLUSH, Opcode.SETXATTR,
    Opcode.REMOVEXATTR, Opcode.SETLK, Opcode.SETLKW, Opcode.ACCESS, Opcode.FALLOCATE,
    Opcode.DESTROY, Opcode.SYNCFS, Opcode.NOTIFY_REPLY,
]
NO_REPLY = [Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT]
READ_LIKE = [Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS]
XATTR = [Opcode.GETXATTR, Opcode.LISTXATTR]
UNKNOWN = [Opcode.IOCTL, Opcode.STATX, Opcode.COPY_FILE_RANGE_64, Opcode.SETUPMAPPING,
           Opcode.REMOVEMAPPING]


def read_in(size: int) -> bytes:
    # fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
    return struct.pack("<QQIIQII", 7, 4096, size, 0, 0, 0, 0)


def test_every_opcode_is_covered_here() -> None:
    listed = [*FIXED, *NO_DATA, *NO_REPLY, *READ_LIKE, *XATTR, *UNKNOWN]
    assert sorted(listed) == sorted(Opcode)


@pytest.mark.parametrize("op", sorted(FIXED))
def test_fixed_size_replies(op: Opcode) -> None:
    assert sizing.reply_capacity(op, b"", MAX_IO) == FIXED[op]
    assert sizing.reply_capacity(op, read_in(1 << 30), MAX_IO) == FIXED[op]  # args ignored


@pytest.mark.parametrize("op", NO_DATA)
def test_replies_without_payload(op: Opcode) -> None:
    assert sizing.reply_capacity(op, read_in(4096), MAX_IO) == 0


@pytest.mark.parametrize("op", NO_REPLY)
def test_hiprio_requests_get_no_reply(op: Opcode) -> None:
    assert sizing.reply_capacity(op, b"\0" * 16, MAX_IO) is None


@pytest.mark.parametrize("op", READ_LIKE)
def test_read_like_replies_are_sized_by_the_request(op: Opcode) -> None:
    assert sizing.reply_capacity(op, read_in(4096), MAX_IO) == 4096
    assert sizing.reply_capacity(op, read_in(1), MAX_IO) == 1
    assert sizing.reply_capacity(op, read_in(0), MAX_IO) == 0
    assert sizing.reply_capacity(op, read_in(MAX_IO + 1), MAX_IO) == MAX_IO
    assert sizing.reply_capacity(op, read_in(0xFFFFFFFF), MAX_IO) == MAX_IO
    assert sizing.reply_capacity(op, memoryview(read_in(512)), MAX_IO) == 512
    assert sizing.reply_capacity(op, read_in(512)[:19], MAX_IO) == 0  # truncated args


@pytest.mark.parametrize("op", XATTR)
def test_xattr_replies(op: Opcode) -> None:
    def args(size: int) -> bytes:
        return struct.pack("<II", size, 0)  # fuse_getxattr_in

    assert sizing.reply_capacity(op, args(0), MAX_IO) == 8  # size probe: fuse_getxattr_out
    assert sizing.reply_capacity(op, args(100), MAX_IO) == 100
    assert sizing.reply_capacity(op, args(65536), 4096) == 4096
    assert sizing.reply_capacity(op, b"\x10\0\0", MAX_IO) == 0


@pytest.mark.parametrize("op", [*UNKNOWN, 9999, 0])
def test_unknown_opcodes_get_a_page(op: int) -> None:
    assert sizing.reply_capacity(op, b"", MAX_IO) == 4096


# -- I/O size on scattered pages -----------------------------------------------------------
def _started(arena, ring: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fakes.transport import FakeTransport
    from vfsdrv.fs.device import VirtioFs

    t = FakeTransport(config=config.encode_config("t", 1), queue_max={0: ring, 1: ring},
                      arena=arena)
    return VirtioFs(t, queue_size=256, notification=False, small_slots=2,
                    large_slots=2).start()


def _scattered_arena(pages: int):
    """After 64 contiguous pages (the rings' parts want one range each), every 4 KiB
    page its own device range, in reverse order (no-IOMMU pinned pages)."""
    import mmap

    from vfsdrv.virtio.memory import Arena

    def translate(off: int) -> tuple[int, int]:
        page, inner = divmod(off, 4096)
        if page < 64:
            return off, 64 * 4096 - off
        return (pages - page) * 0x10000 + inner, 4096 - inner

    return Arena(memoryview(mmap.mmap(-1, pages * 4096)), translate)


@pytest.mark.parametrize("ring", [256, 64])
def test_scattered_pages_limit_io_to_what_a_chain_fits(ring: int) -> None:
    """With a descriptor per page, a 1 MiB READ would be a chain longer than the ring
    (neither indirect nor direct: every such request would fail EIO): max_io shrinks
    so that the biggest request's chain fits, and a contiguous arena keeps 1 MiB."""
    fs = _started(_scattered_arena(4096), ring)
    try:
        assert fs.max_io == sizing.scattered_io_limit(ring) < 1 << 20
        slot = fs.slots.large[0]
        for opcode, in_len in ((Opcode.READ, 80), (Opcode.WRITE, 80 + fs.max_io)):
            req = sizing.request_offset(opcode)
            rep = sizing.reply_offset(req, in_len)
            cap = fs.max_io if opcode == Opcode.READ else 8
            chain = (len(slot.buf.segments(req, in_len))
                     + len(slot.buf.segments(rep, 16 + cap)))
            assert chain <= ring, (opcode, chain)
    finally:
        fs.close()
    from fakes.transport import identity_arena

    fs = _started(identity_arena(16 << 20), ring)
    try:
        assert fs.max_io == 1 << 20
    finally:
        fs.close()


def test_request_queues_with_requests_in_flight_are_not_handed_to_pumps() -> None:
    """A pump knows nothing of chains already on its ring: their completions would
    name slots it never had."""
    from fakes.transport import identity_arena
    from vfsdrv.errors import DeviceError
    from vfsdrv.fs.abi import Opcode

    fs = _started(identity_arena(16 << 20), 64)
    try:
        fs.call_async(Opcode.GETATTR, 1, bytes(16))  # the fake device never answers
        with pytest.raises(DeviceError, match="still have requests in flight"):
            fs.hand_over_request_queues()
        assert not fs.pumped
    finally:
        fs.close()
