"""Builds the optional CPU scan kernel; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lru_online._cscan",
            sources=["lru_online/csrc/scan.c"],
            extra_compile_args=["-O3", "-std=c11"],
            # Without a C compiler the package still installs and falls back to the
            # pure-torch chunked scan.
            optional=True,
        )
    ]
)
