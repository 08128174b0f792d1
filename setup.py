"""Build the NF4/FP4 kernel library (loaded with ctypes; a pure-torch fallback gives the same bytes, about
ten times slower). Everything else about the package lives in pyproject.toml.

A build without a working C compiler fails loudly rather than shipping a platform wheel without its
kernel. ``ADAPTOOLS_NO_NATIVE=1`` builds a pure-Python wheel on purpose; ``adaptools plugins`` then says
that the torch fallback is in use.
"""

import os

from setuptools import Extension, setup

NATIVE = os.environ.get("ADAPTOOLS_NO_NATIVE", "") in ("", "0")

setup(
    ext_modules=[
        Extension(
            "adaptools_plugins._nf4_kernels",
            sources=["plugins/csrc/nf4_kernels.c"],
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
        )
    ] if NATIVE else []
)
