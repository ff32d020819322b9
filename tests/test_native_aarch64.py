"""The native core (driver/native) off the Python path: its C unit tests
(tests/native/test_core.c: the split and packed rings against an in-memory device,
bad used entries, 16-bit index wraparound, indirect tables, the FUSE reply rules,
barriers across threads; and tests/native/test_hiprio_client.c and test_uring.c,
linked into the same program: the hiprio sender, hiprio.c, the typed client's
batched path, client.c, on both ring layouts, and the batched replies' io_uring,
uring.c, under injected faults) and the request pump's whole loop (tests/native/
pump_bench.c --socket: a socket pair in place of /dev/fuse, which qemu-user cannot
clone) built and run natively and, with Debian's cross gcc, on aarch64 under
qemu-user; and the aarch64 objects checked for the outer-shareable barriers that
order ring memory against the device.

The cross tools are test requirements (`bash tools/setup-env.sh --tests` installs
them): missing ones fail these tests. They skip, with the reason printed, only
where apt cannot install them (not a Debian-like machine)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mounting import kernel_allows_io_uring

NATIVE_TESTS = Path(__file__).resolve().parent / "native"
DRIVER_NATIVE = Path(__file__).resolve().parents[1] / "driver" / "native"
CROSS_TOOLS = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
               "aarch64-linux-gnu-objdump": "binutils-aarch64-linux-gnu",
               "qemu-aarch64": "qemu-user"}
# the static link needs the target's libc (no binary of its own to look for)
CROSS_PACKAGES = ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user"]


def require_tools(tools: dict[str, str]) -> None:
    """Fail when a test requirement is missing; skip (with a reason) only when apt
    could not install it here."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    packages = sorted({tools[t] for t in missing})
    installable = shutil.which("apt-cache") is not None and all(
        subprocess.run(["apt-cache", "show", p], capture_output=True).returncode == 0
        for p in packages)
    if not installable:
        pytest.skip(f"{', '.join(missing)} missing and apt cannot install "
                    f"{' '.join(packages)} on this machine")
    pytest.fail(f"{', '.join(missing)} missing: run `bash tools/setup-env.sh --tests` "
                f"(installs {' '.join(packages)})", pytrace=False)


def test_names() -> list[str]:
    """Every test test_core.c's table registers (its own and test_hiprio_client.c's):
    a run must report each one as ok."""
    src = (NATIVE_TESTS / "test_core.c").read_text()
    table = src[src.index("tests[] = {"):]
    return re.findall(r'\{"(\w+)", test_\w+\}', table)


test_names.__test__ = False  # a helper, not a pytest test


