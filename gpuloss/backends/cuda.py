"""The ``cuda`` backend: CuPy arrays, ``kernels/*.cu`` through CuPy ``RawModule``
(NVRTC), and the launch code it shares with ``emulated`` (docs/design.md §2).

Importing this module fails with ImportError when CuPy is missing: that is
how ``gpuloss.backends.get_backend("cuda")`` reports it.
"""
from __future__ import annotations

import cupy

from .._paths import device_source, kernel_sources, kernels_dir
from .launch import LaunchBackend


class CudaModules:
    """Every ``kernels/*.cu`` as its own ``cupy.RawModule`` (one NVRTC program per
    file, as the emulator builds them), looked up by entry-point name like one module.

    Options: C++17 and ``-I kernels/``, nothing else: the sources need no toolkit
    headers (docs/design.md §3.1), so the same text builds under NVRTC 12 and 13.

    The code is :func:`gpuloss._paths.device_source`, which carries a digest of
    every included header: CuPy's compile cache keys on the code and options
    only, so without it an edit to a ``.cuh`` alone would load a stale kernel.
    """

    def __init__(self):
        folder = kernels_dir()
        include = f"-I{folder}"
        self._modules = [(path.name, cupy.RawModule(code=device_source(path, (folder,)),
                                                    options=("--std=c++17", include)))
                         for path in kernel_sources()]
        self._where: dict[str, object] = {}

    def get_function(self, name: str):
        fn = self._where.get(name)
        if fn is not None:
            return fn
        errors = []
        # The file named like the entry's first word (xent_* in xent.cu) first, so a
        # lookup compiles no other file; then the rest (cosine_* lives in elementwise.cu).
        stem = name.split("_", 1)[0] + ".cu"
        for filename, mod in sorted(self._modules, key=lambda fm: fm[0] != stem):
            try:
                fn = mod.get_function(name)
            except Exception as exc:
                if type(exc).__name__ == "CompileException":  # NVRTC rejected the file: say so now
                    raise
                errors.append(f"{filename}: {exc.__class__.__name__}: {exc}")  # not in this file
                continue
            self._where[name] = fn
            return fn
        raise KeyError(f"no kernel named {name!r} in kernels/*.cu:\n" + "\n".join(errors))


BACKEND = LaunchBackend(name="cuda", xp=cupy, loader=CudaModules)
