"""Build the NF4/FP4, FP8, GGUF and packed-integer kernel libraries (loaded with ctypes; pure-torch fallbacks
give the same bytes, about ten times slower; the packed one also holds the survival report's sums,
csrc/norms.c). Also finds the packages; everything else about the package lives in pyproject.toml.

A build without a working C compiler fails loudly rather than shipping a platform wheel without its
kernel. ``ADAPTOOLS_NO_NATIVE=1`` builds a pure-Python wheel on purpose; ``adaptools plugins`` then says
that the torch fallback is in use.
"""

import os

from setuptools import Extension, find_packages, setup

NATIVE = os.environ.get("ADAPTOOLS_NO_NATIVE", "") in ("", "0")

# Every package under adaptools/ and plugins/ (installed as adaptools_plugins, see package-dir in
# pyproject.toml), found automatically so that no family can silently drop out of the wheel
# (tests/test_packaging.py checks that the wheel holds every module).
PACKAGES = ["adaptools", *(f"adaptools.{p}" for p in find_packages("adaptools")),
            "adaptools_plugins", *(f"adaptools_plugins.{p}" for p in find_packages("plugins"))]

setup(
    packages=PACKAGES,
    ext_modules=[
        Extension(
            "adaptools._packed_kernels",
            sources=["adaptools/csrc/packed_kernels.c", "adaptools/csrc/norms.c"],
            include_dirs=["adaptools/csrc"],
            depends=["adaptools/csrc/adaptools_kernel.h"],
            # -fno-trapping-math lets the float16 rounding vectorize; it changes no value
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math"],
        ),
        Extension(
            "adaptools_plugins.bitsandbytes._nf4_kernels",
            sources=["plugins/bitsandbytes/csrc/nf4_kernels.c"],
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
        ),
        Extension(
            "adaptools_plugins.fp8._fp8_kernels",
            sources=["plugins/fp8/csrc/fp8_kernels.c"],
            include_dirs=["adaptools/csrc"],
            depends=["adaptools/csrc/adaptools_kernel.h"],
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
        ),
        Extension(
            "adaptools_plugins.gguf._gguf_kernels",
            sources=["plugins/gguf/csrc/gguf_kernels.c", "plugins/gguf/csrc/gguf_legacy.c",
                     "plugins/gguf/csrc/gguf_kquants.c", "plugins/gguf/csrc/gguf_kquants_low.c",
                     "plugins/gguf/csrc/gguf_imatrix.c", "plugins/gguf/csrc/gguf_iq4.c"],
            include_dirs=["adaptools/csrc"],
            depends=["adaptools/csrc/adaptools_kernel.h", "plugins/gguf/csrc/gguf_kquants.h",
                     "plugins/gguf/csrc/gguf_imatrix.h", "plugins/gguf/csrc/gguf_iq4.h"],
            # -fno-trapping-math lets the rounding selects vectorize; it changes no value. -Wno-psabi: the
            # K-quant vector helpers are always inlined, so no vector crosses a call whose ABI GCC warns about
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-Wno-psabi"],
        ),
    ] if NATIVE else []
)
