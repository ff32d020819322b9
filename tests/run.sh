#!/usr/bin/env bash
# Run the whole test suite on a Debian 12 machine, as root: installs what it needs
# (apt packages, ./.venv, the package), lints, then runs pytest, QEMU guest tests
# included. Extra arguments go to pytest (e.g. -m "not vm" to skip the guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh --tests
.venv/bin/python -m vfsdrv.tools.virtiofsd_rs  # Debian 13's Rust virtiofsd, the second real device (private prefix)
# hostile-device fuzzer (issue 10 item 19, tests/test_fuzz_hostile.py): clang's libFuzzer
# runtime makes tests/fuzz/fuzz_core.c coverage-guided (without it: random inputs)
dpkg -s clang libclang-rt-14-dev >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends clang libclang-rt-14-dev
echo "== ruff"
.venv/bin/ruff check .
echo "== pytest"
exec .venv/bin/pytest "$@"
