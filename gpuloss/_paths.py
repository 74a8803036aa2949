"""Where the device code lives, in a source checkout and in an installed wheel,
and the one source text every compiler of it is handed (:func:`device_source`)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

_HERE = Path(__file__).resolve().parent


def _has_kernels(folder: Path) -> bool:
    return (folder / "common.cuh").is_file() or any(folder.glob("*.cu"))


def kernels_dir() -> Path:
    """The folder holding ``*.cu`` / ``*.cuh``: ``$GPULOSS_KERNELS_DIR`` when set, else
    the repository's ``kernels/`` (or ``gpuloss/kernels`` in a wheel)."""
    env = os.environ.get("GPULOSS_KERNELS_DIR")
    if env:
        folder = Path(env).expanduser().resolve()
        if not folder.is_dir() or not _has_kernels(folder):
            raise FileNotFoundError(f"gpuloss: GPULOSS_KERNELS_DIR={env!r} is not a folder with *.cu or common.cuh")
        return folder
    for candidate in (_HERE.parent / "kernels", _HERE / "kernels"):
        if _has_kernels(candidate):
            return candidate
    raise FileNotFoundError(f"gpuloss: no kernels/ folder next to {_HERE}; is the package installed whole?")


def kernel_sources() -> list[Path]:
    """Every compilable translation unit of device code, in a fixed order."""
    return sorted(kernels_dir().glob("*.cu"))


# ---------------------------------------------------------------------------
# The source text handed to NVRTC (CuPy, gpuloss.nvrtc) and to g++ (the emulator).

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*(?:"([^"\n]+)"|<([^>\n]+)>)', re.MULTILINE)


def included_files(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every file ``path`` includes, directly or through other headers, that exists on
    disk: ``"name"`` is looked up in the including file's folder, then in
    ``include_dirs``; ``<name>`` in ``include_dirs`` only, as NVRTC does. Includes
    found nowhere (``<cstdint>``, NVRTC's built-ins) are skipped. In discovery order.

    A textual scan, so an include inside ``#if 0`` or a comment is counted too:
    that can only make a key change more often than needed, never less.
    """
    dirs = [Path(d) for d in include_dirs]
    root = Path(path).resolve()
    seen: dict[Path, None] = {}
    todo = [root]
    while todo:
        current = todo.pop()
        try:
            text = current.read_text(errors="replace")
        except OSError:
            continue
        for quoted, angled in _INCLUDE.findall(text):
            search = ([current.parent] if quoted else []) + dirs
            name = quoted or angled
            for folder in search:
                candidate = (folder / name).resolve()
                if candidate.is_file():
                    if candidate != root and candidate not in seen:
                        seen[candidate] = None
                        todo.append(candidate)
                    break
    return list(seen)


def headers_digest(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = ()) -> str:
    """SHA-256 over the names and bytes of every header ``path`` includes (see :func:`included_files`)."""
    h = hashlib.sha256(b"gpuloss headers v1\0")
    root = Path(path).resolve().parent
    for header in sorted(included_files(path, include_dirs)):
        data = header.read_bytes()
        try:
            name = str(header.relative_to(root))
        except ValueError:
            name = str(header)
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def device_source(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] | None = None) -> str:
    """The text of ``path`` as every compiler gets it: the file itself plus a last
    comment line carrying :func:`headers_digest`.

    Why: CuPy caches compiled modules by source text and options only, so an edit
    to a ``.cuh`` alone would load a stale kernel; with the digest in the text, any
    header change is a new source. Appended, not prepended, so line numbers in
    diagnostics stay those of the file. ``include_dirs`` defaults to
    ``(kernels_dir(),)``, the include path every compiler is given.
    """
    path = Path(path)
    dirs = (kernels_dir(),) if include_dirs is None else tuple(include_dirs)
    text = path.read_text()
    sep = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{sep}// gpuloss: included headers sha256 {headers_digest(path, dirs)}\n"
