"""A hostile virtio-fs device for the fuzzer (issue 10 item 19): the reference device
whose every answer may be rewritten on its way to the driver.

`HostileDevice` is a RefDevice (the real vhost-user backend, rings and FUSE server);
its sessions compute the honest reply first, then a seeded `Mutator` may change
the reply header, the payload (dirents, entries, attributes, INIT), the used entry
(id, len), the lock notifications (error, extra ones for uniques nobody waits for,
floods of distinct codes, malformed ones), the config space and the feature bits.
Every change is recorded as a `Mutation` saying whether the driver (or the kernel
behind the relay) must refuse it (`detectable`): the fuzzer judges the outcome
against that record and against the honest data.

Only answers are changed, never withheld: a device that silently keeps a request
makes any FUSE client wait (the kernel has no request deadline), so that is not a
driver defect and not fuzzed here.
"""

from __future__ import annotations

import errno
import random
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.device_queue import Chain, DeviceQueue
from vfsdrv.refdev.vhost_session import VhostUserSession, _error_reply, _is_hiprio_request

HDR = abi.OUT_HEADER_SIZE
OUT_HEADER = struct.Struct("<IiQ")
DIRENT = struct.Struct("<QQII")
ENTRY_SIZE = abi.sizeof("fuse_entry_out")
ATTR_OUT_ATTR = 16  # fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then the attr
ENTRY_ATTR = 40  # fuse_entry_out: nodeid, generation, 2 valid times, 2 nsec, then the attr
ATTR_SIZE_OFF = 8  # fuse_attr: ino, size
ATTR_MODE_OFF = 60  # fuse_attr: ino size blocks atime mtime ctime (u64) 3 nsec (u32), mode
#: errnos whose meaning the kernel remembers (ENOSYS: "not implemented", EINTR and
#: the restart codes): replacing a success with them changes later requests
_SPECIAL_ERRNOS = {errno.ENOSYS, errno.EINTR, 512, 513, 514, 516, errno.EAGAIN}
_VALID_ERRNOS = [e for e in range(1, 512) if e not in _SPECIAL_ERRNOS]
_ENTRY_OPS = {Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK,
              Opcode.CREATE}
_NEW_ENTRY_OPS = _ENTRY_OPS - {Opcode.LOOKUP}
_ATTR_OPS = {Opcode.GETATTR, Opcode.SETATTR}
_DIR_OPS = {Opcode.READDIR, Opcode.READDIRPLUS}

#: reply mutations: name -> must the driver (or the kernel behind the relay) refuse it
REPLY_KINDS: dict[str, bool] = {
    "used_len_over": True,     # used len beyond the writable part: a broken ring
    "used_id_range": True,     # used id outside the ring
    # the honest entry comes first, then junk: the request may complete with its true
    # reply (a packed ring shows the junk only where the driver looks next)
    "used_id_dup": False,      # the same id used twice
    "used_idx_runaway": False,  # used idx far ahead of what is in flight (split only)
    # packed only: a whole lap of the ring marked used, ending on the request's own
    # entry with the next lap's flags (neither available nor used for the driver)
    "used_ring_lap": False,   # the honest entry first: success is fine; a hang is not
    # a SETLKW's "wait" reply with an error the kernel refuses: the driver answers EIO
    # while the device keeps the waiter parked (and later grants it)
    "lock_wait_refused": True,
    "used_len_short": True,    # used len shorter than an out header
    "used_len_cut": True,      # used len shorter than the header's len
    "hdr_len_big": True,       # header len beyond the used len
    "hdr_len_small": True,     # header len below 16
    "hdr_unique": True,        # the reply names another request
    "hdr_error_range": True,   # error in -4095..-512 (the kernel refuses it, item 1)
    "hdr_error_min": True,     # INT_MIN
    "hdr_error_positive": True,
    "hdr_error_payload": True,  # an error reply that carries payload
    "err_valid": True,         # a plain error instead of the success: must not succeed
    "dirent_slash": True,
    "dirent_nul": True,
    "dirent_empty": True,
    "dirent_namelen_huge": True,
    "dirent_off_stuck": True,  # offsets that send the reader back where it was
    "entry_nodeid0": True,     # LOOKUP: a negative entry; new entries: impossible
    "entry_root": True,        # a new entry claiming the root's node id
    "attr_mode": True,         # a mode without a file type
    "attr_size_huge": True,    # size beyond LLONG_MAX
    "init_major": True,
    "init_minor": True,
    "init_short": True,
    "init_max_write": False,   # 0 or huge: the driver clamps it; no wrong data
    "payload_flip": False,     # a plausible lie: nobody can tell (checked for invariants)
}
#: known driver defects (reported, regression tests in tests/test_fuzz_hostile.py):
#: left out of the random choice until fixed, replayable with --kinds
KNOWN_DEFECTS: set[str] = set()  # used_ring_lap: fixed by 119cccb (the pump looks again)
#: what only the typed client can judge (the relay forwards payloads as the kernel
#: reads them; a flipped byte in file data is a lie nobody can see)
CLIENT_ONLY = {"payload_flip"}
SESSION_KINDS = ["features_extra", "features_no_version", "features_no_notify",
                 "config_tag", "config_queues0", "config_queues_many", "config_nbs_small",
                 "config_nbs_huge"]
