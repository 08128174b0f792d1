"""Native kernel libraries for backends: loading one built with the package, and splitting its work over
threads (docs/plugins.md, "Native kernels").

A backend whose codec runs in C ships a small shared library beside its module (built by setup.py), loads it
with :func:`load_kernel` and falls back to an equivalent Python path when none loads. The library exports an
``<prefix>_abi()`` function returning its interface version: a library built from other sources is never
called with the wrong arguments. ctypes releases the GIL while C code runs, so :func:`split` gives each
thread a range of the work.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Threads one call's work is split over: the machine's cores, at most four (more only contend for memory).
THREADS = max(1, min(4, os.cpu_count() or 1))


def load_kernel(folder: Path, stem: str, prefix: str, abi: int) -> ctypes.CDLL | None:
    """The library ``<stem>*.so`` (or ``.pyd``) in ``folder`` whose ``<prefix>_abi()`` returns ``abi``, or None.

    Set each function's ``argtypes``/``restype`` on the result before calling it."""
    for path in sorted(folder.glob(f"{stem}*.so")) + sorted(folder.glob(f"{stem}*.pyd")):
        try:
            lib = ctypes.CDLL(str(path))
            version = getattr(lib, f"{prefix}_abi")
            version.restype = ctypes.c_int
            if version() != abi:
                continue  # built from other sources
        except (OSError, AttributeError):
            continue
        return lib
    return None


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One long-lived pool: starting threads on every call costs about as much as a small layer's work."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adaptools-kernel")


def split(n_items: int, work: Callable[[int, int], None], threads: int | None = None) -> None:
    """``work(start, stop)`` over consecutive ranges covering [0, n_items), one per thread (``threads``,
    default :data:`THREADS`), returning when all are done and raising the first error."""
    parts = min(threads or THREADS, n_items)
    if parts <= 1:
        if n_items > 0:
            work(0, n_items)
        return
    step = -(-n_items // parts)
    for future in [_pool(parts).submit(work, s, min(s + step, n_items)) for s in range(0, n_items, step)]:
        future.result()
