"""``gpuloss info``: versions, backends (and why one is unavailable), devices, threads."""
from __future__ import annotations

import platform


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:
        return f"not importable ({exc.__class__.__name__})"
    return getattr(module, "__version__", "?")


def report() -> list[tuple[str, str]]:
    import numba

    import gpuloss
    from gpuloss.backends import cuda_unavailable_reason, default_backend_name

    rows = [("gpuloss", gpuloss.__version__), ("python", platform.python_version()),
            ("machine", f"{platform.machine()}, {platform.system()} {platform.release()}"),
            ("numpy", _version("numpy")), ("numba", _version("numba")),
            ("numba threads", f"{numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS}"),
            ("cupy", _version("cupy")), ("torch", _version("torch"))]
    rows.append(("backend cpu", "available (Numba)"))
    reason = cuda_unavailable_reason()
    if reason is None:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        rows.append(("backend cuda", f"available: {props['name'].decode()} (sm_{props['major']}{props['minor']})"))
    else:
        rows.append(("backend cuda", f"unavailable: {reason}"))
    rows.append(("backend emulated", _emulated_status()))
    rows.append(("nvrtc", _nvrtc_status()))
    rows.append(("default backend", default_backend_name()))
    return rows


def _emulated_status() -> str:
    import shutil

    return "available (g++ found)" if shutil.which("g++") else "unavailable: g++ not on PATH"


def _nvrtc_status() -> str:
    try:
        from gpuloss import nvrtc

        return "NVRTC " + ".".join(map(str, nvrtc.version()))
    except Exception as exc:
        return f"unavailable: {exc}"


def run(args) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="versions, backends and devices",
        description="Print the versions of gpuloss and its dependencies, which backends can run here "
                    "(and why one cannot), the CUDA device, NVRTC, Numba's thread count and the backend "
                    "'auto' picks. Takes no arguments.")
    p.set_defaults(func=run)
