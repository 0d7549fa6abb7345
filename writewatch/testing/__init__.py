"""Tools for checking write-watch implementations, writewatch's and your own.

winmodel.py states Windows' write-watch semantics as a pure-Python model (the
one the test suite holds every backend to); conformance.py is the
differential tester (``python -m writewatch.testing.conformance``) that runs
random traces against the model, writewatch's backends, a Python object or a
shared library of yours, and shrinks any divergence to a short report
(implementations.py: what it compares; traces.py: the calls it makes).
cbuild.py compiles C with cffi and the C compiler once into a cache directory
(the tests' native helpers; the translation-layer example uses its compiler
lookup and build steps).
"""
