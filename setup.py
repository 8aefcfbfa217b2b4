"""The one compiled part: `sharded_embedding._scatter` (csrc/scatter.c, C and Python's headers
only). Optional: where it cannot build (no C compiler), the package installs without it and
the owner's update runs in PyTorch (`sharded_embedding.native`)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sharded_embedding._scatter", ["sharded_embedding/csrc/scatter.c"],
                             extra_compile_args=["-O3"], optional=True)])
