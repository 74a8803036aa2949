"""The ``cuda`` backend: CuPy arrays, ``kernels/*.cu`` through CuPy ``RawModule``
(NVRTC), and the launch code it shares with ``emulated`` (SPEC §6).

Importing this module fails with ImportError when CuPy is missing: that is
how ``gpuloss.backends.get_backend("cuda")`` reports it.
"""
from __future__ import annotations

import cupy

from .._paths import kernel_sources, kernels_dir
from .launch import LaunchBackend


class CudaModules:
    """Every ``kernels/*.cu`` as its own ``cupy.RawModule`` (one NVRTC program per
    file, as the emulator builds them), looked up by entry-point name like one module.

    Options: C++17 and ``-I kernels/``, nothing else: the sources need no toolkit
    headers (DESIGN §2), so the same text builds under NVRTC 12 and 13.
    """

    def __init__(self):
        include = f"-I{kernels_dir()}"
        self._modules = [(path.name, cupy.RawModule(code=path.read_text(), options=("--std=c++17", include)))
                         for path in kernel_sources()]
        self._where: dict[str, object] = {}

    def get_function(self, name: str):
        fn = self._where.get(name)
        if fn is not None:
            return fn
        errors = []
        for filename, mod in self._modules:
            try:
                fn = mod.get_function(name)
            except Exception as exc:  # CUDA_ERROR_NOT_FOUND from that file; compile errors propagate below
                errors.append(f"{filename}: {exc.__class__.__name__}: {exc}")
                continue
            self._where[name] = fn
            return fn
        raise KeyError(f"no kernel named {name!r} in kernels/*.cu:\n" + "\n".join(errors))


BACKEND = LaunchBackend(name="cuda", xp=cupy, loader=CudaModules)
