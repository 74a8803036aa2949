"""A small ctypes binding to NVRTC, and per-kernel resource usage without a GPU.

NVRTC compiles CUDA C to a cubin in-process; it needs no driver and no GPU,
so ``gpuloss kernels`` and the tests can check ``kernels/*.cu`` anywhere the
``nvidia-cuda-nvrtc-cu12`` wheel is installed.

Resource usage comes from ptxas's own report (``-Xptxas=-v``), which NVRTC
returns in the program log: registers, barriers, static shared memory, stack
frame and spill bytes per function. The cubin's ELF sections are not used for
this: their shared-memory sizes include the 1 KiB per block the hardware
reserves from sm_80 on, and spills are not recorded there at all.

>>> from gpuloss import nvrtc
>>> res = nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = 1.f; }', "k.cu")
>>> res.entry_points
('k',)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from gpuloss._paths import device_source, kernel_sources, kernels_dir

__all__ = [
    "NvrtcError",
    "CompileResult",
    "KernelResources",
    "library_path",
    "version",
    "supported_archs",
    "compile",
    "compile_file",
    "parse_ptxas_log",
    "resources_from_result",
    "file_resources",
    "kernel_resources",
]

# NVRTC 12.x defaults to C++17 but older releases did not; say it explicitly.
_BASE_OPTIONS = ("--std=c++17",)
_VERBOSE_PTXAS = "-Xptxas=-v"

_NVRTC_SUCCESS = 0


class NvrtcError(RuntimeError):
    """NVRTC could not be loaded, or a compilation failed.

    ``log`` holds NVRTC's complete program log (compiler diagnostics), ``code``
    the ``nvrtcResult`` name, ``name`` the program (file) name.
    """

    def __init__(self, message: str, *, log: str = "", code: str = "", name: str = ""):
        self.log = log
        self.code = code
        self.name = name
        super().__init__(f"{message}\n{log}".rstrip() if log else message)


@dataclass(frozen=True)
class CompileResult:
    """What one NVRTC compilation produced."""

    name: str
    arch: str
    cubin: bytes
    ptx: str
    log: str
    options: tuple[str, ...]

    @property
    def entry_points(self) -> tuple[str, ...]:
        """Names of the ``__global__`` functions, in PTX order."""
        return tuple(_PTX_ENTRY.findall(self.ptx))


@dataclass(frozen=True)
class KernelResources:
    """One entry point's resource usage as ptxas reported it (bytes per thread
    for stack/spills/local, per block for shared memory)."""

    kernel: str
    source: str
    arch: str
    registers: int
    shared_bytes: int          # static __shared__ ("smem")
    stack_bytes: int           # this function's stack frame
    spill_stores: int
    spill_loads: int
    barriers: int = 0
    constant_bytes: int = 0    # cmem[0]: kernel parameters and the like
    cumulative_stack_bytes: int = 0  # frame plus callees', when ptxas reports it


_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z_$][\w$]*)", re.MULTILINE)

# --------------------------------------------------------------------------------------
# Finding and loading the library


def _wheel_candidates() -> list[str]:
    """libnvrtc from the ``nvidia-cuda-nvrtc-cu12`` wheel (``nvidia/cuda_nvrtc/lib``),
    or a CUDA 13 wheel's layout, found through the installed ``nvidia`` namespace package."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    found: list[str] = []
    for root in roots:
        for pattern in ("cuda_nvrtc/lib/libnvrtc.so*", "*/lib/libnvrtc.so*",
                        "cuda_nvrtc/bin/nvrtc64_*.dll", "*/bin/nvrtc64_*.dll"):
            found.extend(sorted(glob.glob(os.path.join(root, pattern)), reverse=True))
    return found


