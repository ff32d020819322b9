# The small compiled helper (memory barriers, MMIO) is built by cffi; everything else is setup.cfg.
from setuptools import setup

setup(cffi_modules=["driver/_native_build.py:ffibuilder"])
