"""Build of the compiled modules: the guest kernel's paging core (guestd/_paging.c), the host's
compiled passes over its books (hostd/_books.c) and its read chains' usual steps (hostd/_chain.c).

Everything else about the package is in pyproject.toml; setuptools reads
both. Plain C over the CPython API and the buffer protocol: it needs only a C
compiler and Python's headers, no numpy headers and no extra build tool.
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "balloonlab.guestd._paging",
        sources=["guestd/_paging.c"],
        # -ffp-contract=off: no fused multiply-add, so virtual clocks match the Python reference bit for bit
        extra_compile_args=["-O2", "-ffp-contract=off", "-fno-strict-aliasing"],
    ),
    Extension("balloonlab.hostd._books", sources=["hostd/_books.c"], extra_compile_args=["-O2"]),
    # a read chain's clocks and completion times: the same float operations as hostd/readchain.py's
    Extension("balloonlab.hostd._chain", sources=["hostd/_chain.c"],
              extra_compile_args=["-O2", "-ffp-contract=off", "-fno-strict-aliasing"]),
])
