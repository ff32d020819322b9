"""A relay mount over the emulated virtio-pci function (vhost_pci_bridge.py), in its
own process, for the tests of a device that breaks (DEVICE_NEEDS_RESET).

    python tests/fakes/bridge_mount.py SOCKET MOUNTPOINT [--poll] [--iommu]

The driver's real `VirtioPciTransport` + `VirtioFs` + `Relay` (native pumps)
serve MOUNTPOINT; the function forwards to the vhost-user device at SOCKET (the
reference device: QEMU's role). Like `vfsdrv mount -f`, but over the emulated
function, which `vfsdrv mount` cannot open (it wants a real BDF).

Commands on stdin, one a line, each answered on stdout once done:
    device-error   the function breaks as QEMU's virtio_error() does: rings stopped,
                   DEVICE_NEEDS_RESET set, configuration change interrupt
It prints "READY" once the mount is usable. Exit status: 0 when unmounted, 3 when
the relay ended because the device failed; the log (stderr) says why.
`BridgeMount` runs it for a test.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fakes, test_pci_transport

from mounting import force_unmount, wait_mounted  # noqa: E402
from vfsdrv.frontends.relay import Relay  # noqa: E402
from vfsdrv.fs.device import VirtioFs  # noqa: E402
from vfsdrv.virtio import pci as vp  # noqa: E402

from fakes.vhost_pci_bridge import VhostPciFunction  # noqa: E402


class BridgeMount:
    """For the tests: this script serving `mnt` over the bridge to `sock`."""

    def __init__(self, sock: Path, mnt: Path, log: Path, *extra: str) -> None:
        self.mnt, self.log = mnt, log
        with open(log, "wb") as lf:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(sock), str(mnt), *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lf, text=True)
        wait_mounted(mnt, self.proc, log)

    def device_error(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("device-error\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.strip() == "done device-error":
                return
        raise AssertionError(f"bridge_mount gone:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        force_unmount(self.mnt)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("mountpoint")
    p.add_argument("--poll", action="store_true")
    p.add_argument("--iommu", action="store_true",
                   help="the function behind a vIOMMU: ACCESS_PLATFORM passed on, IOVA DMA")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fn = VhostPciFunction(args.socket, iommu=args.iommu)
    t = vp.VirtioPciTransport(fn, poll=args.poll, device_id=vp.VIRTIO_ID_FS)
    fs = VirtioFs(t, poll=args.poll).start()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "device-error":
                fn.device_error()
                print("done device-error", flush=True)

    threading.Thread(target=commands, daemon=True).start()
    relay = Relay(fs, args.mountpoint, options=[], source=f"bridge:{args.socket}",
                  ready=lambda: print("READY", flush=True))
    try:
        relay.run()
    except Exception as exc:  # noqa: BLE001 - the exit status says it
        logging.getLogger("bridge_mount").error("relay ended: %s", exc)
        return 3
    finally:
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
