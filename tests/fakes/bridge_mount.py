"""A relay mount over the emulated virtio-pci function (vhost_pci_bridge.py), in its
own process, for the tests of a device that breaks (DEVICE_NEEDS_RESET).

    python tests/fakes/bridge_mount.py SOCKET MOUNTPOINT [--poll]

The driver's real `VirtioPciTransport` + `VirtioFs` + `Relay` (native pumps)
serve MOUNTPOINT; the function forwards to the vhost-user device at SOCKET (the
reference device: QEMU's role). Like `vfsdrv mount -f`, but over the emulated
function, which `vfsdrv mount` cannot open (it wants a real BDF).

Commands on stdin, one a line, each answered on stdout once done:
    device-error   the function breaks as QEMU's virtio_error() does: rings stopped,
                   DEVICE_NEEDS_RESET set, configuration change interrupt
It prints "READY" once the mount is usable. Exit status: 0 when unmounted, 3 when
the relay ended because the device failed; the log (stderr) says why.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fakes, test_pci_transport

from vfsdrv.frontends.relay import Relay  # noqa: E402
from vfsdrv.fs.device import VirtioFs  # noqa: E402
from vfsdrv.virtio import pci as vp  # noqa: E402

from fakes.vhost_pci_bridge import VhostPciFunction  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("mountpoint")
    p.add_argument("--poll", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fn = VhostPciFunction(args.socket)
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
