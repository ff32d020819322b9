"""Debian 13's Rust virtiofsd on this Debian 12 machine, from Debian's packages alone.

    python3 -m vfsdrv.tools.virtiofsd_rs [--refresh] [--print-command]

trixie's virtiofsd needs trixie's libc, so it is not installed into the system:
a private apt configuration (its own sources list, state and cache, under
STATE_DIR/apt) downloads `virtiofsd` and the libraries it links against from the
trixie suite of the mirror this machine already uses, `dpkg -x` unpacks them into
STATE_DIR/root, and the daemon runs through that prefix's own loader:

    ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \\
        --library-path ROOT/usr/lib/x86_64-linux-gnu ROOT/usr/libexec/virtiofsd ...

The system's apt sources, lists and dpkg database are never touched. A second run
finds the prefix in place and returns at once (no network); --refresh fetches anew.
STATE_DIR is /var/lib/vfsdrv/trixie, or $VFSDRV_VIRTIOFSD_RS_DIR.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import VfsdrvError

SUITE = "trixie"
#: virtiofsd and the packages of every library it links against (readelf -d:
#: libseccomp.so.2, libcap-ng.so.0, libgcc_s.so.1, libm.so.6 and libc.so.6 with its
#: loader); uidmap, its other dependency, is only for unprivileged sandboxes
PACKAGES = ("virtiofsd", "libc6", "libgcc-s1", "libseccomp2", "libcap-ng0")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
BINARY = "usr/libexec/virtiofsd"
STAMP = ".vfsdrv-packages"
FETCH_COMMAND = "python3 -m vfsdrv.tools.virtiofsd_rs"


def state_dir() -> Path:
    return Path(os.environ.get("VFSDRV_VIRTIOFSD_RS_DIR") or "/var/lib/vfsdrv/trixie")


@dataclass(frozen=True)
class Installed:
    """An unpacked prefix holding virtiofsd and the libraries it runs on."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / BINARY

    @property
    def libdir(self) -> Path:
        # the multiarch directory holding trixie's libc (x86_64-linux-gnu, aarch64-...)
        found = sorted(self.root.glob("usr/lib/*/libc.so.6"))
        if not found:
            raise VfsdrvError(f"{self.root}: no libc.so.6 under usr/lib/*/")
        return found[0].parent

    @property
    def loader(self) -> Path:
        found = sorted(self.libdir.glob("ld-linux*.so.*"))
        if not found:
            raise VfsdrvError(f"{self.libdir}: no ld-linux loader")
        return found[0]

    def argv(self) -> list[str]:
        """The command that starts virtiofsd (its options follow): the prefix's
        loader, so that none of this machine's older libraries is used."""
        return [str(self.loader), "--library-path", str(self.libdir), str(self.binary)]

    def packages(self) -> str:
        return (self.root / STAMP).read_text()


def find(base: Path | None = None) -> Installed | None:
    """The fetched prefix, or None: no network, no apt."""
    root = (base or state_dir()) / "root"
    if (root / STAMP).is_file() and (root / BINARY).is_file():
        return Installed(root)
    return None


def require() -> Installed:
    """The fetched prefix, or an error that says how to get it."""
    found = find()
    if found is None:
        raise VfsdrvError(
            f"the Rust virtiofsd (Debian 13) is not fetched into {state_dir()}; get it (as "
            f"root, from Debian's trixie packages) with: "
            f"{sys.executable} -m vfsdrv.tools.virtiofsd_rs"
        )
    return found


