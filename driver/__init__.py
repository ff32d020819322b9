"""vfsdrv: a userspace virtio-fs driver."""

__version__ = "0.1.0"
