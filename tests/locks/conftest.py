"""The lock suite runs once per virtqueue layout: `ring_layout` forces split or packed
rings on every reference device (and mount) a test starts (issue 12 item 1)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import two_mounts
from two_mounts import lockers, pair  # noqa: F401 - fixtures


@pytest.fixture(autouse=True, params=["split", "packed"])
def ring_layout(request) -> Iterator[str]:
    two_mounts.ring_layout = request.param
    yield request.param
    two_mounts.ring_layout = None


@pytest.fixture
def device_factory(device_factory, ring_layout: str):
    """The in-process reference device (tests/conftest.py) with the layout forced."""
    return functools.partial(device_factory, ring=ring_layout)
