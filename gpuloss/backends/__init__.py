"""Backend selection: ``cpu`` (Numba), ``cuda`` (CuPy + kernels/*.cu), ``emulated``
(kernels/*.cu compiled for the host).  docs/design.md §2.

A backend object exposes ``name``, ``xp`` (the array module: numpy or cupy) and
one method per loss family, each taking a frozen plan from ``gpuloss._plan``
and already-validated arrays.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

BACKEND_NAMES = ("cpu", "cuda", "emulated")
_MODULES = {"cpu": "gpuloss.backends.cpu", "cuda": "gpuloss.backends.cuda",
            "emulated": "gpuloss.backends.emulated_backend"}


@lru_cache(maxsize=None)
def get_backend(name: str):
    """The backend object called ``name`` (one of BACKEND_NAMES, or "auto")."""
    if name == "auto":
        name = default_backend_name()
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return importlib.import_module(_MODULES[name]).BACKEND


def cuda_unavailable_reason() -> str | None:
    """None when CuPy imports and a CUDA device answers, else why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return f"cupy does not import ({exc.__class__.__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device answers ({exc.__class__.__name__}: {exc})"
    return None if count > 0 else "no CUDA device answers (0 devices)"


def forced_backend_name() -> str | None:
    """The backend ``GPULOSS_BACKEND`` names, or None when it is unset, empty or ``auto``.

    The one parser of the variable: a value that names no backend is a ValueError
    wherever it is read (the loss functions, ``Net``, the command line).
    """
    forced = os.environ.get("GPULOSS_BACKEND", "").strip().lower()
    if not forced or forced == "auto":
        return None
    if forced not in BACKEND_NAMES:
        raise ValueError(f"GPULOSS_BACKEND must be one of {('auto',) + BACKEND_NAMES} (or unset); "
                         f"got {os.environ['GPULOSS_BACKEND']!r}")
    return forced


def default_backend_name() -> str:
    """``GPULOSS_BACKEND`` if set, else ``cuda`` when a device answers, else ``cpu``."""
    return forced_backend_name() or ("cuda" if cuda_unavailable_reason() is None else "cpu")


def is_cupy_array(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"
