"""Device-independent virtio constants (virtio 1.2 2.1, 6)."""

from __future__ import annotations

import enum


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(enum.IntFlag):
    """Reserved (transport/ring) feature bits the driver knows."""

    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


#: bits 0-23 belong to the device type, 24-40 (and 43) to the transport/rings
DEVICE_FEATURE_MASK = (1 << 24) - 1

#: transport bits outside `Feature` that devices still offer (legacy, and vhost's own),
#: by their spec names, so that every listing calls them the same
TRANSPORT_BIT_NAMES = {24: "NOTIFY_ON_EMPTY", 26: "VHOST_F_LOG_ALL", 27: "ANY_LAYOUT",
                       30: "VHOST_USER_F_PROTOCOL_FEATURES"}

VIRTIO_ID_FS = 26


def feature_names(bits: int, device_names: dict[int, str] | None = None) -> str:
    names = []
    for b in range(64):
        if bits >> b & 1:
            if device_names and b in device_names:
                names.append(device_names[b])
            elif b in TRANSPORT_BIT_NAMES:
                names.append(TRANSPORT_BIT_NAMES[b])
            else:
                try:
                    names.append(Feature(1 << b).name or f"bit{b}")
                except ValueError:
                    names.append(f"bit{b}")
    return ", ".join(names) or "none"
