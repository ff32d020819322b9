"""The vfsdrv mount over VFIO next to the kernel's own virtiofs, in one QEMU guest.

One guest boot (tests/vm/harness.py: Debian's 6.1 kernel under TCG, QEMU's
vhost-user-fs-pci, one virtiofsd for the whole run). In the guest, on the same
device and the same virtiofsd:

  (b) the kernel's virtiofs: `mount -t virtiofs myfs /mnt/k`, the workloads, umount;
  (a) vfsdrv: `vfsdrv mount --tag myfs /mnt/v` (relay frontend; the command binds the
      function to vfio-pci itself), the same workloads, `vfsdrv umount`.

Workloads (benchmarks/guest_workload.py), each on a fresh directory of the export:
1 MiB sequential write (then fsync) and read (page cache dropped first) of a SIZE
file, 4 KiB random O_DIRECT reads for S seconds, create / stat / unlink of N files.
Printed side by side with ratios vfsdrv / kernel (1.0 = as fast as the kernel's
driver; above 1 is faster). Everything is under TCG emulation, so the absolute
figures say little about real hardware; the ratios compare two drivers on the same
emulated machine.

    .venv/bin/python benchmarks/guest_mount_bench.py [--mode type1|noiommu]
        [--size-mib 64] [--files 10000] [--seconds 5] [--frontend relay|pyfuse3]

Needs what the guest tests need (tools/setup-env.sh; root). With the defaults one run
takes ~7 minutes under TCG on 2 cores (most of it the vfsdrv side of the 10,000 files).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "vm"))

GUEST_SCRIPT = r"""
drv() { basename "$(readlink "/sys/bus/pci/devices/$1/driver")"; }
modprobe virtiofs
mkdir -p /mnt/k /mnt/v
echo "== (b) kernel virtiofs, driver $(drv $VFSDRV_VM_BDF)"
mount -t virtiofs myfs /mnt/k
@PY@ @WORKLOAD@ kernel /mnt/k/kernel @ARGS@
umount /mnt/k
[ "$VFSDRV_VM_MODE" = noiommu ] && echo 0 > /proc/sys/vm/compact_unevictable_allowed
echo "== (a) vfsdrv mount --tag myfs (--frontend @FRONTEND@)"
vfsdrv mount --tag myfs --frontend @FRONTEND@ /mnt/v
echo "   driver $(drv $VFSDRV_VM_BDF), $(grep ' /mnt/v ' /proc/mounts)"
rc=0
@PY@ @WORKLOAD@ vfsdrv /mnt/v/vfsdrv @ARGS@ || rc=$?
vfsdrv umount /mnt/v
for _ in $(seq 300); do [ "$(drv $VFSDRV_VM_BDF)" = virtio-pci ] && break; sleep 0.2; done
echo "== after umount: driver $(drv $VFSDRV_VM_BDF)"
exit $rc
"""

ROWS = [
    ("seq_write", "1 MiB sequential write", "MiB/s"),
    ("seq_read", "1 MiB sequential read", "MiB/s"),
    ("rand_read", "4 KiB random read (O_DIRECT)", "ops/s"),
    ("create", "create {n:,} files", "ops/s"),
    ("stat", "stat {n:,} files", "ops/s"),
    ("unlink", "unlink {n:,} files", "ops/s"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["type1", "noiommu"], default="type1",
                    help="VFIO mode of the vfsdrv side (type1: emulated Intel IOMMU)")
    ap.add_argument("--size-mib", type=int, default=64, help="sequential file size")
    ap.add_argument("--files", type=int, default=10_000, help="files to create/stat/unlink")
    ap.add_argument("--seconds", type=float, default=5.0, help="random read duration")
    ap.add_argument("--frontend", choices=["relay", "pyfuse3"], default="relay")
    ap.add_argument("--timeout", type=float, default=3000, help="for the whole guest run")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream the guest's output")
    a = ap.parse_args(argv)

    from harness import GUEST_PYTHON, GuestError, run_in_guest

    args = f"--size-mib {a.size_mib} --files {a.files} --seconds {a.seconds}"
    script = GUEST_SCRIPT
    for key, value in (("@PY@", shlex.quote(str(GUEST_PYTHON))), ("@ARGS@", args),
                       ("@WORKLOAD@", shlex.quote(str(HERE / "guest_workload.py"))),
                       ("@FRONTEND@", a.frontend)):
        script = script.replace(key, value)
    with tempfile.TemporaryDirectory(prefix="vfsdrv-guest-bench-") as export:
        try:
            r = run_in_guest(script, iommu=a.mode == "type1", noiommu=a.mode == "noiommu",
                             kernel_args=("no_timer_check",) if a.mode == "type1" else (),
                             fs_dir=Path(export), timeout=a.timeout,
                             stream=sys.stderr if a.verbose else None)
        except GuestError as e:
            print(f"the guest could not be run: {e}", file=sys.stderr)
            return 1
    results = {}
    for line in r.output.splitlines():
        if line.startswith("RESULT "):
            _, label, data = line.split(" ", 2)
            results[label] = json.loads(data)
    if r.returncode != 0 or set(results) != {"kernel", "vfsdrv"}:
        print(f"guest run failed (exit {r.returncode}):\n{r.output}", file=sys.stderr)
        return 1
    k, v = results["kernel"], results["vfsdrv"]
    print(f"one guest ({a.mode}, TCG, boot {r.boot_time}s, run {r.duration:.0f}s), one "
          f"virtiofsd: (a) vfsdrv mount --frontend {a.frontend} over VFIO vs (b) the "
          f"kernel's virtiofs; file {a.size_mib} MiB, N = {a.files:,}")
    print(f"{'workload':<32} {'unit':<6} {'vfsdrv':>10} {'kernel':>10} {'ratio':>7}")
    for key, name, unit in ROWS:
        print(f"{name.format(n=a.files):<32} {unit:<6} {v[key]:>10,.1f} {k[key]:>10,.1f} "
              f"{v[key] / k[key]:>7.3f}")
    print(f"workload time in the guest: vfsdrv {v['elapsed']:.0f}s, kernel {k['elapsed']:.0f}s")
    for line in r.output.splitlines():
        if line.startswith("== "):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
