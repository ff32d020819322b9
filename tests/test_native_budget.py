"""An instruction budget for the native request path: a fixed workload
(tests/native/budget.c: GETATTR requests through vfsdrv_reply_capacity, the slot
layout, vfsdrv_vq_add, one publish per batch, vfsdrv_vq_harvest and
vfsdrv_check_reply against an in-memory device, the pump's per-request work minus
its syscalls) counted with valgrind's callgrind, only the driver's functions
(--toggle-collect='driver_*'), divided per request and compared with the budget
below. Instruction counts repeat exactly from run to run on a shared machine;
wall-clock times do not, so no timing is a test.

The budgets are ~25% above what Debian 12's gcc 12 (with Python's CFLAGS, as
cffi builds vfsdrv._native) gave when they were set: a change that makes the
request path that much heavier fails here and prints the figure. When a change
makes it lighter, lower the budget."""

from __future__ import annotations

import re
import shlex
import subprocess
import sysconfig
from pathlib import Path

import pytest
from test_native_aarch64 import require_tools

NATIVE_TESTS = Path(__file__).resolve().parent / "native"
REQUESTS = 20000

# (ring layout, requests per publish/harvest) -> instructions per request
# measured 2026-12-01 at commit 282bc71: split 515.0 / 363.2, packed 671.1 / 452.7
BUDGET = {("split", 1): 645, ("split", 16): 455,
          ("packed", 1): 840, ("packed", 16): 565}


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools({"valgrind": "valgrind", "cc": "gcc"})
    out = tmp_path_factory.mktemp("budget")
    # the flags Python gives cffi's compiler (driver/_native_build.py adds its own)
    pyflags = shlex.split(sysconfig.get_config_var("CFLAGS") or "")
    proc = subprocess.run(["bash", str(NATIVE_TESTS / "build.sh"), "cc", str(out), *pyflags],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "budget"


def instructions(workload: Path, layout: str, depth: int, requests: int,
                 tmp_path: Path) -> int:
    cg = tmp_path / f"callgrind.{layout}.{depth}.{requests}"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--toggle-collect=driver_*",
         f"--callgrind-out-file={cg}", str(workload), layout, str(depth), str(requests)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{requests} valid replies, 0 bad" in proc.stdout, proc.stdout
    m = re.search(r"^totals: (\d+)", cg.read_text(), re.MULTILINE)
    assert m, f"no totals in {cg}"
    return int(m.group(1))


@pytest.mark.parametrize("layout,depth", sorted(BUDGET))
def test_instructions_per_request_within_budget(workload: Path, tmp_path: Path, layout: str,
                                                depth: int, capsys: pytest.CaptureFixture[str],
                                                ) -> None:
    total = instructions(workload, layout, depth, REQUESTS, tmp_path)
    per_request = total / REQUESTS
    budget = BUDGET[(layout, depth)]
    with capsys.disabled():  # the figure shows in every run, not only with -s
        print(f"\n{layout} ring, {depth} per publish: {per_request:.1f} instructions per "
              f"request (budget {budget})")
    # the count is the driver's own: nothing counted would pass any budget
    assert per_request > 100, f"only {per_request:.1f} instructions counted: toggle broken?"
    assert per_request <= budget, (
        f"{layout} ring, {depth} per publish: {per_request:.1f} instructions per request "
        f"exceeds the budget of {budget}")


def test_the_count_is_per_request_and_repeatable(workload: Path, tmp_path: Path) -> None:
    """Twice the requests, twice the instructions (no fixed cost hides in the
    figure), and the same run counts the same."""
    a = instructions(workload, "split", 16, 4000, tmp_path)
    b = instructions(workload, "split", 16, 8000, tmp_path)
    again = instructions(workload, "split", 16, 4000, tmp_path)
    assert again == a
    assert abs(b - 2 * a) <= 0.01 * a, (a, b)
