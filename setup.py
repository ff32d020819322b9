# The small compiled helper (memory barriers, MMIO) is built by cffi; everything else is setup.cfg.
from setuptools import setup

setup(
    cffi_modules=["driver/_native_build.py:ffibuilder"],
    # cffi builds the helper against the stable ABI (_native.abi3.so): tag the wheel so,
    # or pip refuses it on any Python but the one that built it
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
