"""Build the optional NF4/FP4 kernel library (loaded with ctypes; a pure-torch fallback exists).

Everything else about the package lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "adaptools_plugins._nf4_kernels",
            sources=["plugins/csrc/nf4_kernels.c"],
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
