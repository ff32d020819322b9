"""The relay's control plane takes the pumps' events in order, and an INTERRUPT that
looks for its SETLKW sees the events queued behind it (vfsdrv.frontends.relay,
Relay._take_events). The kernel sends one INTERRUPT per request: when the pump
queued it just before the SETLKW's "wait" reply, the relay must still find the
SETLKW parked and pass the INTERRUPT on, or the program waits in fcntl for the lock
with its signal unhandled."""

from __future__ import annotations

import collections
import struct

from vfsdrv._native import lib
from vfsdrv.frontends.relay import Relay
from vfsdrv.fs.abi import Opcode

IN_HEADER = struct.Struct("<IIQQIIIHH")
SETLKW_UNIQUE, INTERRUPT_UNIQUE = 34, 35


class FakePump:
    """What the relay asks of a pump here: its queued events, a lent request's bytes."""

    def __init__(self, events: list[tuple]) -> None:
        self._events = events
        self.given: list[int] = []

    def events(self) -> list[tuple]:
        out, self._events = self._events, []
        return out

    def request_bytes(self, slot: int) -> bytes:
        body = struct.pack("<Q", SETLKW_UNIQUE)  # fuse_interrupt_in: the target
        return IN_HEADER.pack(IN_HEADER.size + len(body), Opcode.INTERRUPT, INTERRUPT_UNIQUE,
                              0, 0, 0, 0, 0, 0) + body

    def give(self, slot: int, forward: bool = False) -> None:
        self.given.append(slot)

    def has_setlkw(self, unique: int) -> bool:
        return False  # its slot is already free: the "wait" reply was harvested


class FakeFs:
    def __init__(self) -> None:
        self.parked: set[int] = set()
        self.hiprio: list[bytes] = []
        self.stats: collections.Counter = collections.Counter()

    def park_lock(self, unique: int, opcode: int, on_done) -> None:
        self.parked.add(unique)

    def is_lock_waiter(self, unique: int) -> bool:
        return unique in self.parked

    def send_hiprio(self, data: bytes) -> None:
        self.hiprio.append(data)


def _event(kind: int, slot: int, unique: int, opcode: int) -> tuple:
    return (kind, slot, unique, opcode, 7, 0, "", 0)


def test_an_interrupt_queued_before_its_setlkws_wait_reply_is_passed_on() -> None:
    pump = FakePump([_event(lib.VFSDRV_EV_REQUEST, 3, INTERRUPT_UNIQUE, Opcode.INTERRUPT),
                     _event(lib.VFSDRV_EV_LOCK_WAIT, 1, SETLKW_UNIQUE, Opcode.SETLKW)])
    relay = Relay.__new__(Relay)
    relay.pumps = [pump]
    relay.fs = FakeFs()
    relay.debug = False
    relay.stats = collections.Counter()
    relay._interrupted = {}
    relay._events = collections.deque()
    relay._take_events()
    assert relay.fs.parked == {SETLKW_UNIQUE}
    assert relay.stats["interrupts_ignored"] == 0
    assert [IN_HEADER.unpack_from(d)[1] for d in relay.fs.hiprio] == [Opcode.INTERRUPT]
    assert SETLKW_UNIQUE in relay._interrupted  # answered EINTR after the grace if need be
    assert pump.given == [3]  # the INTERRUPT's slot went back once
    assert not relay._events
