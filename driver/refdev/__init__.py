"""vfsdrv.refdev: a reference vhost-user virtio-fs device (see docs/refdev.rst).

It offers VIRTIO_FS_F_NOTIFICATION and implements blocking locks with
FUSE_NOTIFY_LOCK, which no public device does, so the driver can be tested
against them.
"""

from .cli import main
from .device import RefDevice
from .vhost_session import DeviceConfig

__all__ = ["DeviceConfig", "RefDevice", "main"]
