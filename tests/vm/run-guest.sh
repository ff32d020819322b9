#!/bin/bash
# run-guest.sh [OPTIONS] 'SCRIPT' -- run SCRIPT (bash -e -o pipefail, as root) in
# a throw-away QEMU guest with a virtio-fs PCI function and exit with its status
# (125: the guest could not be run). Options: run-guest.sh --help. This is the
# command line of harness.py (the Python API the tests use).
#   tests/vm/run-guest.sh 'uname -r; vfsdrv_virtiofs_bdfs'
#   tests/vm/run-guest.sh --iommu --bind-vfio 'vfsdrv_vfio_group $VFSDRV_VM_BDF'
HERE=$(dirname "$(readlink -f "$0")")
PY=$HERE/../../.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" "$HERE/harness.py" "$@"
