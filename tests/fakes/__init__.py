"""In-process fakes for unit tests: a split-ring device and a virtio Transport."""
