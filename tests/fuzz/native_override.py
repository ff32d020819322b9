"""Run vfsdrv with another build of its native core (a sanitized one).

`install()` loads the extension named by $VFSDRV_NATIVE_SO as `vfsdrv._native`
before anything imports the installed one; every module then uses it. As a
script it runs a module that way: `python native_override.py -m vfsdrv.tools.cli
mount ...` (how the fuzzer starts a sanitized mount server).
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys


def install() -> str | None:
    """Load $VFSDRV_NATIVE_SO as vfsdrv._native; returns its path (None: unset)."""
    path = os.environ.get("VFSDRV_NATIVE_SO")
    if not path:
        return None
    import vfsdrv  # the package itself imports nothing native

    if "vfsdrv._native" in sys.modules:
        loaded = getattr(sys.modules["vfsdrv._native"], "__file__", None)
        if loaded != path:
            raise RuntimeError(f"vfsdrv._native already loaded from {loaded}, not {path}")
        return path
    spec = importlib.util.spec_from_file_location("vfsdrv._native", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path} as vfsdrv._native")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vfsdrv._native"] = module
    spec.loader.exec_module(module)
    vfsdrv._native = module  # type: ignore[attr-defined]
    return path


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: native_override.py -m MODULE [ARGS...]")
    install()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
