"""Node ids handed to the driver, and the open files and directories behind fh values.

A node is a host file held by an O_PATH descriptor and known by (st_dev, st_ino),
so two names of one file (hard links) are one node. Each LOOKUP-like reply adds one
to the node's lookup count and FORGET takes them away; at zero the node and its
descriptor go (FUSE's rule: the driver forgets exactly what it was told).

Every open handle is reported to `opened(key)` and, once closed, to `closed(key)`:
the lock table bounds a file's locks by the life of its open files (a handle holds
the host inode, so its number cannot be reused while locks may exist).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT_ID = 1


@dataclass
class Node:
    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    lookups: int = 0
    #: POSIX lock owners that locked this file since their last FLUSH, and the fh
    #: values they locked through: an owner left at RELEASE of such an fh is an open
    #: file (OFD lock), whose locks end with it
    posix_owners: dict[int, set[int]] = field(default_factory=dict)

    @property
    def proc_path(self) -> str:
        """A path that reaches the file itself (O_PATH fds refuse most f* calls)."""
        return f"/proc/self/fd/{self.fd}"


@dataclass
class DirEntry:
    name: bytes
    ino: int
    type: int  # S_IFMT >> 12


@dataclass
class Handle:
    node: Node
    fd: int
    entries: list[DirEntry] | None = field(default=None)  # directories: a snapshot
    fh: int = 0
    #: flock owners that locked through this open file (their locks end with it)
    flock_owners: set[int] = field(default_factory=set)


FileKey = tuple[int, int]


def _ignore(key: FileKey) -> None:
    pass


class InodeTable:
    def __init__(
        self,
        root: str,
        opened: Callable[[FileKey], None] = _ignore,
        closed: Callable[[FileKey], None] = _ignore,
    ) -> None:
        self._opened, self._closed = opened, closed
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = Node(ROOT_ID, fd, (st.st_dev, st.st_ino), lookups=1)
        self._by_id: dict[int, Node] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Node] = {self.root.key: self.root}
        self._next_id = ROOT_ID + 1
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def get(self, nodeid: int) -> Node:
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown node id {nodeid}") from None

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """Find `name` in `parent` and count one more lookup of it."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next_id, fd, key)
            self._next_id += 1
            self._by_id[node.nodeid] = node
            self._by_key[key] = node
        else:
            os.close(fd)
        node.lookups += 1
        return node, st

    def forget(self, nodeid: int, count: int) -> None:
        node = self._by_id.get(nodeid)
        if node is None or node is self.root:
            return
        node.lookups -= min(count, node.lookups)
        if node.lookups == 0:
            del self._by_id[nodeid]
            del self._by_key[node.key]
            os.close(node.fd)

    def add_handle(self, node: Node, fd: int, entries: list[DirEntry] | None = None) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, fd, entries, fh)
        self._opened(node.key)
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    def close_handle(self, fh: int) -> Handle:
        handle = self._handles.pop(fh, None)
        if handle is None:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        os.close(handle.fd)
        self._closed(handle.node.key)
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            os.close(handle.fd)
            self._closed(handle.node.key)
        for node in self._by_id.values():
            os.close(node.fd)
        self._handles.clear()
        self._by_id.clear()
        self._by_key.clear()
