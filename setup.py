# Only here because cffi's setuptools hook is configured through setup():
# everything else about the package is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_native.py:ffibuilder", "build_native.py:reference_builder"])
