"""Attributes no file can have (a size past LLONG_MAX, a mode without a file type):
both frontends refuse them as the kernel's fuse_invalid_attr does. The program gets
EIO for that request, the server logs why (no traceback), and the mount goes on
serving everything else.

The reference device runs in this process (inprocess_refdev_mount) with its
attribute encoder rewritten for the files named below.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from mount_helpers import inprocess_refdev_mount

HUGE = 2**63 + 5  # a u64 size the kernel cannot hold in loff_t
SIZE_OF_HUGE = 12345  # the host file whose size the device misreports
SIZE_OF_TYPELESS = 23456  # the host file whose mode the device strips of its type
SIZE_OF_EMPTY = 34567  # the host file whose GETATTR the device answers with no payload


@pytest.fixture
def lying_device(monkeypatch) -> None:
    from vfsdrv.refdev import fuse_server

    real = fuse_server._attr

    def attr(st: os.stat_result) -> dict:
        out = real(st)
        if st.st_size == SIZE_OF_HUGE:
            out["size"] = HUGE
        elif st.st_size == SIZE_OF_TYPELESS:
            out["mode"] = 0o644  # no S_IFMT bits
        return out

    monkeypatch.setattr(fuse_server, "_attr", attr)
    real_getattr = fuse_server.FuseServer.getattr

    def getattr_(self, hdr, body):
        out = real_getattr(self, hdr, body)
        return b"" if out.attr.size == SIZE_OF_EMPTY else out

    monkeypatch.setattr(fuse_server.FuseServer, "getattr", getattr_)


@pytest.mark.parametrize("frontend", ["relay", "pyfuse3"])
def test_invalid_attributes_fail_that_request_only(tmp_path: Path, lying_device: None,
                                                   frontend: str) -> None:
    with inprocess_refdev_mount(tmp_path, "--frontend", frontend) as (mnt, log, _):
        export = tmp_path / "export"
        (export / "huge").write_bytes(b"h" * SIZE_OF_HUGE)
        (export / "typeless").write_bytes(b"t" * SIZE_OF_TYPELESS)
        (export / "empty").write_bytes(b"e" * SIZE_OF_EMPTY)
        with open(mnt / "empty", "rb") as f:  # LOOKUP is fine; fstat asks GETATTR
            time.sleep(1.1)  # past the attribute timeout the LOOKUP gave
            with pytest.raises(OSError) as exc:
                os.fstat(f.fileno())
            assert exc.value.errno == errno.EIO, exc.value
        for name in ("huge", "typeless"):
            with pytest.raises(OSError) as exc:
                os.stat(mnt / name)
            assert exc.value.errno == errno.EIO, (name, exc.value)
        assert (mnt / "f").read_text() == "x"  # the mount still serves the rest
        # a listing is not spoilt by them (the kernel leaves such an entry's attributes
        # out; pyfuse3 cannot, so it leaves the entry out)
        assert "f" in os.listdir(mnt)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        if frontend == "pyfuse3":  # the relay's kernel refuses them itself
            assert f"size {HUGE} exceeds LLONG_MAX" in text, text[-3000:]
            assert "mode 0o644 has no valid file type" in text, text[-3000:]
