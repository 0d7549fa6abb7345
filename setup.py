# Only here because cffi's setuptools hook is configured through setup():
# everything else about the package is in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=["build_native.py:ffibuilder", "build_native.py:reference_builder"],
    # cffi compiles against the stable ABI (the modules are *.abi3.so): one
    # wheel serves every CPython from 3.10 on.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
