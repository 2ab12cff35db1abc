"""Build of the compiled extension; everything else is in pyproject.toml.

``server.explain._lookup``: the subset-table TreeSHAP lookup in C (plain CPython API,
no numpy headers), ~2x+ the numpy engine per row (bench/RESULTS.md). The server falls
back to the numpy engine, with a warning, where it was not built.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "server.explain._lookup",
            sources=["server/explain/_lookup.c"],
            extra_compile_args=["-O3", "-std=c11"],
        )
    ]
)