NOTIFY_KINDS = ["notify_lock_error", "notify_lock_extra", "notify_flood", "notify_malformed"]


@dataclass
class Mutation:
    kind: str
    opcode: int = 0
    unique: int = 0
    detectable: bool = True
    detail: str = ""

    def __str__(self) -> str:
        op = f" {_opname(self.opcode)} unique {self.unique}" if self.opcode else ""
        return f"{self.kind}{op}{': ' + self.detail if self.detail else ''}"


@dataclass
class Mutator:
    """Seeded choices. `rate`: chance that a reply is rewritten; `kinds`: the reply
    mutations allowed; `session`: session-level mutations (config, features) of this
    seed; `notify_rate`: chance per reply of a notification mischief."""

    seed: int
    rate: float = 0.1
    kinds: list[str] = field(default_factory=lambda: list(REPLY_KINDS))
    session: list[str] = field(default_factory=list)
    notify_rate: float = 0.05
    notify_kinds: list[str] = field(default_factory=lambda: list(NOTIFY_KINDS))
    flood: int = 300
    mutations: list[Mutation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # lock completions draw from their own generator: the main one is shared by
        # threads whose order varies, and a replayed seed should mangle the same way
        self.lock_rng = random.Random(self.seed + 1)
        self.lock = threading.Lock()
        self.replies = 0
        self._local = threading.local()

    def for_reply(self, unique: int, opcode: int) -> None:
        """Draw this reply's choices from a generator of (seed, unique, opcode): a
        replay makes the same choices for the same request, whatever order the
        session threads run in."""
        self._local.rng = random.Random(f"{self.seed}:{unique}:{opcode}")

    @property
    def _rng(self) -> random.Random:
        return getattr(self._local, "rng", None) or self.rng

    def record(self, m: Mutation) -> None:
        with self.lock:
            self.mutations.append(m)

    def mark(self) -> int:
        with self.lock:
            return len(self.mutations)

    def since(self, mark: int) -> list[Mutation]:
        with self.lock:
            return list(self.mutations[mark:])

    def chance(self, p: float) -> bool:
        with self.lock:
            return self._rng.random() < p

    def pick(self, items: list):
        with self.lock:
            return self._rng.choice(items)

    def randint(self, a: int, b: int) -> int:
        with self.lock:
            return self._rng.randint(a, b)


class HostileSession(VhostUserSession):
    """A reference-device session whose answers pass through `mutator`."""

    mutator: Mutator

    # -- negotiation and config ----------------------------------------------------------
    def _get_features(self, payload: bytes, fds: list[int]) -> bytes:
        offered = self.offered
        m = self.mutator
        if "features_extra" in m.session:  # bits nobody defined: the driver must not take them
            offered |= (1 << 40) | (1 << 50) | (1 << 20)
        if "features_no_version" in m.session:  # a legacy device: must be refused
            offered &= ~(1 << 32)
        if "features_no_notify" in m.session:
            offered &= ~1
        self.offered = offered  # SET_FEATURES is judged against what we said
        return struct.pack("<Q", offered)

    def _get_config(self, payload: bytes, fds: list[int]) -> bytes:
        reply = bytearray(super()._get_config(payload, fds))
        head = 12  # vhost-user config header: offset, size, flags
        offset = struct.unpack_from("<I", reply, 0)[0]
        space = bytearray(self.config.config_space())
        m = self.mutator
        if "config_tag" in m.session:  # 36 bytes, no NUL, not UTF-8
            space[0:36] = b"\xff" * 36
        if "config_queues0" in m.session:
            struct.pack_into("<I", space, 36, 0)
        if "config_queues_many" in m.session:
            struct.pack_into("<I", space, 36, 0xFFFFFFFF)
        if "config_nbs_small" in m.session:
            struct.pack_into("<I", space, 40, 8)
        if "config_nbs_huge" in m.session:
            struct.pack_into("<I", space, 40, 0x7FFFFFFF)
        size = len(reply) - head
        reply[head:] = space[offset : offset + size]
        return bytes(reply)

    # -- replies ---------------------------------------------------------------------------
    def _serve_chain(self, q: DeviceQueue, chain: Chain, hiprio: bool) -> None:
        request = chain.read_all()
        if hiprio and not _is_hiprio_request(request):
            reply = _error_reply(request, 22)
        else:
            reply = self.server.handle(request, chain.writable_len)
        if reply is None:
            q.push(chain, 0)
            return
        m = self.mutator
        m.replies += 1
        opcode, unique = struct.unpack_from("<IQ", request, 4) if len(request) >= 16 else (0, 0)
        m.for_reply(unique, opcode)
        if m.notify_rate and self.notification and m.chance(m.notify_rate):
            self._notify_mischief()
        kind = None
        if m.kinds and m.chance(m.rate):
            kind = m.pick(m.kinds)
        data = bytearray(reply)
        used = None  # (id, len) overrides
        mutation = None
        if kind is not None:
            mutation, used = self._mutate(kind, opcode, unique, data, chain, q.packed)
        if len(data) > chain.writable_len:
            data = data[: chain.writable_len]
        written = chain.write(bytes(data))
        if mutation is not None:
            m.record(mutation)
        if used is None:
            q.push(chain, written)
            return
        self._push_used(q, chain, written, used)

    def _push_used(self, q: DeviceQueue, chain: Chain, written: int, used: tuple) -> None:
        what, value = used
        # a stand-in chain lets DeviceQueue.push write what no honest device would
        # (split or packed ring alike); `entries` keeps a packed ring's position right
        if what == "len":  # any length, even one beyond the writable part
            fake = Chain(chain.head, writable=[memoryview(bytearray(max(value, 0)))],
                         entries=chain.entries)
            q.push(fake, value)
        elif what == "id":
            # a packed ring's ids are 16 bits: keep the id out of range there too (an id
            # in range would complete another request: a withheld answer, not fuzzed)
            ident = q.size + value % (0x10000 - q.size) if q.packed else value
            fake = Chain(ident, writable=[memoryview(bytearray(written))], entries=chain.entries)
            q.push(fake, written)
        elif what == "dup":
            q.push(chain, written)
            q.push(chain, written)
        elif what == "runaway":
            for _ in range(q.size + 1):
                q.push(chain, written)
        flush = getattr(q, "flush", None)
        if flush is not None:  # IN_ORDER batches: the doctored entry goes out on its own
            flush()

    def _mutate(self, kind: str, opcode: int, unique: int, data: bytearray,
                chain: Chain, packed: bool) -> tuple[Mutation | None, tuple | None]:
        m = self.mutator
        mut = Mutation(kind, opcode, unique, REPLY_KINDS[kind])
        error = struct.unpack_from("<i", data, 4)[0] if len(data) >= HDR else 0
        payload = len(data) - HDR
        success = error == 0 and len(data) >= HDR
        if kind == "used_len_over":
            return mut, ("len", chain.writable_len + m.randint(1, 1 << 20))
        if kind == "used_id_range":
            return mut, ("id", m.randint(4096, 0xFFFFFFFF))
        # on a packed ring a second used entry lands on a descriptor the driver may
        # have made available since: that request would be lost (withheld, not fuzzed)
        if kind == "used_id_dup":
            return (None, None) if packed else (mut, ("dup", 0))
        if kind == "used_idx_runaway":
            return (None, None) if packed else (mut, ("runaway", 0))
        if kind == "used_ring_lap":
            return (mut, ("runaway", 0)) if packed else (None, None)
        if kind == "used_len_short":
            return mut, ("len", m.randint(0, min(HDR - 1, chain.writable_len)))
        if kind == "used_len_cut":
            if len(data) <= HDR:
                return None, None
            return mut, ("len", m.randint(HDR, len(data) - 1))
        if kind == "hdr_len_big":
            struct.pack_into("<I", data, 0, len(data) + m.randint(1, 1 << 16))
            return mut, None
        if kind == "hdr_len_small":
            struct.pack_into("<I", data, 0, m.randint(0, HDR - 1))
            return mut, None
        if kind == "hdr_unique":
            struct.pack_into("<Q", data, 8, unique ^ (m.randint(1, 1 << 20) << 1))
            return mut, None
        if kind in ("hdr_error_range", "hdr_error_min", "hdr_error_positive"):
            if kind == "hdr_error_range":
                err = -m.randint(512, 4095)
            elif kind == "hdr_error_min":
                err = -(1 << 31)
            else:
                err = m.randint(2, (1 << 31) - 1)
            del data[HDR:]
            OUT_HEADER.pack_into(data, 0, HDR, err, unique)
            mut.detail = f"error {err}"
            return mut, None
        if kind == "hdr_error_payload":
            err = -m.pick(_VALID_ERRNOS)
            if payload == 0:
                data += b"\0" * 8
            OUT_HEADER.pack_into(data, 0, len(data), err, unique)
            mut.detail = f"error {err} with {len(data) - HDR} bytes"
            return mut, None
        if kind == "err_valid":
            if not success:
                return None, None
            err = -m.pick(_VALID_ERRNOS)
            del data[HDR:]
            OUT_HEADER.pack_into(data, 0, HDR, err, unique)
            mut.detail = f"error {err}"
            return mut, None
        if kind == "lock_wait_refused":
            # once per seed: the program's retry then meets the lock held for nobody
            if opcode != Opcode.SETLKW or error != 1 or any(
                    x.kind == kind for x in m.mutations):
                return None, None
            OUT_HEADER.pack_into(data, 0, HDR, -(1 << 31), unique)
            return mut, None
        if not success:
            return None, None
        if kind.startswith("dirent_"):
            return (mut if self._mutate_dirents(kind, opcode, data) else None), None
        if kind in ("entry_nodeid0", "entry_root"):
            if opcode not in _ENTRY_OPS or payload < ENTRY_SIZE:
                return None, None
            if kind == "entry_root" and opcode == Opcode.LOOKUP:
                return None, None  # LOOKUP of ".." may legitimately answer the root
            struct.pack_into("<Q", data, HDR, 0 if kind == "entry_nodeid0" else 1)
            return mut, None
        if kind in ("attr_mode", "attr_size_huge"):
            if opcode in _ENTRY_OPS and payload >= ENTRY_SIZE:
                base = HDR + ENTRY_ATTR
            elif opcode in _ATTR_OPS and payload >= ATTR_OUT_ATTR + 88:
                base = HDR + ATTR_OUT_ATTR
            else:
                return None, None
            if kind == "attr_mode":
                mode = struct.unpack_from("<I", data, base + ATTR_MODE_OFF)[0]
                bad = m.pick([0, 0o030000, 0o050000, 0o070000, 0o110000, 0o170000])
                struct.pack_into("<I", data, base + ATTR_MODE_OFF, (mode & 0o7777) | bad)
            else:
                huge = m.randint(1 << 63, (1 << 64) - 1)
                struct.pack_into("<Q", data, base + ATTR_SIZE_OFF, huge)
            return mut, None
        if kind.startswith("init_"):
            if opcode != Opcode.INIT or payload < 8:
                return None, None
            if kind == "init_major":
                struct.pack_into("<I", data, HDR, m.pick([0, 6, 8, 0xFFFFFFFF]))
            elif kind == "init_minor":
                struct.pack_into("<I", data, HDR + 4, m.randint(0, abi.MIN_MINOR - 1))
            elif kind == "init_short":
                del data[HDR + m.randint(0, 7):]
                struct.pack_into("<I", data, 0, len(data))
            else:  # max_write at offset 20 of fuse_init_out
                if payload < 24:
                    return None, None
                struct.pack_into("<I", data, HDR + 20, m.pick([0, 1, 0xFFFFFFFF]))
            return mut, None
        if kind == "payload_flip":
            if payload == 0:
                return None, None
            for _ in range(m.randint(1, 4)):
                pos = HDR + m.randint(0, payload - 1)
                data[pos] ^= 1 << m.randint(0, 7)
            return mut, None
        return None, None

    def _mutate_dirents(self, kind: str, opcode: int, data: bytearray) -> bool:
        if opcode not in _DIR_OPS or len(data) <= HDR:
            return False
        plus = opcode == Opcode.READDIRPLUS
        skip = ENTRY_SIZE if plus else 0
        positions = []
        pos = HDR
        while pos + skip + DIRENT.size <= len(data):
            namelen = DIRENT.unpack_from(data, pos + skip)[2]
            positions.append(pos + skip)
            pos += abi.direntplus_size(namelen) if plus else abi.dirent_size(namelen)
        if not positions:
            return False
        m = self.mutator
        if kind == "dirent_off_stuck":
            for p in positions:  # every entry sends the reader back to the start
                struct.pack_into("<Q", data, p + 8, 0)
            return True
        at = m.pick(positions)
        ino, off, namelen, typ = DIRENT.unpack_from(data, at)
        name = at + DIRENT.size
        if kind == "dirent_slash":
            data[name + m.randint(0, namelen - 1)] = ord("/")
        elif kind == "dirent_nul":
            if namelen < 2:
                return False  # a name of one NUL reads as empty to a C parser; still bad
            data[name + m.randint(0, namelen - 1)] = 0
        elif kind == "dirent_empty":
            DIRENT.pack_into(data, at, ino, off, 0, typ)
        elif kind == "dirent_namelen_huge":
            DIRENT.pack_into(data, at, ino, off, m.pick([256, 4096, 0xFFFFFFFF]), typ)
        return True

    # -- notifications ---------------------------------------------------------------------
    def _notify_mischief(self) -> None:
        m = self.mutator
        kind = m.pick(m.notify_kinds)
        if kind == "notify_lock_error":
            return  # applied to the next real lock notification (see _lock_message)
        if kind == "notify_lock_extra":  # a unique nobody waits for
            u = m.randint(1, 1 << 62) * 2
            self._extra(self._lock_bytes(u, 0), Mutation(kind, detectable=False,
                                                        detail=f"unique {u}"))
        elif kind == "notify_flood":
            base = m.randint(100, 1 << 30)
            for i in range(m.flood):
                self._extra(OUT_HEADER.pack(HDR, base + i, 0), None)
            m.record(Mutation(kind, detectable=False, detail=f"{m.flood} codes from {base}"))
        else:
            msg = bytearray(self._lock_bytes(m.randint(1, 1 << 40), 0))
            struct.pack_into("<I", msg, 0, m.pick([0, 8, 15, 4096, 0xFFFFFFFF]))
            self._extra(bytes(msg), Mutation(kind, detectable=False))

    def _extra(self, message: bytes, mutation: Mutation | None) -> None:
        """Queue a whole notification message (not a lock completion) for delivery."""
        with self._pending_mutex:
            self._pending.append((-1, message))  # type: ignore[arg-type]
        if mutation is not None:
            self.mutator.record(mutation)
        self._wake()

    def _lock_bytes(self, unique: int, error: int) -> bytes:
        return super()._lock_message(unique, error)

    def _lock_message(self, unique: int, error: int) -> bytes:
        if unique == -1:  # an extra message queued by _extra: already whole
            return error  # type: ignore[return-value]
        m = self.mutator
        r = m.lock_rng
        if "notify_lock_error" in m.notify_kinds and r.random() < m.notify_rate * 4:
            bad = r.choice([-r.randint(512, 4095), -(1 << 31), r.randint(1, (1 << 31) - 1)])
            m.record(Mutation("notify_lock_error", Opcode.SETLKW, unique, True, f"error {bad}"))
            error = bad
        return super()._lock_message(unique, error)


class HostileDevice(RefDevice):
    """RefDevice whose sessions are HostileSessions sharing one Mutator."""

    def __init__(self, socket_path: str, source_dir: str, mutator: Mutator, **options) -> None:
        self.mutator = mutator
        super().__init__(socket_path, source_dir, session_factory=self._session, **options)

    def _session(self, *args: Any) -> HostileSession:  # RefDevice's SessionFactory
        session = HostileSession(*args)
        session.mutator = self.mutator  # before the session starts
        return session


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)


def honest_mode_types() -> set[int]:
    """File types a real file system can report (fuse_valid_type)."""
    return {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
            stat.S_IFIFO, stat.S_IFSOCK}
