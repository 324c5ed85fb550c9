"""Build hook: setuptools compiles the cffi extension (API mode over liburing)."""

from setuptools import setup

setup(cffi_modules=["ublk_driver/_build.py:ffibuilder"])
