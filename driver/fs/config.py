"""virtio-fs device configuration (virtio 1.2 5.11.4), read and validated.

The device is untrusted: the tag must be UTF-8, NUL-padded, with nothing after the
first NUL; num_request_queues must be >= 1; notify_buf_size (only with
VIRTIO_FS_F_NOTIFICATION) must hold the notifications this driver handles.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError
from . import abi

TAG_SIZE = 36
CONFIG_SIZE = abi.sizeof("virtio_fs_config")  # 44
CONFIG_SIZE_NO_NOTIFY = 40
VIRTIO_FS_F_NOTIFICATION = 1 << 0

#: smallest notify buffer that carries FUSE_NOTIFY_LOCK: out header + fuse_notify_lock_out
MIN_NOTIFY_BUF_SIZE = abi.OUT_HEADER_SIZE + abi.sizeof("fuse_notify_lock_out")
#: sanity bound on what a device may ask per notification buffer
MAX_NOTIFY_BUF_SIZE = 1 << 20
#: more request queues than this is taken as a broken device rather than honoured
MAX_REQUEST_QUEUES = 1024


@dataclass(frozen=True)
class FsConfig:
    tag: str
    num_request_queues: int
    notify_buf_size: int | None  # None without VIRTIO_FS_F_NOTIFICATION


def decode_tag(raw: bytes) -> str:
    if len(raw) != TAG_SIZE:
        raise ConfigError(f"tag field is {len(raw)} bytes, expected {TAG_SIZE}")
    end = raw.find(b"\0")
    body = raw if end < 0 else raw[:end]
    if end >= 0 and raw[end:].strip(b"\0"):
        raise ConfigError(f"tag {raw!r} has bytes after its NUL padding")
    if not body:
        raise ConfigError("tag is empty")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"tag {body!r} is not valid UTF-8: {exc}") from exc


def encode_tag(tag: str) -> bytes:
    try:
        raw = tag.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a command line (surrogates)
        raw = b""
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ConfigError(f"tag {tag!r} must be 1-{TAG_SIZE} bytes of UTF-8 without NUL")
    return raw.ljust(TAG_SIZE, b"\0")


def encode_config(tag: str, num_request_queues: int, notify_buf_size: int = 0) -> bytes:
    return encode_tag(tag) + struct.pack("<II", num_request_queues, notify_buf_size)


def parse_config(raw: bytes, *, notification: bool) -> FsConfig:
    want = CONFIG_SIZE if notification else CONFIG_SIZE_NO_NOTIFY
    if len(raw) < want:
        raise ConfigError(f"device config is {len(raw)} bytes, expected {want}")
    tag = decode_tag(raw[:TAG_SIZE])
    (nrq,) = struct.unpack_from("<I", raw, TAG_SIZE)
    if nrq < 1:
        raise ConfigError("num_request_queues is 0; the device must expose at least one")
    if nrq > MAX_REQUEST_QUEUES:
        raise ConfigError(f"num_request_queues is {nrq}, more than {MAX_REQUEST_QUEUES}")
    nbs = None
    if notification:
        (nbs,) = struct.unpack_from("<I", raw, TAG_SIZE + 4)
        check_notify_buf_size(nbs)
    return FsConfig(tag, nrq, nbs)


def check_notify_buf_size(size: int) -> None:
    if size < MIN_NOTIFY_BUF_SIZE:
        raise ConfigError(
            f"notify_buf_size {size} is too small: FUSE_NOTIFY_LOCK needs "
            f"{MIN_NOTIFY_BUF_SIZE} bytes (16-byte out header + 16-byte payload)"
        )
    if size > MAX_NOTIFY_BUF_SIZE:
        raise ConfigError(f"notify_buf_size {size} is larger than {MAX_NOTIFY_BUF_SIZE}")
