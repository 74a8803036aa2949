"""Numba's disk cache for the cpu kernels, keyed on all the source they are built from.

Numba decides whether a cached kernel is fresh from the file that defines the
jitted function alone.  Our kernels in ``cpu.py`` inline functions of
``cpu_math.py`` and ``cpu_half.py`` (the vectorised exp, log and the 16-bit
conversions), so an edit there alone left the old machine code in use: a
16-bit and a float32 kernel compiled on either side of such an edit gave
results one ulp apart (found by tests/test_cpu_half.py).  The locators below
are Numba's own, with one change: the freshness stamp of a function defined
in ``backends/cpu*.py`` is the SHA-256 of every one of those files, so a
change to any of them recompiles every kernel that may have inlined it.
Functions defined elsewhere keep Numba's locators untouched.

Imported for its effect by ``cpu_math`` (which every cpu kernel module imports
before defining a kernel); registering twice is harmless.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from numba.core import caching

BACKENDS = Path(__file__).resolve().parent


def kernel_sources() -> list[Path]:
    """The files whose functions the cpu kernels are compiled from (and inline from each other)."""
    return sorted(BACKENDS.glob("cpu*.py"))


def source_stamp(files) -> str:
    """SHA-256 over the contents of ``files`` in order, with their names (a rename counts too)."""
    return _stamp(tuple((str(f), os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files))


@functools.lru_cache(maxsize=16)
def _stamp(keyed_files) -> str:
    # keyed by (path, mtime, size): a file edited while the process runs is hashed again
    digest = hashlib.sha256()
    for name, _, _ in keyed_files:
        digest.update(Path(name).name.encode() + b"\0" + Path(name).read_bytes())
    return digest.hexdigest()


def _is_kernel_source(py_file) -> bool:
    try:
        return Path(py_file).resolve() in kernel_sources()
    except OSError:
        return False


def _whole_source_locator(base):
    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if _is_kernel_source(py_file) else None

        def get_source_stamp(self):
            return source_stamp(kernel_sources())

    Locator.__name__ = Locator.__qualname__ = f"WholeSource{base.__name__}"
    return Locator


# Numba's order: a user-set NUMBA_CACHE_DIR first, then beside the source, then the user's cache folder.
LOCATORS = tuple(_whole_source_locator(base) for base in
                 (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator))


def install() -> None:
    """Put LOCATORS first in Numba's list (``CacheImpl``, ``_CacheImpl`` in older Numba). If
    neither exists, Numba's own locators stay: tests/test_cpu_math.py fails on that."""
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if classes is not None and not any(c in classes for c in LOCATORS):
        classes[:0] = LOCATORS


install()
