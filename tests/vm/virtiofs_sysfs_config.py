"""Guest-side helper: print the virtio-fs device configuration of a PCI function as JSON.

usage: virtiofs_sysfs_config.py BDF

Uses only sysfs (no VFIO, no project code): unbinds the function from its driver,
walks the virtio vendor capabilities in ``config`` to the device-specific
configuration (cfg_type 4) and reads ``struct virtio_fs_config`` (tag[36],
le32 num_request_queues) from the mmap'ed BAR ``resourceN`` with 32-bit loads.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys

VIRTIO_PCI_CAP_DEVICE_CFG = 4


def main(bdf: str) -> None:
    dev = f"/sys/bus/pci/devices/{bdf}"
    if os.path.exists(f"{dev}/driver"):
        with open(f"{dev}/driver/unbind", "w") as f:
            f.write(bdf)
    with open(f"{dev}/enable", "w") as f:  # memory decoding on
        f.write("1")
    with open(f"{dev}/config", "rb") as f:
        cfg = f.read(256)
    ptr = cfg[0x34] if cfg[0x06] & 0x10 else 0
    while ptr:
        if cfg[ptr] == 0x09 and cfg[ptr + 3] == VIRTIO_PCI_CAP_DEVICE_CFG:
            bar, offset, length = struct.unpack_from("<B3xII", cfg, ptr + 4)
            break
        ptr = cfg[ptr + 1]
    else:
        sys.exit(f"{bdf}: no virtio device-config capability")
    fd = os.open(f"{dev}/resource{bar}", os.O_RDWR | os.O_SYNC)
    base = offset & ~(mmap.PAGESIZE - 1)
    m = mmap.mmap(fd, offset - base + 40, offset=base)
    words = memoryview(m)[offset - base:offset - base + 40].cast("I")
    raw = struct.pack("<10I", *(words[i] for i in range(10)))  # one 32-bit load each
    tag = raw[:36].split(b"\0", 1)[0].decode()
    print(json.dumps({"bdf": bdf, "length": length, "tag": tag,
                      "num_request_queues": struct.unpack_from("<I", raw, 36)[0]}))


if __name__ == "__main__":
    main(sys.argv[1])