def _toolkit_candidates() -> list[str]:
    found: list[str] = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        base = os.environ.get(var)
        if base:
            for sub in ("lib64", "lib", "bin"):
                found.extend(sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*")), reverse=True))
                found.extend(sorted(glob.glob(os.path.join(base, sub, "nvrtc64_*.dll")), reverse=True))
    found.extend(sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"), reverse=True))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    # Bare sonames: whatever the dynamic loader's own search finds.
    found.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"])
    return found


def _is_main_library(path: str) -> bool:
    base = os.path.basename(path)
    # libnvrtc-builtins is a dependency, the .alt build a variant: neither is the API.
    return "builtins" not in base and ".alt." not in base


_lib: ctypes.CDLL | None = None
_lib_path: str | None = None


def _load() -> ctypes.CDLL:
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    override = os.environ.get("GPULOSS_NVRTC")
    candidates = [override] if override else []
    candidates += [p for p in _wheel_candidates() + _toolkit_candidates() if _is_main_library(p)]
    errors = []
    for cand in dict.fromkeys(candidates):
        try:
            lib = ctypes.CDLL(cand)
        except OSError as exc:
            errors.append(f"  {cand}: {exc}")
            continue
        _declare(lib)
        _lib, _lib_path = lib, cand
        return lib
    tried = "\n".join(errors[:8])
    raise NvrtcError(
        "gpuloss: NVRTC (libnvrtc) was not found. Install it with\n"
        "    pip install nvidia-cuda-nvrtc-cu12\n"
        "or point GPULOSS_NVRTC at a libnvrtc.so from a CUDA toolkit."
        + (f"\nTried:\n{tried}" if tried else "")
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int_p = ctypes.POINTER(ctypes.c_int)
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    prog_t = ctypes.c_void_p
    sigs = {
        "nvrtcGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
        "nvrtcVersion": (ctypes.c_int, [c_int_p, c_int_p]),
        "nvrtcGetNumSupportedArchs": (ctypes.c_int, [c_int_p]),
        "nvrtcGetSupportedArchs": (ctypes.c_int, [c_int_p]),
        "nvrtcCreateProgram": (ctypes.c_int, [ctypes.POINTER(prog_t), ctypes.c_char_p, ctypes.c_char_p,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
        "nvrtcDestroyProgram": (ctypes.c_int, [ctypes.POINTER(prog_t)]),
        "nvrtcCompileProgram": (ctypes.c_int, [prog_t, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
        "nvrtcGetPTXSize": (ctypes.c_int, [prog_t, c_size_p]),
        "nvrtcGetPTX": (ctypes.c_int, [prog_t, ctypes.c_char_p]),
        "nvrtcGetCUBINSize": (ctypes.c_int, [prog_t, c_size_p]),
        "nvrtcGetCUBIN": (ctypes.c_int, [prog_t, ctypes.c_char_p]),
        "nvrtcGetProgramLogSize": (ctypes.c_int, [prog_t, c_size_p]),
        "nvrtcGetProgramLog": (ctypes.c_int, [prog_t, ctypes.c_char_p]),
    }
    for fname, (restype, argtypes) in sigs.items():
        fn = getattr(lib, fname, None)
        if fn is None:  # nvrtcGet*SupportedArchs appeared in CUDA 11.2
            continue
        fn.restype, fn.argtypes = restype, argtypes


def _error_name(lib: ctypes.CDLL, code: int) -> str:
    raw = lib.nvrtcGetErrorString(code)
    return raw.decode() if raw else f"NVRTC error {code}"


def _check(lib: ctypes.CDLL, code: int, what: str, *, log: str = "", name: str = "") -> None:
    if code != _NVRTC_SUCCESS:
        err = _error_name(lib, code)
        raise NvrtcError(f"gpuloss: NVRTC {what} of {name or 'program'} failed: {err}", log=log, code=err, name=name)


def library_path() -> str:
    """The path (or soname) libnvrtc was loaded from."""
    _load()
    assert _lib_path is not None
    return _lib_path


def version() -> tuple[int, int]:
    """NVRTC's (major, minor), e.g. (12, 9)."""
    lib = _load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version query")
    return major.value, minor.value


def supported_archs() -> list[str]:
    """Real architectures this NVRTC can build cubins for, as ``sm_XX``."""
    lib = _load()
    if not hasattr(lib, "nvrtcGetSupportedArchs"):
        return []
    count = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "architecture query")
    archs = (ctypes.c_int * count.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "architecture query")
    return [f"sm_{a}" for a in archs]


# --------------------------------------------------------------------------------------
# Compiling


def _get_bytes(lib, prog, size_fn, get_fn) -> bytes:
    size = ctypes.c_size_t()
    size_fn(prog, ctypes.byref(size))
    if not size.value:
        return b""
    buf = ctypes.create_string_buffer(size.value)
    get_fn(prog, buf)
    return buf.raw[: size.value]


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def compile(
    source: str,
    name: str,
    arch: str = "sm_90",
    options: Sequence[str] = (),
    include_dirs: Iterable[str | os.PathLike] | None = None,
) -> CompileResult:
    """Compile CUDA C ``source`` to a cubin for ``arch`` (a real ``sm_XX``).

    ``name`` is the file name diagnostics quote. ``include_dirs`` defaults to
    ``(kernels_dir(),)`` so ``#include "common.cuh"`` resolves; no CUDA toolkit
    headers are searched. ``options`` are passed through (``-Xptxas=-v``,
    ``-maxrregcount=64``, ``-DNAME=1``, ...). Raises :class:`NvrtcError` with
    the full log when compilation fails.
    """
    if not arch.startswith("sm_"):
        raise ValueError(f"gpuloss: arch must be a real architecture like 'sm_90' (a cubin target); got {arch!r}")
    lib = _load()
    if include_dirs is None:
        include_dirs = (kernels_dir(),)
    opts = (f"-arch={arch}", *_BASE_OPTIONS, *(f"--include-path={Path(d)}" for d in include_dirs), *options)

    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "program creation", name=name)
    try:
        encoded = [o.encode() for o in opts]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        status = lib.nvrtcCompileProgram(prog, len(encoded), argv)
        log = _text(_get_bytes(lib, prog, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog))
        _check(lib, status, f"compilation for {arch}", log=log, name=name)
        ptx = _text(_get_bytes(lib, prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX))
        cubin = _get_bytes(lib, prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return CompileResult(name=name, arch=arch, cubin=cubin, ptx=ptx, log=log, options=tuple(opts))


def compile_file(path: str | os.PathLike, arch: str = "sm_90", options: Sequence[str] = (),
                 include_dirs: Iterable[str | os.PathLike] | None = None) -> CompileResult:
    """Compile one ``.cu`` file; its own folder is on the include path.

    The text compiled is :func:`gpuloss._paths.device_source` (the file plus its
    headers' digest, as CuPy gets it). Results are kept for the life of the
    process, keyed on that text, the arch, the options and the include path: a
    file compiled again unchanged is not recompiled (a large kernel file takes
    tens of seconds), and an edit to it or to any header it includes is.
    """
    path = Path(path)
    dirs = (path.parent,) if include_dirs is None else tuple(include_dirs)
    dirs = tuple(str(Path(d)) for d in dirs)
    return _compile_cached(device_source(path, dirs), path.name, arch, tuple(map(str, options)), dirs,
                           os.environ.get("GPULOSS_NVRTC"))


@functools.lru_cache(maxsize=128)
def _compile_cached(source: str, name: str, arch: str, options: tuple[str, ...], include_dirs: tuple[str, ...],
                    _nvrtc_override: str | None) -> CompileResult:
    # _nvrtc_override only enters the key: another libnvrtc may compile differently.
    # Failures raise and are not cached, so a fixed file compiles on the next call.
    return compile(source, name, arch, options, include_dirs)


# --------------------------------------------------------------------------------------
# Resource usage from ptxas -v

# Lines of ptxas's verbose report (CUDA 11 - 12.9), e.g.
#   ptxas info    : Compiling entry function 'k' for 'sm_90'
#   ptxas info    : Function properties for k
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 10 registers, used 1 barriers, 256 bytes smem, 364 bytes cmem[0]
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_BARRIERS = re.compile(r"used (\d+) barriers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")
_RE_CUMSTACK = re.compile(r"(\d+) bytes cumulative stack size")


def parse_ptxas_log(log: str) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Split a ``-Xptxas=-v`` log into (entries, functions).

    ``entries`` maps each entry point to registers, barriers, shared_bytes,
    constant_bytes, cumulative_stack_bytes, stack_bytes, spill_stores,
    spill_loads. ``functions`` maps every function with a "Function
    properties" block (entries and non-inlined device functions alike) to its
    stack_bytes / spill_stores / spill_loads.
    """
    entries: dict[str, dict[str, int]] = {}
    functions: dict[str, dict[str, int]] = {}
    current_entry: str | None = None
    props_for: str | None = None
    for line in log.splitlines():
        if m := _RE_ENTRY.search(line):
            current_entry = m.group(1)
            entries.setdefault(current_entry, {})
            continue
        if m := _RE_PROPS.search(line):
            props_for = m.group(1)
            continue
        if m := _RE_FRAME.search(line):
            if props_for is not None:
                functions[props_for] = {"stack_bytes": int(m.group(1)), "spill_stores": int(m.group(2)),
                                        "spill_loads": int(m.group(3))}
            continue
        if (m := _RE_USED.search(line)) and current_entry is not None:
            info = entries[current_entry]
            info["registers"] = int(m.group(1))
            for key, rx in (("barriers", _RE_BARRIERS), ("shared_bytes", _RE_SMEM),
                            ("constant_bytes", _RE_CMEM0), ("cumulative_stack_bytes", _RE_CUMSTACK)):
                mm = rx.search(line)
                info[key] = int(mm.group(1)) if mm else 0
    for entry, info in entries.items():
        frame = functions.get(entry, {})
        for key in ("stack_bytes", "spill_stores", "spill_loads"):
            info[key] = frame.get(key, 0)
    return entries, functions


def resources_from_result(result: CompileResult) -> list[KernelResources]:
    """Resource rows of a compilation made with ``-Xptxas=-v`` in its options.

    Raises :class:`NvrtcError` when the report lacks an entry point that the
    PTX declares: a changed log format must fail loudly, not yield an empty
    or partial table.
    """
    entries, _ = parse_ptxas_log(result.log)
    rows = []
    for kernel in result.entry_points:
        info = entries.get(kernel)
        if info is None or "registers" not in info:
            raise NvrtcError(f"gpuloss: ptxas reported no resource usage for entry point {kernel!r} of "
                             f"{result.name} ({result.arch}); was it compiled with {_VERBOSE_PTXAS}, "
                             "or has the log format changed?", log=result.log, name=result.name)
        rows.append(KernelResources(
            kernel=kernel, source=result.name, arch=result.arch,
            registers=info["registers"], shared_bytes=info["shared_bytes"], stack_bytes=info["stack_bytes"],
            spill_stores=info["spill_stores"], spill_loads=info["spill_loads"], barriers=info["barriers"],
            constant_bytes=info["constant_bytes"], cumulative_stack_bytes=info["cumulative_stack_bytes"],
        ))
    return sorted(rows, key=lambda r: r.kernel)


def file_resources(path: str | os.PathLike, arch: str = "sm_90", options: Sequence[str] = ()) -> list[KernelResources]:
    """Compile one ``.cu`` file with ``-Xptxas=-v`` and report every entry point
    (:class:`NvrtcError` when it does not compile)."""
    return resources_from_result(compile_file(path, arch, (*options, _VERBOSE_PTXAS)))


def kernel_resources(arch: str = "sm_90", sources: Iterable[str | os.PathLike] | None = None,
                     options: Sequence[str] = ()) -> list[KernelResources]:
    """Resource usage of every entry point of every ``kernels/*.cu`` (or of ``sources``)."""
    paths = kernel_sources() if sources is None else [Path(s) for s in sources]
    rows: list[KernelResources] = []
    for path in paths:
        rows.extend(file_resources(path, arch, options))
    return rows