def assert_all_passed(proc: subprocess.CompletedProcess[str], where: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"test_core failed {where}:\n{out}"
    names = test_names()
    assert len(names) >= 27
    for part in ("hiprio_", "client_"):  # hiprio.c and client.c have theirs too
        assert any(n.startswith(part) for n in names), names
    for name in names:
        assert f"ok {name}\n" in proc.stdout, f"{name} did not pass {where}:\n{out}"
    assert f"{len(names)} tests, 0 failed checks" in proc.stdout


def build(cc: str, out: Path, native_dir: Path | None = None) -> None:
    env = None
    if native_dir is not None:
        env = {**os.environ, "VFSDRV_NATIVE_DIR": str(native_dir)}
    proc = subprocess.run(["bash", str(NATIVE_TESTS / "build.sh"), cc, str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"build with {cc} failed:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def aarch64(
        tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    require_tools(CROSS_TOOLS)
    out = tmp_path_factory.mktemp("aarch64")
    proc = subprocess.run(["bash", str(NATIVE_TESTS / "run-aarch64.sh"), str(out)],
                          capture_output=True, text=True, timeout=300)
    return out, proc


def test_unit_tests_pass_on_aarch64_under_qemu(
        aarch64: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = aarch64
    info = subprocess.run(["file", str(out / "test_core")], capture_output=True, text=True)
    if info.returncode == 0:  # `file` is optional; the cross gcc's output is not
        assert "ARM aarch64" in info.stdout, info.stdout
    assert_all_passed(proc, "on aarch64 (qemu-aarch64)")
    assert "budget: split ring, depth 16: 2000 requests, 2000 valid replies, 0 bad" in proc.stdout
    for layout in ("split", "packed"):  # the pump's whole loop, a socket pair for /dev/fuse
        assert (f"pump_bench: {layout} ring, 1 threads: requests 2000 replies 2000 "
                "bad_replies 0") in proc.stdout, proc.stdout


def test_unit_tests_pass_natively(tmp_path: Path) -> None:
    require_tools({"cc": "gcc"})
    build("cc", tmp_path)
    proc = subprocess.run([str(tmp_path / "test_core")], capture_output=True, text=True,
                          timeout=120)
    assert_all_passed(proc, f"natively ({platform.machine()})")
    # uring.c's faults ran on a real ring wherever this process may make one
    assert ("uring: no io_uring here" in proc.stdout) == (not kernel_allows_io_uring()), \
        proc.stdout
    for layout in ("split", "packed"):
        pump = subprocess.run([str(tmp_path / "pump_bench"), "--socket", "2000", layout],
                              capture_output=True, text=True, timeout=120)
        assert pump.returncode == 0, pump.stdout + pump.stderr
        assert "requests 2000 replies 2000 bad_replies 0" in pump.stdout, pump.stdout


# -- the objects' barriers --------------------------------------------------------
def disassembly(path: Path) -> dict[str, list[str]]:
    """objdump -d output -> {function: [instruction text, ...]}"""
    funcs: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in path.read_text().splitlines():
        m = re.match(r"^[0-9a-f]+ <([\w.]+)>:$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and re.match(r"^\s+[0-9a-f]+:\t", line):
            cur.append(line.split("\t", 1)[1].strip())
    return funcs


# the fence each primitive is: full (store->load), acquire side, release side
PRIMITIVES = {"vfsdrv_mb": "osh", "vfsdrv_rmb": "oshld", "vfsdrv_wmb": "oshst",
              "vfsdrv_store_release_u16": "oshst", "vfsdrv_load_acquire_u16": "oshld",
              "vfsdrv_load_acquire_u32": "oshld", "vfsdrv_mmio_read8": "osh",
              "vfsdrv_mmio_read16": "osh", "vfsdrv_mmio_read32": "osh",
              "vfsdrv_mmio_write8": "osh", "vfsdrv_mmio_write16": "osh",
              "vfsdrv_mmio_write32": "osh"}
# what each ring operation must order (core.c and packed.c say why at each one)
RING_OPS = {
    "core": {"vfsdrv_vq_publish": {"oshst", "osh"},      # entries before idx; idx before event read
             "vfsdrv_vq_harvest": {"oshld"},             # used->idx before the entries
             "vfsdrv_vq_used_pending": {"oshld"},
             "vfsdrv_vq_arm": {"osh", "oshld"}},         # re-arm before the re-check
    "packed": {"vfsdrv_packed_add": {"oshst"},           # the chain before the head's flags
               "vfsdrv_packed_publish": {"osh"},         # flags before the event area read
               "vfsdrv_packed_harvest": {"oshld"},       # flags before id/len
               "vfsdrv_packed_arm": {"osh"}},
}


CALL = re.compile(r"bl\s+\S*\s*<([\w.]+)>")


def barriers(funcs: dict[str, list[str]]) -> dict[str, set[str]]:
    """The dmb kinds each function issues itself, through a call to a primitive
    (packed.c calls core.c's across objects) or through another function of the
    same object (a helper may or may not be inlined)."""
    calls = {f: {m.group(1) for i in ins if (m := CALL.match(i))} for f, ins in funcs.items()}
    got = {f: {m.group(1) for i in ins if (m := re.match(r"dmb\s+(\w+)", i))}
           for f, ins in funcs.items()}
    for f in got:
        got[f] |= {PRIMITIVES[g] for g in calls[f] if g in PRIMITIVES}
    changed = True
    while changed:
        changed = False
        for f in got:
            for g in calls[f] & got.keys():
                if not got[g] <= got[f]:
                    got[f] |= got[g]
                    changed = True
    return got


def check_barriers(out: Path) -> None:
    """Assert the barriers of core.dis and packed.dis (aarch64 objdump -d) in OUT."""
    core = disassembly(out / "core.dis")
    for func, kind in PRIMITIVES.items():
        assert f"dmb\t{kind}" in core[func], f"{func}: {core[func]}"
    release = core["vfsdrv_store_release_u16"]
    assert release.index("dmb\toshst") < next(i for i, s in enumerate(release)
                                              if s.startswith("strh")), release
    for func in ("vfsdrv_load_acquire_u16", "vfsdrv_load_acquire_u32"):
        acquire = core[func]
        load = next(i for i, s in enumerate(acquire) if s.startswith("ldr"))
        assert load < acquire.index("dmb\toshld"), acquire
    for name in ("vfsdrv_mmio_write16", "vfsdrv_mmio_read32"):
        ins = core[name]
        access = next(i for i, s in enumerate(ins) if s.startswith(("str", "ldr")))
        assert ins.index("dmb\tosh") < access, ins  # ring writes before the device looks
    for obj, ops in RING_OPS.items():
        funcs = disassembly(out / f"{obj}.dis")
        got = barriers(funcs)
        for func, kinds in ops.items():
            assert kinds <= got[func], f"{obj}.o {func} orders only with {got[func]}"
        for f, ins in funcs.items():
            assert not any(re.match(r"dmb\s+ish", i) for i in ins), f"{obj}.o {f}: {ins}"



def test_aarch64_objects_carry_outer_shareable_barriers(
        aarch64: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """The device is a DMA master in the outer-shareable domain: the aarch64 build
    of core.c and packed.c must order ring memory with dmb osh/oshld/oshst (as
    Linux's dma_*mb()), never with the inner-shareable dmb ish* a plain C11 fence
    gives, and the release/acquire helpers must put the fence on the right side
    of their access."""
    out, proc = aarch64
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "core.o has dmb osh, dmb oshld, dmb oshst" in proc.stdout
    check_barriers(out)


def test_the_barrier_check_sees_c11_fences_on_aarch64(tmp_path: Path) -> None:
    """With the plain C11 fences (dmb ish*, what core.c uses on other CPUs) the
    aarch64 build would not order against the device: the check must say so."""
    require_tools(CROSS_TOOLS)
    broken = tmp_path / "native"
    shutil.copytree(DRIVER_NATIVE, broken)
    core = broken / "core.c"
    text = core.read_text()
    assert text.count("#if defined(__aarch64__)") == 1, "core.c changed: update this test"
    core.write_text(text.replace("#if defined(__aarch64__)", "#if 0"))
    for name in ("core", "packed"):
        obj = tmp_path / f"{name}.o"
        subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-fPIC", f"-I{broken}",
                        "-c", "-o", str(obj), str(broken / f"{name}.c")], check=True)
        (tmp_path / f"{name}.dis").write_text(subprocess.run(
            ["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(obj)],
            capture_output=True, text=True, check=True).stdout)
    with pytest.raises(AssertionError, match="vfsdrv_mb"):
        check_barriers(tmp_path)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 code generation")
def test_x86_64_fences_are_free_except_the_full_one(tmp_path: Path) -> None:
    """On x86-64 (TSO) only store->load needs an instruction: vfsdrv_mb is a full
    fence (mfence or a locked op), the acquire/release helpers compile to plain
    moves. A helper that lost its compiler barrier would still look like this, so
    test_core's threaded tests are the other half."""
    require_tools({"cc": "gcc", "objdump": "binutils"})
    build("cc", tmp_path)
    dis = tmp_path / "core.dis"
    dis.write_text(subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "core.o")],
                                  capture_output=True, text=True, check=True).stdout)
    core = disassembly(dis)
    full = re.compile(r"(mfence|lock )")
    for func in ("vfsdrv_mb", "vfsdrv_mmio_write16", "vfsdrv_vq_publish", "vfsdrv_vq_arm"):
        assert any(full.match(i) for i in core[func]), f"{func}: {core[func]}"
    for func in ("vfsdrv_rmb", "vfsdrv_wmb", "vfsdrv_store_release_u16",
                 "vfsdrv_load_acquire_u16", "vfsdrv_vq_harvest"):
        assert not any(full.match(i) or "fence" in i for i in core[func]), f"{func}: {core[func]}"


# -- the tests can fail --------------------------------------------------------------
@pytest.mark.parametrize("source,defect,old,new,fails", [
    ("core.c", "error range widened to the kernel's -4095",
     "return error <= 0 && error >= -VFSDRV_MAX_REPLY_ERRNO;",
     "return error <= 0 && error >= -4095;", ["check_reply", "valid_errno"]),
    ("core.c", "duplicate used ids in one batch accepted",
     "if (vq->chain_len[id] == 0 || vq->seen[id] == vq->seen_gen)\n"
     "            return fail(vq, -EIO, \"used id %u is not in flight\", id);",
     "if (vq->chain_len[id] == 0)\n"
     "            return fail(vq, -EIO, \"used id %u is not in flight\", id);",
     ["bad_used_entries"]),
    ("core.c", "16-bit used index compared as 32-bit",
     "uint32_t pending = (uint16_t)(idx - vq->last_used);",
     "uint32_t pending = (uint32_t)idx - vq->last_used;", ["index_wraparound"]),
    ("hiprio.c", "a BATCH_FORGET's last, partial piece dropped",
     "return (count + per - 1) / per;", "return count / per;", ["hiprio_batch_forget_split"]),
    ("hiprio.c", "a reclaimed entry frees the wrong buffer",
     "h->free_bufs[h->nfree++] = h->head_buf[h->used[k].id];",
     "h->free_bufs[h->nfree++] = h->head_buf[0];",
     ["hiprio_full_and_reclaim", "hiprio_buffers_never_shared"]),
    ("hiprio.c", "a bad used entry does not break the sender",
     "            break_locked(h, \"hiprio queue: %s\", h->vq->error);\n            return -EIO;",
     "            return -EIO;", ["hiprio_bad_used_id"]),
    ("client.c", "a refused reply passed on as good",
     "            d->bad = 1;", "            d->bad = 0;", ["client_bad_replies"]),
    ("client.c", "a harvested head keeps its slot",
     "        head_slot[id] = VFSDRV_CLIENT_NONE;\n", "", ["client_batch"]),
])
def test_a_defect_in_the_native_code_fails_the_unit_tests(
        tmp_path: Path, source: str, defect: str, old: str, new: str, fails: list[str]) -> None:
    require_tools({"cc": "gcc"})
    broken = tmp_path / "native"
    shutil.copytree(DRIVER_NATIVE, broken)
    path = broken / source
    text = path.read_text()
    assert text.count(old) == 1, f"{source} changed: update this test's defect ({defect})"
    path.write_text(text.replace(old, new))
    build("cc", tmp_path / "out", native_dir=broken)
    proc = subprocess.run([str(tmp_path / "out" / "test_core")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, f"{defect}: test_core passed:\n{proc.stdout}"
    for name in fails:
        assert f"FAIL {name}\n" in proc.stdout, f"{defect}: {name} passed:\n{proc.stdout}"
