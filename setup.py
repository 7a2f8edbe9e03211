"""Only here for cffi: builds the small C layer (shm/_ivclip_c) at install time."""

from setuptools import setup

setup(cffi_modules=["shm/_c_build.py:ffibuilder"])
