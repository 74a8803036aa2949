"""The emulated module loader: ``kernels/*.cu`` compiled for the host, run on CPU threads.

docs/design.md §5. The very source CuPy hands to NVRTC is built with g++ into one
shared library, with ``kernels/emulator/cuda_emulator.h`` force-included to
supply the CUDA execution model (one OS thread per CUDA thread, ``__shared__``
per block, ``__syncthreads`` and warp shuffles through a per-launch lock), and
``kernels/emulator/launcher.cpp`` to launch an entry point by name with
cuLaunchKernel-style arguments. :class:`EmulatedModule` is the counterpart of
``cupy.RawModule`` and :class:`EmulatedKernel` of ``cupy.RawKernel``: the shared
launch code calls both the same way, with NumPy arrays in place of CuPy ones.

>>> mod = EmulatedModule(sources=["scale.cu"])               # doctest: +SKIP
>>> k = mod.get_function("scale_f32")                         # doctest: +SKIP
>>> k((4,), (128,), (x, y, np.int64(x.size), np.float32(2)))  # doctest: +SKIP

Builds are cached by a SHA-256 of every source, the flags and the compiler's
version, in ``$GPULOSS_CACHE_DIR`` (default ``~/.cache/gpuloss/emulator``).
Each library is written atomically beside a record of its own SHA-256, and
is loaded only when its bytes still match that record (a truncated, corrupt
or planted file is rebuilt, with an :class:`EmulatorCacheWarning`).
``EmulatedModule(sanitize="thread" | "address" | "undefined")`` builds an
instrumented variant; :func:`run_sanitized` runs Python code against it in a
subprocess that has the sanitizer runtime preloaded.
"""
from __future__ import annotations

import ctypes
import difflib
import fcntl
import functools
import hashlib
import json
import numbers
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gpuloss import _paths
from gpuloss._atomic import write_atomically

__all__ = [
    "EmulatedModule", "EmulatedKernel", "EmulatorBuildError", "EmulatorCacheWarning", "EmulatorLaunchError",
    "KernelNotFoundError",
    "SanitizedRun", "SANITIZERS", "build_library", "cache_dir", "default_module", "emulator_dir", "run_sanitized",
    "sanitizer_env",
]

# Extra compiler flags per sanitizer, and the runtime a process must have
# loaded first (ASan and TSan refuse to start from a dlopen'ed library;
# UBSan's runtime is an ordinary dependency of the built library).
SANITIZERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    # -Wno-tsan: g++ 12 warns that TSan does not model std::atomic_thread_fence
    # (our __threadfence); kernels here never use fences for ordering.
    "thread": (("-fsanitize=thread", "-g", "-fno-omit-frame-pointer", "-Wno-tsan"), "libtsan.so"),
    "address": (("-fsanitize=address", "-g", "-fno-omit-frame-pointer"), "libasan.so"),
    "undefined": (("-fsanitize=undefined", "-g", "-fno-omit-frame-pointer"), None),
    "address,undefined": (("-fsanitize=address,undefined", "-g", "-fno-omit-frame-pointer"), "libasan.so"),
}

_BASE_FLAGS = ("-std=c++20", "-O2", "-pthread", "-shared", "-fPIC",
               # Only the gpuloss_emu_* entry points are exported; see cuda_emulator.h.
               "-fvisibility=hidden")
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cpp")
_ABI_VERSION = 1
# Enters the cache key: how a unit's source is wrapped (2: inlined text under #line).
_WRAPPER_VERSION = 2
_RECORD_FORMAT = 1
# A build folder or temporary file untouched this long belongs to no live compile.
_STALE_AGE_S = 60 * 60


class EmulatorBuildError(RuntimeError):
    """g++ failed; the message carries the compiler's output."""


class EmulatorCacheWarning(RuntimeWarning):
    """A cached library failed its check (truncated, corrupt, planted, no record) and is being rebuilt."""


