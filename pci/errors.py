"""Errors of the PCI/VFIO layer. Each message says what is wrong and how to fix it.

They derive from the generic classes in `vfsdrv.errors`, so callers that catch
`TransportError` or `VfsdrvError` see them too.
"""

from __future__ import annotations

from ..errors import DmaError, TransportError

__all__ = [
    "PciError",
    "BadAddressError",
    "NotRootError",
    "VfioUnavailableError",
    "IommuUnavailableError",
    "GroupNotViableError",
    "DeviceBusyError",
    "WrongDeviceError",
    "BarError",
    "DmaError",
    "UnpinnedDmaError",
]


class PciError(TransportError):
    """A PCI function could not be found, bound, opened or accessed."""


class BadAddressError(PciError):
    """The PCI address (BDF) is malformed or names no device."""


class NotRootError(PciError):
    """VFIO needs privileges this process does not have."""


class VfioUnavailableError(PciError):
    """vfio-pci (or /dev/vfio) is not available."""


class IommuUnavailableError(PciError):
    """No IOMMU group and no-IOMMU mode is not enabled."""


class GroupNotViableError(PciError):
    """Another device of the IOMMU group is still bound to a host driver."""


class DeviceBusyError(PciError):
    """The function is in use by the kernel (e.g. a mounted virtiofs)."""


class WrongDeviceError(PciError):
    """The function is not the kind of device the caller asked for."""


class BarError(PciError):
    """A BAR is missing, too small, or cannot be mapped."""


class UnpinnedDmaError(DmaError):
    """No-IOMMU DMA on 4 KiB pages, which memory compaction may move under the device;
    refused unless forced (the message says how to get huge pages)."""
