"""pytest glue for the QEMU guest tests: every test in tests/vm is marked ``vm``
(deselect with ``-m "not vm"``), and the guest kernel is prepared once per session.

Tests either import the API (``from harness import run_in_guest, FsDevice``) or use
the ``guest`` fixture, which is ``harness.run_in_guest`` after the kernel is ready.
A host that cannot run guests makes these tests fail (not skip), with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `import harness`, whatever pytest's import mode
    sys.path.insert(0, str(_HERE))

import harness  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_kernel() -> harness.Kernel:
    """The prepared guest kernel (done once, then cached across sessions)."""
    try:
        harness.qemu_binary()
        harness.virtiofsd_binary()
        return harness.prepare_kernel()
    except harness.GuestSetupError as e:
        pytest.fail(f"this host cannot run the QEMU guest tests: {e}", pytrace=False)


@pytest.fixture(scope="session")
def vm_kernel_backports() -> harness.Kernel:
    """The backports guest kernel (6.12 on Debian 12: iommufd and VFIO device cdevs, built
    by prepare-kernel.sh), prepared once outside any test's timeout, then cached."""
    try:
        return harness.prepare_kernel(kernel="backports")
    except harness.GuestSetupError as e:
        pytest.fail(f"this host cannot prepare the backports guest kernel: {e}", pytrace=False)


@pytest.fixture
def guest(vm_kernel: harness.Kernel) -> Callable[..., harness.GuestResult]:
    """``harness.run_in_guest``, with the kernel prepared outside the test's timeout."""
    return harness.run_in_guest
