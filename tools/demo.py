"""`vfsdrv demo`: the driver end to end on the embedded default, no VM.

Starts Debian's virtiofsd on a temporary directory, brings the device up over
vhost-user through vfsdrv (features, queues, FUSE_INIT) and drives it with the
typed client: list, read, write, rename, xattr. Then mounts a second virtiofsd
instance of the same directory with `vfsdrv mount` (the relay frontend) and lets
ordinary programs (ls, cat, cp, sha256sum, df) use it, checks every result on the
host side, and unmounts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..fs.client import ROOT_ID, FuseClient
from ..fs.config import encode_config
from ..fs.device import VirtioFs
from ..virtio.constants import feature_names
from ..virtio.vhost_user import VhostUserTransport
from .backends import BACKENDS, DEFAULT_BACKEND, Backend, check_available


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="drive a local virtiofsd through vfsdrv and show it working",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="the device: Debian 12's C virtiofsd (default), Debian 13's Rust "
                   "virtiofsd (fetched by: python3 -m vfsdrv.tools.virtiofsd_rs) or the "
                   "reference device")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        from ..errors import VfsdrvError

        raise VfsdrvError("demo needs root: the backend writes its pid file under /run and "
                          "the mount needs /dev/fuse (run it with sudo)")
    work = Path(tempfile.mkdtemp(prefix="vfsdrv-demo-"))
    try:
        return _demo(args, work)
    finally:  # Ctrl-C and failures too: no temporary directory left behind
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _demo(args: argparse.Namespace, work: Path) -> int:
    check_available(args.backend)  # before anything is created: says how to get it
    src = work / "export"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host\n")
    (src / "data.bin").write_bytes(os.urandom(3 << 20))
    (src / "docs").mkdir()
    step = _Printer()
    with Backend(args.backend, src, work / "backend.sock", tag="demo") as backend:
        step(f"{backend.name} (pid {backend.proc.pid}) exports {src}")
        transport = VhostUserTransport(str(backend.socket_path),
                                       config=encode_config("demo", 1), num_queues=2)
        fs = VirtioFs(transport).start()
        try:
            step(f"device up over {transport.name}: features "
                 f"{feature_names(fs.dev.features, {30: 'VHOST_USER_PROTOCOL_FEATURES'})}; "
                 f"tag {fs.config.tag!r}; "
                 f"{len(fs.request_queues)} request queue(s) of {fs.request_queues[0].vq.size}")
            c = FuseClient(fs)
            out = c.init()
            step(f"FUSE_INIT: protocol 7.{fs.minor}, max_write {fs.max_write}, "
                 f"flags {out.flags:#x}")
            names = sorted(d.name.decode() for d in c.readdir_all(ROOT_ID)
                           if d.name not in (b".", b".."))
            step(f"readdir /: {names}")
            e = c.lookup(ROOT_ID, "hello.txt")
            h = c.open(e.nodeid)
            text = c.read(e.nodeid, h.fh, 0, 4096)
            c.release(e.nodeid, h.fh)
            step(f"read hello.txt: {text!r}")
            big = c.lookup(ROOT_ID, "data.bin")
            h = c.open(big.nodeid)
            t0 = time.perf_counter()
            digest = hashlib.sha256()
            off = 0
            while chunk := c.read(big.nodeid, h.fh, off, 1 << 20):
                digest.update(chunk)
                off += len(chunk)
            dt = time.perf_counter() - t0
            c.release(big.nodeid, h.fh)
            same = digest.hexdigest() == hashlib.sha256((src / "data.bin").read_bytes()).hexdigest()
            step(f"read data.bin: {off} bytes in {dt * 1e3:.1f} ms, sha256 matches host: {same}")
            docs = c.lookup(ROOT_ID, "docs")
            ne, nh = c.create(docs.nodeid, "note.txt", 0o644)
            c.write(ne.nodeid, nh.fh, 0, b"written through vfsdrv\n")
            c.release(ne.nodeid, nh.fh)
            c.setxattr(ne.nodeid, "user.origin", b"vfsdrv")
            c.lookup(docs.nodeid, "note.txt")
            c.rename(docs.nodeid, "note.txt", ROOT_ID, "note.txt")
            host_text = (src / "note.txt").read_text()
            step(f"created docs/note.txt, renamed to /note.txt; host sees {host_text!r} "
                 f"with user.origin={os.getxattr(src / 'note.txt', 'user.origin')!r}")
            st = c.statfs()
            step(f"statfs: {st.blocks * st.frsize >> 20} MiB, {st.bavail * st.frsize >> 20} MiB "
                 "available")
            c.destroy()
            ok = same and host_text == "written through vfsdrv\n"
        finally:
            fs.close()
    with Backend(args.backend, src, work / "backend-mount.sock", tag="demo") as backend:
        ok = _mounted_part(step, src, work, backend.socket_path) and ok
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def _run(step: _Printer, *cmd: str) -> str:
    # each command in a session of its own: Ctrl-C reaches the demo alone, which then
    # stops them and takes everything down in order (unmount, then the backend)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         start_new_session=True).stdout
    step("\n".join([f"$ {' '.join(cmd)}", *(f"          {line}" for line in out.splitlines())]))
    return out


def _mounted_part(step: _Printer, src: Path, work: Path, sock: Path) -> bool:
    """The same directory as a real mount: ordinary programs through the relay."""
    mnt = work / "mnt"
    mnt.mkdir()
    vfsdrv = [sys.executable, "-m", "vfsdrv.tools.cli"]
    try:  # the mount may be up even when this is interrupted: the finally unmounts
        subprocess.run([*vfsdrv, "mount", "--vhost-user", str(sock), "--tag", "demo",
                        str(mnt)], check=True, start_new_session=True)
        _run(step, "findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", str(mnt))
        _run(step, "ls", "-l", str(mnt))
        _run(step, "cat", str(mnt / "hello.txt"))
        (work / "upload.bin").write_bytes(os.urandom(5 << 20))
        _run(step, "cp", str(work / "upload.bin"), str(mnt / "upload.bin"))
        sums = _run(step, "sha256sum", str(mnt / "upload.bin"), str(mnt / "data.bin"))
        host = [hashlib.sha256((src / n).read_bytes()).hexdigest() for n in
                ("upload.bin", "data.bin")]
        same = [line.split()[0] for line in sums.splitlines()] == host
        step(f"checksums through the mount match the host's files: {same}")
        _run(step, "df", "-h", str(mnt))
    finally:
        if str(mnt) in Path("/proc/self/mounts").read_text():
            subprocess.run([*vfsdrv, "umount", str(mnt)], check=False, timeout=60,
                           start_new_session=True)
    mounted = str(mnt) in Path("/proc/self/mounts").read_text()
    step(f"unmounted: {not mounted}")
    return same and not mounted


class _Printer:
    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.n += 1
        print(f"[{self.n:2d}] {time.perf_counter() - self.t0:6.3f}s  {msg}", flush=True)
