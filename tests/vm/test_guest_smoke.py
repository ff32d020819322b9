"""Smoke tests of the QEMU guest harness: each one boots a real guest (TCG, ~8 s).

They check what later guest tests rely on: commands run and their status and
output come back, the virtio-fs PCI function is there, vfio-pci gives type1 and
no-IOMMU groups, and the device really serves a file system to the guest kernel.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest
from harness import FsDevice, GuestResult, GuestSetupError, GuestTimeout

Guest = Callable[..., GuestResult]


def test_command_runs_and_status_and_output_come_back(guest: Guest, tmp_path: Path) -> None:
    host_only = tmp_path / "guest-writes-stay-in-the-guest"
    r = guest(f"""
        echo "kernel $(uname -r)"
        echo to-stderr >&2
        echo to-stdout
        head -c 300000 /dev/zero | tr '\\0' x; echo
        echo written > {host_only}       # the overlay: not visible on the host
        cat {host_only}
        exit 7
    """)
    assert r.returncode == 7, r
    kver = next((harness.prepare_kernel().kroot / "lib/modules").iterdir()).name
    assert f"kernel {kver}\n" in r.output  # the guest's kernel, not the host's
    assert r.output.index("to-stderr") < r.output.index("to-stdout")  # one stream, in order
    assert "x" * 300000 + "\n" in r.output  # large output arrives whole
    assert "written\n" in r.output
    assert not host_only.exists()
    assert r.boot_time is not None and 0 < r.boot_time < r.duration
    assert "Linux version" in r.dmesg and "Command line:" in r.dmesg
    assert "guest exit status 7" in str(r) and "guest dmesg" in str(r)


def test_script_stops_at_first_failure(guest: Guest) -> None:
    r = guest("echo before\nfalse\necho not-reached\n")
    assert r.returncode == 1, r
    assert "before" in r.output and "not-reached" not in r.output


def test_venv_python_and_environment(guest: Guest, tmp_path: Path) -> None:
    r = guest(
        'echo "cwd=$PWD"\n'
        'python -c "import sys, vfsdrv; print(\'prefix=\' + sys.prefix)"\n'
        '"$VFSDRV_PYTHON" -c "import os; print(\'mine=\' + os.environ[\'MINE\'])"\n'
        'echo "bdf=$VFSDRV_VM_BDF mode=$VFSDRV_VM_MODE"\n'
        f"echo from-guest > {tmp_path}/result\n",
        env={"MINE": "a b'c"}, cwd=tmp_path, rw_dirs=[tmp_path])
    assert r.returncode == 0, r
    assert f"cwd={tmp_path}\n" in r.output
    assert f"prefix={harness.REPO / '.venv'}\n" in r.output
    assert "mine=a b'c\n" in r.output
    assert f"bdf={harness.fs_bdf(0)} mode=plain\n" in r.output
    assert (tmp_path / "result").read_text() == "from-guest\n"  # rw_dirs reach the host


def _sysfs_config(r: GuestResult) -> list[dict[str, object]]:
    return [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]


def test_virtiofs_functions_in_sysfs(guest: Guest) -> None:
    r = guest("""
        for p in /sys/bus/pci/devices/*; do
            echo "fn ${p##*/} $(cat $p/vendor):$(cat $p/device) $(cat $p/class)" \
                "$(basename "$(readlink $p/driver)")"
        done
        for d in $(vfsdrv_virtiofs_bdfs); do python tests/vm/virtiofs_sysfs_config.py $d; done
    """, fs_devices=[FsDevice(), FsDevice(tag="second")])
    assert r.returncode == 0, r
    fns = [line.split()[1:] for line in r.output.splitlines()
           if line.startswith("fn ") and "0x1af4:0x105a" in line]
    assert fns == [[harness.fs_bdf(0), "0x1af4:0x105a", "0x018000", "virtio-pci"],
                   [harness.fs_bdf(1), "0x1af4:0x105a", "0x018000", "virtio-pci"]], r
    cfgs = _sysfs_config(r)
    assert [(c["tag"], c["num_request_queues"]) for c in cfgs] == [("myfs", 1), ("second", 1)]


def test_vfio_type1_group(guest: Guest) -> None:
    r = guest("""
        g=$(vfsdrv_vfio_group $VFSDRV_VM_BDF)
        echo "group=$g"
        test -c "$g"
        echo "driver=$(basename $(readlink /sys/bus/pci/devices/$VFSDRV_VM_BDF/driver))"
        echo "iommus=$(ls /sys/class/iommu)"
        echo "noiommu=$(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode)"
    """, iommu=True, bind_vfio=True)
    assert r.returncode == 0, r
    assert re.search(r"^group=/dev/vfio/\d+$", r.output, re.M), r
    assert "driver=vfio-pci\n" in r.output
    assert re.search(r"^iommus=dmar\d", r.output, re.M), r
    assert "noiommu=N\n" in r.output


def test_vfio_noiommu_group(guest: Guest) -> None:
    r = guest("""
        [ -z "$(ls /sys/class/iommu)" ] || { echo "unexpected IOMMU"; exit 1; }
        vfsdrv_vfio_bind $VFSDRV_VM_BDF
        g=$(vfsdrv_vfio_group $VFSDRV_VM_BDF)
        echo "group=$g"
        test -c "$g"
    """, noiommu=True)
    assert r.returncode == 0, r
    assert re.search(r"^group=/dev/vfio/noiommu-\d+$", r.output, re.M), r


def test_kernel_virtiofs_mount_reads_host_file(guest: Guest, tmp_path: Path) -> None:
    token = os.urandom(8).hex()
    (tmp_path / "hello.txt").write_text(f"hello {token}\n")
    r = guest("""
        modprobe virtiofs
        mount -t virtiofs myfs /mnt
        cat /mnt/hello.txt
        echo "from the guest" > /mnt/back.txt
        umount /mnt
    """, fs_dir=tmp_path)
    assert r.returncode == 0, r
    assert f"hello {token}\n" in r.output
    assert (tmp_path / "back.txt").read_text() == "from the guest\n"


@pytest.fixture
def own_virtiofsd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A virtiofsd we start ourselves, standing in for a project backend: (socket, dir)."""
    export, sock = tmp_path / "export", tmp_path / "backend.sock"
    export.mkdir()
    p = subprocess.Popen([harness.virtiofsd_binary(), f"--socket-path={sock}",
                          "-o", f"source={export}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not harness.is_listening(sock):  # bound is not enough: QEMU connects at once
            assert p.poll() is None and time.monotonic() < deadline, "virtiofsd did not start"
            time.sleep(0.02)
        yield sock, export
    finally:
        p.terminate()
        p.wait(5)


def test_external_vhost_user_backend(guest: Guest, own_virtiofsd: tuple[Path, Path]) -> None:
    sock, export = own_virtiofsd
    (export / "x").write_text("served by the caller's backend\n")
    r = guest("modprobe virtiofs && mount -t virtiofs ext /mnt && cat /mnt/x",
              fs_devices=[FsDevice(tag="ext", socket=sock)])
    assert r.returncode == 0, r
    assert "served by the caller's backend\n" in r.output
    assert r.backend_logs == {}  # the harness started no virtiofsd of its own


def test_missing_backend_socket_is_an_error(guest: Guest, tmp_path: Path) -> None:
    with pytest.raises(harness.GuestError, match="does not exist"):
        guest("true", vhost_user_socket=tmp_path / "nobody.sock")
    with socket.socket(socket.AF_UNIX) as s:  # bound, not listening
        s.bind(str(tmp_path / "bound.sock"))
        with pytest.raises(harness.GuestError, match="nobody listens"):
            guest("true", vhost_user_socket=tmp_path / "bound.sock")


def test_timeout_raises_with_partial_output(guest: Guest) -> None:
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as e:
        guest("echo started; sleep 600", timeout=20)
    assert time.monotonic() - t0 < 30
    assert "started" in e.value.output


def test_missing_qemu_fails_clearly(vm_kernel: harness.Kernel,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFSDRV_VM_QEMU", "qemu-system-nonexistent")
    with pytest.raises(GuestSetupError, match="qemu-system-nonexistent not found"):
        harness.run_in_guest("true")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        harness.run_in_guest("true", iommu=True, noiommu=True)
    with pytest.raises(ValueError):
        harness.run_in_guest("true", bind_vfio=True)
    with pytest.raises(ValueError):
        harness.run_in_guest("true", fs_devices=[FsDevice(), FsDevice()])
    with pytest.raises(ValueError, match="one request queue"):  # QEMU 7.2's virtiofsd
        harness.run_in_guest("true", num_request_queues=2)
