# Only here because cffi's setuptools hook is configured through setup(), and
# libprocess_memwatch.so (a plain C library, not an extension) is built beside
# the extension: everything else about the package is in pyproject.toml.
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_native import build_library


class BuildWithLibrary(build_ext):
    def run(self) -> None:
        super().run()
        directory = Path(self.get_ext_fullpath("writewatch._native")).parent
        directory.mkdir(parents=True, exist_ok=True)
        build_library(self.compiler, str(directory), self.build_temp)

    def get_outputs(self) -> list[str]:
        directory = Path(self.get_ext_fullpath("writewatch._native")).parent
        return [*super().get_outputs(), str(directory / "libprocess_memwatch.so")]


setup(
    cffi_modules=["build_native.py:ffibuilder", "build_native.py:reference_builder"],
    cmdclass={"build_ext": BuildWithLibrary},
    # cffi compiles against the stable ABI (the modules are *.abi3.so): one
    # wheel serves every CPython from 3.10 on.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
