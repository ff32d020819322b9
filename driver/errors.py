"""Exceptions shared by every layer of vfsdrv. Each message says what went wrong
and, where there is one, what the user can do about it."""

from __future__ import annotations


class VfsdrvError(Exception):
    """Base class: an error a user can read."""


class DmaError(VfsdrvError):
    """DMA memory could not be allocated, mapped or translated."""


class TransportError(VfsdrvError):
    """The bus (vhost-user socket, VFIO device) refused or failed an operation."""


class DeviceGoneError(TransportError, ConnectionError):
    """The device disappeared: backend closed its socket, function unplugged.
    Also a ConnectionError, so code that handles OSError sees it as one."""


class DeviceError(VfsdrvError):
    """The device broke the virtio protocol or failed initialization."""


class DeviceNeedsResetError(DeviceError, ConnectionError):
    """The device set DEVICE_NEEDS_RESET: nothing in flight will complete."""


class FeatureNegotiationError(DeviceError):
    """FEATURES_OK was cleared by the device: it rejected our feature subset."""


class RingError(DeviceError):
    """The device handed back something invalid on a virtqueue (bad id, length...)."""


class ConfigError(DeviceError):
    """A device configuration field is invalid (tag encoding, queue count...)."""


class CapabilityError(DeviceError):
    """A virtio PCI capability is malformed (names the capability and the problem)."""


class ProtocolError(DeviceError):
    """The device broke the FUSE protocol (reply length, unknown unique...)."""


class DeviceTimeoutError(TransportError, TimeoutError):
    """The device (a vhost-user backend) did not answer a message within its deadline.
    The message names the backend and what was waited for."""
