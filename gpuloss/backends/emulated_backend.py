"""The ``emulated`` backend: the launch code of ``cuda`` over NumPy arrays, with
``kernels/*.cu`` compiled for the host by ``gpuloss.backends.emulated`` (docs/design.md §2,
docs/design.md §5).

Importing this module compiles nothing: the module is built (or loaded from
the cache) on the first launch, and a missing ``g++`` is reported then.
"""
from __future__ import annotations

import numpy as np

from .launch import LaunchBackend


def _load():
    from . import emulated  # the build and its errors come with the first launch, not with the import

    return emulated.default_module()


BACKEND = LaunchBackend(name="emulated", xp=np, loader=_load)
