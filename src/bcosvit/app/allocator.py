"""The command line's memory policy on Linux: freed memory stays in the process.

A CPU training step allocates and frees activation-sized tensors (megabytes each) over and over.
glibc's malloc serves large blocks with ``mmap`` and hands memory at the top of its heap back to the
system once enough of it is free, so the next step's allocations fault the same pages in again, and
the kernel zeroes each one. The B-cos step, which keeps a few more activation-sized tensors alive
than a standard ViT's, crossed that line: 5,000-35,000 page faults per step at setting (a) of
``benchmarks/throughput.py`` (about 10-25 % of its time; the standard twin's step: none).
``keep_freed_memory`` tells glibc to serve every block from its heap and keep what is freed, so
after the first steps a run reuses its own memory (the process holds its peak, as PyTorch's CUDA
caching allocator does on a GPU). Measured in docs/results.md, "Performance, third round".

Only ``bcosvit`` runs (the console script, ``python -m bcosvit``) and the benchmarks apply it; a
program that imports the library keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
KEEP_ALL = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the top of the heap
OPT_OUT = "BCOSVIT_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults


def keep_freed_memory() -> bool:
    """On Linux with glibc, serve allocations from the heap and keep freed memory in the process.

    Returns whether the policy was applied: not on other systems or C libraries, not where
    ``BCOSVIT_KEEP_FREED_MEMORY=0``, and not where the user tuned malloc already (a ``MALLOC_*``
    variable or ``GLIBC_TUNABLES``) or preloads another allocator (jemalloc, tcmalloc, mimalloc).
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "1") == "0":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no mallopt parameters of these)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_ALL))
