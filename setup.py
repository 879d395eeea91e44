"""Builds the optional CPU scan kernel; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11"]

setup(
    ext_modules=[
        Extension(
            "lru_online._cscan",
            sources=["lru_online/csrc/scan.c"],
            extra_compile_args=FLAGS,
            # Kept in the module, so a benchmark can say how its kernel was built.
            define_macros=[("SCAN_COMPILE_FLAGS", '"' + " ".join(FLAGS) + '"')],
            # Without a C compiler the package still installs and falls back to the
            # pure-torch chunked scan.
            optional=True,
        )
    ]
)