def fetch(base: Path | None = None, *, refresh: bool = False, log=print) -> Installed:
    """Bring virtiofsd and its libraries from trixie into BASE/root (idempotent)."""
    base = base or state_dir()
    base.mkdir(parents=True, exist_ok=True)
    # one fetch at a time: parallel test runs may all start with an empty prefix
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh and (found := find(base)) is not None:
            return found
        if not KEYRING.is_file():
            raise VfsdrvError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
        apt_env = _private_apt(base / "apt")
        log(f"virtiofsd-rs: apt-get update ({SUITE}, private state in {base / 'apt'})")
        _apt(apt_env, "apt-get", "-q", "update")
        debs = base / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir()
        log(f"virtiofsd-rs: apt-get download {' '.join(PACKAGES)}")
        _apt(apt_env, "apt-get", "-q", "download", *PACKAGES, cwd=debs)
        new = base / "root.new"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        files = sorted(debs.glob("*.deb"))
        for deb in files:
            subprocess.run(["dpkg", "-x", str(deb), str(new)], check=True)
        (new / STAMP).write_text("".join(f"{d.name}\n" for d in files))
        installed = Installed(new)
        version = verify(installed)
        # swap in whole: a crash above leaves the previous prefix (or none), never half
        old = base / "root.old"
        shutil.rmtree(old, ignore_errors=True)
        if (base / "root").exists():
            (base / "root").rename(old)
        new.rename(base / "root")
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(debs, ignore_errors=True)
        log(f"virtiofsd-rs: {version} in {base / 'root'}")
        return Installed(base / "root")


def verify(installed: Installed) -> str:
    """Every library virtiofsd loads comes from the prefix; returns its version line."""
    listing = subprocess.run([*installed.argv()[:3], "--list", str(installed.binary)],
                             capture_output=True, text=True)
    if listing.returncode != 0 or "not found" in listing.stdout:
        raise VfsdrvError(f"virtiofsd-rs: libraries missing from the prefix "
                          f"(a package to add to PACKAGES?):\n{listing.stdout}{listing.stderr}")
    root = installed.root.resolve()
    for line in listing.stdout.splitlines():
        path = line.split("=>")[-1].strip().split(" (")[0]
        if path.startswith("/") and not Path(path).resolve().is_relative_to(root):
            raise VfsdrvError(f"virtiofsd-rs would load {path} from the system, not the prefix")
    out = subprocess.run([*installed.argv(), "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise VfsdrvError(f"virtiofsd-rs does not run: {out.stderr.strip()}")
    return out.stdout.strip()


def host_mirror() -> str:
    """The Debian archive this machine's apt uses for its own release (not security):
    the same mirror, another suite. $VFSDRV_DEBIAN_MIRROR overrides it."""
    if os.environ.get("VFSDRV_DEBIAN_MIRROR"):
        return os.environ["VFSDRV_DEBIAN_MIRROR"]
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"')
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)",
                          "Identifier: Packages"], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        uri, _, release = line.partition(" ")
        if release == codename:
            return uri
    raise VfsdrvError(f"no Debian mirror for {codename!r} in this machine's apt sources; "
                      "set VFSDRV_DEBIAN_MIRROR to one")


def _private_apt(apt: Path) -> dict[str, str]:
    """Write the private apt configuration; returns the environment that selects it.
    Only the system's apt.conf.d still applies (proxy settings and the like)."""
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (apt / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {host_mirror()} {SUITE} main\n")
    conf = {
        "Dir::State": apt, "Dir::State::Lists": apt / "lists", "Dir::State::status": apt / "status",
        "Dir::Cache": apt / "cache", "Dir::Etc::sourcelist": apt / "sources.list",
        "Dir::Etc::sourceparts": apt / "sources.list.d",
        "Dir::Etc::preferences": apt / "preferences",
        "Dir::Etc::preferencesparts": apt / "preferences.d",
        "APT::Architecture": arch, "APT::Architectures": arch, "Acquire::Languages": "none",
        # the private directories belong to root: no drop to the _apt user
        "APT::Sandbox::User": "root",
    }
    (apt / "apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in conf.items()))
    return {**os.environ, "APT_CONFIG": str(apt / "apt.conf")}


def _apt(env: dict[str, str], *cmd: str, cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise VfsdrvError(f"{' '.join(cmd)} failed:\n{(res.stdout + res.stderr).strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=FETCH_COMMAND, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refresh", action="store_true", help="fetch again even when present")
    ap.add_argument("--print-command", action="store_true",
                    help="print the command line that starts it and nothing else")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and find() is None:
        print(f"{ap.prog}: run as root (it writes {state_dir()})", file=sys.stderr)
        return 1
    try:
        installed = fetch(refresh=args.refresh, log=(lambda _m: None) if args.print_command
                          else print)
    except VfsdrvError as e:
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 1
    if args.print_command:
        print(shlex.join(installed.argv()))
    else:
        print(f"virtiofsd-rs: ready: {shlex.join(installed.argv())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