class EmulatorLaunchError(RuntimeError):
    """A launch was refused (bad block/grid) or abandoned (deadlock, __trap, C++ exception)."""


class KernelNotFoundError(KeyError):
    """No registered entry point has that name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------
# Locations and the compiler.

def emulator_dir() -> Path:
    """The folder holding ``cuda_emulator.h`` and ``launcher.cpp``."""
    candidates = []
    try:
        candidates.append(_paths.kernels_dir() / "emulator")
    except FileNotFoundError:  # a checkout with no kernels yet
        pass
    here = Path(_paths.__file__).resolve().parent
    candidates += [here.parent / "kernels" / "emulator", here / "kernels" / "emulator"]
    for c in candidates:
        if (c / "cuda_emulator.h").is_file():
            return c
    raise FileNotFoundError(f"gpuloss: kernels/emulator/cuda_emulator.h not found (looked in {candidates})")


def cache_dir() -> Path:
    """``$GPULOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpuloss/emulator`` (``~/.cache/...``)."""
    env = os.environ.get("GPULOSS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpuloss" / "emulator"


def _compiler() -> str:
    return os.environ.get("GPULOSS_CXX", "g++")


def _clean_env() -> dict[str, str]:
    # A sanitizer runtime preloaded into this process must not leak into g++.
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True, env=_clean_env())
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmulatorBuildError(f"the emulated backend needs a C++20 compiler; running {cxx!r} failed: {exc}") from exc
    return out.stdout


@functools.lru_cache(maxsize=None)
def _runtime_library(name: str) -> str:
    """Absolute path of a sanitizer runtime shipped with the compiler (e.g. libtsan.so)."""
    out = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True,
                         env=_clean_env()).stdout.strip()
    if not out or not os.path.isabs(out) or not os.path.exists(out):
        raise EmulatorBuildError(f"{_compiler()} does not ship {name}; install the sanitizer runtime "
                                 f"(Debian: it comes with gcc as libtsan2 / libasan8)")
    return os.path.realpath(out)


def _check_sanitize(sanitize: str | None) -> str | None:
    if sanitize is None:
        return None
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be None or one of {sorted(SANITIZERS)}, got {sanitize!r}")
    return sanitize


# ---------------------------------------------------------------------------
# Building.

def _kernel_include_dir() -> Path | None:
    try:
        return _paths.kernels_dir()
    except FileNotFoundError:
        return None


def _hashed_files(sources: Sequence[Path]) -> list[Path]:
    """Every file whose change must rebuild: sources, their folders' headers, the emulator,
    and every header the sources include (wherever it lives)."""
    dirs = {emulator_dir()} | {s.parent for s in sources}
    inc = _kernel_include_dir()
    if inc is not None:
        dirs.add(inc)
    files = set(sources)
    for d in dirs:
        files.update(p for p in d.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    for s in sources:
        files.update(_paths.included_files(s, [] if inc is None else [inc]))
    return sorted(files)


def _cache_key(sources: Sequence[Path], flags: Sequence[str], cxx: str) -> str:
    h = hashlib.sha256()
    h.update(f"gpuloss-emulator abi {_ABI_VERSION} wrapper {_WRAPPER_VERSION}\0{cxx}\0"
             f"{_compiler_version(cxx)}\0".encode())
    h.update(("\0".join(flags) + "\0\0").encode())
    h.update(("\0".join(str(s) for s in sources) + "\0\0").encode())  # which files are translation units
    for f in _hashed_files(sources):
        data = f.read_bytes()
        h.update(f"{f}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _c_string(text: str) -> str:
    """``text`` as a C string literal (for ``#line``, which, unlike ``#include``, takes escapes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _wrapper_source(src: Path, include_dirs: Sequence[Path] = ()) -> str:
    # One unnamed namespace per .cu file: like one NVRTC module per file, so
    # two files' helpers of the same name (inline ones included) never merge.
    # The text is inlined (the very text NVRTC gets) rather than #include'd:
    # #include "..." takes no escapes, so a path with a `"` could not be
    # written there; #line can carry any path, so diagnostics, __FILE__ and
    # debug info still name the real file. Its folder is passed as -iquote.
    return ("// generated by gpuloss.backends.emulated\n"
            "namespace {\n"
            f"#line 1 {_c_string(str(src))}\n"
            f"{_paths.device_source(src, include_dirs)}"
            "}  // namespace\n")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _owner() -> str:
    """``pid@host`` put into temporary names, so a later build can tell a dead builder's leftovers."""
    return f"{os.getpid()}@{_host_tag()}"


_OWNED = re.compile(r"^(?:build|tmp)-(\d+)@([A-Za-z0-9._]+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _clean_stale(folder: Path) -> list[Path]:
    """Remove ``build-*`` / ``tmp*`` leftovers of killed builds: those whose owner (a pid
    on this host) is gone, and any untouched for :data:`_STALE_AGE_S`. Returns what went."""
    removed = []
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith("build-") or entry.name.startswith("tmp")):
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:  # removed meanwhile
            continue
        m = _OWNED.match(entry.name)
        # A pid is only meaningful on its own host; elsewhere (a shared cache) only age counts.
        dead = m is not None and m.group(2) == _host_tag() and not _pid_alive(int(m.group(1)))
        if not (dead or age > _STALE_AGE_S):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _record_path(lib: Path) -> Path:
    return lib.with_suffix(".json")


_ABSENT = "is absent"


def _open_verified(lib: Path, key: str) -> tuple[int | None, str]:
    """``(fd, "")``: ``lib`` opened read-only, its bytes read through that very fd and found
    to match its record (same SHA-256, size and cache key). ``(None, why)`` otherwise.

    Loading goes through the returned fd, so the file that is dlopen'ed is the one
    that was hashed, even if the path is replaced in between.
    """
    try:
        fd = os.open(lib, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, _ABSENT
    except OSError as exc:  # a symlink (O_NOFOLLOW), a folder, no permission
        return None, f"cannot be opened ({exc.strerror or exc})"
    try:
        h, size = hashlib.sha256(), 0
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            size += len(chunk)
        rec_path = _record_path(lib)
        try:
            record = json.loads(rec_path.read_text())
        except FileNotFoundError:
            why = f"has no build record ({rec_path.name})"
        except (OSError, ValueError) as exc:
            why = f"has an unreadable build record ({rec_path.name}: {exc})"
        else:
            if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
                why = f"has a build record of an unknown format ({rec_path.name})"
            elif record.get("key") != key:
                why = "has a build record for other sources or flags"
            elif record.get("size") != size or record.get("sha256") != h.hexdigest():
                why = (f"does not match its build record ({size} bytes, sha256 {h.hexdigest()[:16]}..., "
                       f"recorded {record.get('size')} bytes, {str(record.get('sha256'))[:16]}...): "
                       "truncated, corrupted or replaced")
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                return fd, ""
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None, why


def _compile(sources: Sequence[Path], flags: Sequence[str], cxx: str, out: Path, key: str) -> None:
    emu = emulator_dir()
    header = emu / "cuda_emulator.h"
    inc = _kernel_include_dir()
    inc_dirs = [] if inc is None else [inc]
    # Named after this process: if the compile is killed, a later build removes the folder.
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{_owner()}-", dir=out.parent))
    try:
        units = []
        for i, src in enumerate(sources):
            unit = tmp / f"unit{i}_{src.stem}.cpp"
            unit.write_text(_wrapper_source(src, inc_dirs))
            units.append(str(unit))
        tmp_out = tmp / "lib.so"
        cmd = [cxx, *_BASE_FLAGS, *flags, "-x", "c++", "-include", str(header)]
        # A source's own folder first for "..." includes, as when it includes them itself.
        for d in dict.fromkeys(s.parent for s in sources):
            cmd += ["-iquote", str(d)]
        if inc is not None:
            cmd += ["-I", str(inc)]
        cmd += [*units, str(emu / "launcher.cpp"), "-o", str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
        if proc.returncode != 0:
            raise EmulatorBuildError(
                f"{cxx} could not build the emulated kernels (exit {proc.returncode}).\n"
                f"command: {' '.join(cmd)}\n{proc.stderr.strip()}")
        data = tmp_out.read_bytes()
        record = {"format": _RECORD_FORMAT, "key": key, "sha256": hashlib.sha256(data).hexdigest(),
                  "size": len(data), "compiler": cxx, "flags": list(flags),
                  "sources": [str(s) for s in sources]}
        # Library, then record, each atomically; a reader that catches them
        # half-way sees a mismatch and waits for this build under the lock.
        # Named tmp-<owner>-*: a killed writer's leftover is recognised and removed by a later build.
        write_atomically(out, lambda f: f.write(data), prefix=f"tmp-{_owner()}-", suffix=".part")
        record_bytes = json.dumps(record, indent=1).encode()
        write_atomically(_record_path(out), lambda f: f.write(record_bytes), prefix=f"tmp-{_owner()}-",
                         suffix=".part")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(sources: Iterable[Path | str] | None, sanitize: str | None, extra_flags: Sequence[str],
           cache: Path | str | None) -> tuple[Path, bool, int]:
    """:func:`build_library`, also returning an fd of the verified library (the caller closes it)."""
    sanitize = _check_sanitize(sanitize)
    srcs = [Path(s).resolve() for s in (_paths.kernel_sources() if sources is None else sources)]
    for s in srcs:
        if not s.is_file():
            raise FileNotFoundError(f"sources: {s} does not exist")
    flags = [*(SANITIZERS[sanitize][0] if sanitize else ()), *map(str, extra_flags)]
    cxx = _compiler()
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tag = (sanitize or "plain").replace(",", "+")
    key = _cache_key(srcs, flags, cxx)
    out = folder / f"emu-{tag}-{key[:32]}.so"
    fd, _ = _open_verified(out, key)
    if fd is not None:
        _touch(out)
        return out, False, fd
    # One compiler run per build even when several processes ask at once. The
    # lock file stays: unlinking it would let a late comer lock a new inode
    # while another still holds the old one.
    with open(folder / (out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd, why = _open_verified(out, key)  # built by another process meanwhile?
        if fd is not None:
            return out, False, fd
        if why != _ABSENT:
            warnings.warn(f"gpuloss: the cached emulator library {out} {why}; rebuilding it",
                          EmulatorCacheWarning, stacklevel=3)
        _clean_stale(folder)
        _compile(srcs, flags, cxx, out, key)
        fd, why = _open_verified(out, key)
        if fd is None:
            raise EmulatorBuildError(f"{out} {why} right after it was built; "
                                     f"is another process writing into {folder}?")
    _prune(folder, keep=out)
    return out, True, fd


def build_library(sources: Iterable[Path | str] | None = None, sanitize: str | None = None,
                  extra_flags: Sequence[str] = (), *, cache: Path | str | None = None) -> tuple[Path, bool]:
    """Build (or find in the cache) the emulator library; returns ``(path, compiled_now)``.

    Does not load it, so a sanitized build can be prepared in a process that
    lacks the sanitizer runtime (see :func:`run_sanitized`). A cached library
    whose bytes no longer match its build record is rebuilt.
    """
    path, compiled, fd = _build(sources, sanitize, extra_flags, cache)
    os.close(fd)
    return path, compiled


_CACHE_KEEP = 32  # libraries kept per cache folder; every kernel edit makes a new one


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # mtime = last use, for _prune
    except OSError:
        pass


def _prune(folder: Path, keep: Path) -> None:
    """Drop all but the most recently used libraries, with their records and lock files
    (a loaded one stays mapped, so this is safe)."""
    def last_use(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # pruned by another process meanwhile
            return 0.0

    libs = sorted(folder.glob("emu-*.so"), key=last_use, reverse=True)
    for old in libs[_CACHE_KEEP:]:
        if old != keep:
            for p in (old, _record_path(old), folder / (old.name + ".lock")):
                p.unlink(missing_ok=True)


# dlopen'ed libraries, by (st_dev, st_ino), and the fd each was loaded through. The
# fd stays open: the loader records "/proc/self/fd/N" as the library's name, which
# sanitizer symbolizers and debuggers reopen; a library is never unloaded anyway.
_loaded_fds: dict[tuple[int, int], int] = {}
_loaded_lock = threading.Lock()


def _dlopen_verified(path: Path, fd: int) -> ctypes.CDLL:
    """dlopen the file behind ``fd`` (from :func:`_open_verified`), not whatever ``path`` names now."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    with _loaded_lock:
        kept = _loaded_fds.get(ident)
        if kept is not None:
            os.close(fd)  # this very file is loaded already: dlopen returns that handle
            fd = kept
        target = f"/proc/self/fd/{fd}"
        if not os.path.exists(target):  # no procfs: the path, checked a moment ago
            target = str(path)
        try:
            lib = ctypes.CDLL(target)
        except OSError as exc:
            if kept is None:
                os.close(fd)
            raise EmulatorBuildError(f"{path} matches its build record but could not be loaded: {exc}") from exc
        _loaded_fds[ident] = fd
    return lib


def _loaded_runtime(libname: str) -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any(libname.split(".so")[0] in line for line in maps)
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Argument packing.

_SCALAR_NAMES = {
    "b1": ("bool", "np.bool_"), "i1": ("signed char", "np.int8"), "u1": ("unsigned char", "np.uint8"),
    "i2": ("short", "np.int16"), "u2": ("unsigned short", "np.uint16"), "i4": ("int", "np.int32"),
    "u4": ("unsigned int", "np.uint32"), "i8": ("long long", "np.int64"), "u8": ("unsigned long long", "np.uint64"),
    "f4": ("float", "np.float32"), "f8": ("double", "np.float64"),
}


def _describe(token: str) -> str:
    if token == "*":
        return "a pointer (any array)"
    if token.startswith("*"):
        elem = token[1:]
        return f"a pointer to {int(elem[1:])}-byte elements ({_SCALAR_NAMES.get(elem, ('struct',))[0]})"
    if token.startswith("V"):
        return f"a {token[1:]}-byte struct"
    return f"{_SCALAR_NAMES[token][0]} ({_SCALAR_NAMES[token][1]})"


def _dims(what: str, value) -> tuple[int, int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        dims = (int(value),)
    elif isinstance(value, (tuple, list)) and 1 <= len(value) <= 3 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        dims = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if any(not 0 <= d < 2**32 for d in dims):
        raise ValueError(f"{what} dimensions must be in [0, 2**32), got {value!r}")
    return dims + (1,) * (3 - len(dims))  # type: ignore[return-value]


def _type_name(obj) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _pointer_value(arr: np.ndarray) -> np.ndarray:
    return np.array(arr.__array_interface__["data"][0], dtype=np.uintp)


class EmulatedKernel:
    """One entry point; call it like ``cupy.RawKernel``: ``kernel(grid, block, args)``.

    ``args`` is a tuple: NumPy arrays for pointer parameters (the address of
    their first element is passed, whatever their strides), ``None`` or a
    ``np.uint64`` address for a raw pointer, and NumPy scalars whose type is
    exactly the parameter's C type (``np.int32`` for ``int``, ``np.float64``
    for ``double``...). Plain Python numbers are refused: CuPy would guess a
    type for them, and a guess that differs from the kernel's is a silent bug
    on the GPU. Arity, scalar types and pointer element sizes are checked
    against the kernel's signature here (CuPy cannot), with errors naming the
    argument.
    """

    def __init__(self, module: "EmulatedModule", name: str, signature: tuple[str, ...]):
        self.module = module
        self.name = name
        self.signature = signature
        self._cname = name.encode()

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name}({', '.join(self.signature)})>"

    def _pack(self, i: int, arg, token: str) -> np.ndarray:
        where = f"{self.name}: argument {i}"
        if isinstance(arg, (bool, int, float, complex)) and not isinstance(arg, np.generic):
            hint = "" if token.startswith("*") else f", e.g. {_SCALAR_NAMES.get(token, ('', 'np.void'))[1]}({arg!r})"
            raise TypeError(f"{where} is a plain Python {type(arg).__name__} ({arg!r}); the kernel expects "
                            f"{_describe(token)}: pass a NumPy scalar of that exact type{hint}")
        if token.startswith("*"):
            if arg is None:
                return np.array(0, dtype=np.uintp)
            if isinstance(arg, np.ndarray):
                if arg.dtype.hasobject:
                    raise TypeError(f"{where}: object arrays have no device layout")
                want = token[1:]
                if want and arg.dtype.itemsize != int(want[1:]):
                    raise TypeError(f"{where}: the kernel expects {_describe(token)}, got a {arg.dtype} array "
                                    f"({arg.dtype.itemsize}-byte elements)")
                return _pointer_value(arg)
            if isinstance(arg, (np.uint64, np.int64)):  # a raw device address, as CuPy allows
                return np.array(arg, dtype=np.uint64)
            raise TypeError(f"{where}: the kernel expects {_describe(token)}, got {_type_name(arg)} "
                            f"(the emulated backend takes NumPy arrays)")
        if isinstance(arg, np.ndarray):
            raise TypeError(f"{where}: the kernel expects {_describe(token)} by value, got an array; "
                            f"pass a NumPy scalar (e.g. arr[()] or np.int32(v))")
        if not isinstance(arg, np.generic):
            raise TypeError(f"{where}: the kernel expects {_describe(token)}, got {_type_name(arg)}")
        dt = arg.dtype
        got = f"V{dt.itemsize}" if dt.kind == "V" else f"{dt.kind}{dt.itemsize}"
        if got != token:
            raise TypeError(f"{where}: the kernel expects {_describe(token)}, got np.{type(arg).__name__} "
                            f"({dt.itemsize}-byte, kind {dt.kind!r})")
        return np.array(arg)  # 0-d copy: a stable address holding exactly the value's bytes

    def __call__(self, grid, block, args, *, shared_mem: int = 0) -> None:
        g = _dims("grid", grid)
        b = _dims("block", block)
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments "
                            f"({', '.join(self.signature)}), got {len(args)}")
        if not isinstance(shared_mem, numbers.Integral) or shared_mem < 0:
            raise ValueError(f"{self.name}: shared_mem must be a non-negative int, got {shared_mem!r}")
        values = [self._pack(i, a, t) for i, (a, t) in enumerate(zip(args, self.signature))]
        pointers = (ctypes.c_void_p * max(1, len(values)))(*[v.ctypes.data for v in values])
        # ctypes releases the GIL for the call; the library serialises launches.
        rc = self.module._lib.gpuloss_emu_launch_ex(self._cname, *g, *b, int(shared_mem), pointers)
        # `args` and `values` stay referenced until here: the kernel has finished with them.
        if rc != 0:
            raise EmulatorLaunchError(self.module._lib.gpuloss_emu_last_error().decode(errors="replace"))


class EmulatedModule:
    """``kernels/*.cu`` built for the host; the emulated counterpart of ``cupy.RawModule``.

    Parameters
    ----------
    sources : list of paths, optional
        Translation units to build (default: every ``kernels/*.cu``). ``kernels/``
        is the only include path, as under NVRTC.
    sanitize : {"thread", "address", "undefined", "address,undefined"}, optional
        Build with that ``-fsanitize=``. TSan/ASan builds load only in a process
        started with the runtime preloaded: use :func:`run_sanitized`.
    extra_flags : sequence of str
        More compiler flags (they enter the cache key), e.g. ``("-O0", "-g")``.
    cache : path, optional
        Cache folder instead of :func:`cache_dir`.

    Attributes: ``path`` (the library), ``compiled`` (whether this construction
    ran the compiler, False on a cache hit), ``sources``, ``sanitize``.
    """

    def __init__(self, sources: Sequence[Path | str] | None = None, sanitize: str | None = None,
                 extra_flags: Sequence[str] = (), *, cache: Path | str | None = None):
        self.sanitize = _check_sanitize(sanitize)
        self.sources = [Path(s).resolve() for s in (_paths.kernel_sources() if sources is None else sources)]
        self.path, self.compiled, fd = _build(self.sources, self.sanitize, extra_flags, cache)
        runtime = SANITIZERS[self.sanitize][1] if self.sanitize else None
        if runtime and not _loaded_runtime(runtime):
            os.close(fd)
            raise RuntimeError(
                f"EmulatedModule(sanitize={self.sanitize!r}) must run in a process started with "
                f"LD_PRELOAD={_runtime_library(runtime)} (the sanitizer cannot start from a dlopen'ed "
                f"library); use gpuloss.backends.emulated.run_sanitized(code, {self.sanitize!r})")
        # Only a library whose bytes matched its build record is ever loaded.
        lib = _dlopen_verified(self.path, fd)
        lib.gpuloss_emu_launch_ex.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p)]
        lib.gpuloss_emu_launch_ex.restype = ctypes.c_int
        for fn in ("gpuloss_emu_last_error", "gpuloss_emu_registry_error"):
            getattr(lib, fn).restype = ctypes.c_char_p
        for fn in ("gpuloss_emu_kernel_name", "gpuloss_emu_kernel_signature"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_int]
        if lib.gpuloss_emu_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{self.path}: emulator ABI {lib.gpuloss_emu_abi_version()}, expected {_ABI_VERSION}")
        dup = lib.gpuloss_emu_registry_error().decode()
        if dup:
            raise EmulatorBuildError(dup.strip())
        self._lib = lib
        self._signatures: dict[str, tuple[str, ...]] = {}
        for i in range(lib.gpuloss_emu_kernel_count()):
            sig = lib.gpuloss_emu_kernel_signature(i).decode()
            self._signatures[lib.gpuloss_emu_kernel_name(i).decode()] = tuple(sig.split(",")) if sig else ()
        self._kernels: dict[str, EmulatedKernel] = {}

    def __repr__(self) -> str:
        return f"<EmulatedModule {len(self._signatures)} kernels, {self.path.name}>"

    def names(self) -> list[str]:
        """Every registered entry point, sorted."""
        return sorted(self._signatures)

    def signature(self, name: str) -> tuple[str, ...]:
        """Parameter tokens of ``name``: ``"i4"``, ``"f8"``, ``"*f4"`` (pointer to 4-byte elements), ``"*"``..."""
        return self.get_function(name).signature

    def get_function(self, name: str) -> EmulatedKernel:
        """The entry point ``name`` (as ``cupy.RawModule.get_function``)."""
        k = self._kernels.get(name)
        if k is None:
            if name not in self._signatures:
                close = difflib.get_close_matches(name, self._signatures, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KernelNotFoundError(
                    f"no kernel named {name!r} in the emulated module ({len(self._signatures)} registered; "
                    f"is it followed by GPULOSS_REGISTER({name})?){hint}")
            k = self._kernels[name] = EmulatedKernel(self, name, self._signatures[name])
        return k


_default_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _default_module(sanitize: str | None) -> EmulatedModule:
    return EmulatedModule(sanitize=sanitize)


def default_module() -> EmulatedModule:
    """Every ``kernels/*.cu``, built once per process (``GPULOSS_EMU_SANITIZE`` picks a sanitized build)."""
    with _default_lock:
        return _default_module(os.environ.get("GPULOSS_EMU_SANITIZE") or None)


# ---------------------------------------------------------------------------
# Sanitized runs.

@dataclass
class SanitizedRun:
    """Outcome of :func:`run_sanitized`: the child's exit status, output and sanitizer reports."""
    returncode: int
    stdout: str
    stderr: str
    reports: list[str] = field(default_factory=list)  # one headline per report, e.g. "data race"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.reports

    def __str__(self) -> str:
        return (f"exit {self.returncode}, {len(self.reports)} sanitizer report(s): {self.reports}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


_REPORT_PATTERNS = (
    re.compile(r"WARNING: ThreadSanitizer: ([^(\n]+?)\s*\(pid="),
    re.compile(r"ERROR: AddressSanitizer: (\S+)"),
    re.compile(r"runtime error: ([^\n]+)"),
)


def sanitizer_env(sanitize: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that loads a ``sanitize`` build of the emulator."""
    sanitize = _check_sanitize(sanitize)
    env = dict(os.environ if base is None else base)
    runtime = SANITIZERS[sanitize][1]
    if runtime:
        env["LD_PRELOAD"] = _runtime_library(runtime)
    # Python itself "leaks" at exit and is not instrumented: leak checking is noise.
    # exitcode 66 marks "a report was printed" apart from a crash.
    env["TSAN_OPTIONS"] = " ".join(filter(None, ["exitcode=66 halt_on_error=0 report_signal_unsafe=0",
                                                 env.get("TSAN_OPTIONS")]))
    env["ASAN_OPTIONS"] = " ".join(filter(None, ["detect_leaks=0 exitcode=66", env.get("ASAN_OPTIONS")]))
    env["UBSAN_OPTIONS"] = " ".join(filter(None, ["print_stacktrace=1", env.get("UBSAN_OPTIONS")]))
    env["GPULOSS_EMU_SANITIZE"] = sanitize
    root = str(Path(_paths.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_sanitized(python_code: str, sanitize: str = "thread", *, sources: Sequence[Path | str] | None = None,
                  extra_flags: Sequence[str] = (), cache: Path | str | None = None,
                  timeout: float = 600.0) -> SanitizedRun:
    """Run ``python_code`` in a fresh interpreter whose emulated kernels carry ``-fsanitize=sanitize``.

    The library is built here first (so the child only loads it), then the
    child starts with the runtime preloaded and ``GPULOSS_EMU_SANITIZE`` set,
    so both ``default_module()`` and ``EmulatedModule(sources, sanitize=...)``
    in ``python_code`` load the instrumented build. Why a subprocess: TSan and
    ASan must be the first library of a process (they intercept malloc and
    pthread before anything else runs); an interpreter that is already running
    cannot acquire them.

    >>> r = run_sanitized("import gpuloss as gl, numpy as np; "
    ...                   "gl.softmax_cross_entropy(np.ones((4, 3), np.float32), np.zeros(4, np.int64), "
    ...                   "backend='emulated')", "address")  # doctest: +SKIP
    >>> assert r.ok, str(r)                                 # doctest: +SKIP
    """
    build_library(sources, sanitize, extra_flags, cache=cache)
    env = sanitizer_env(sanitize)
    if cache is not None:
        env["GPULOSS_CACHE_DIR"] = str(Path(cache).expanduser())
    cmd = [sys.executable, "-c", python_code]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if sanitize == "thread" and "unexpected memory mapping" in proc.stderr:
        # TSan's fixed shadow layout clashes with some kernels' ASLR ranges:
        # rerun with randomisation off for this one process.
        proc = subprocess.run(["setarch", os.uname().machine, "-R", *cmd], capture_output=True, text=True,
                              env=env, timeout=timeout)
    reports = [m.group(1).strip() for pat in _REPORT_PATTERNS for m in pat.finditer(proc.stderr)]
    return SanitizedRun(proc.returncode, proc.stdout, proc.stderr, reports)
