"""Where the device code lives, in a source checkout and in an installed wheel."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def kernels_dir() -> Path:
    """The folder holding ``*.cu`` / ``*.cuh`` (repository ``kernels/``, or ``gpuloss/kernels`` in a wheel)."""
    for candidate in (_HERE.parent / "kernels", _HERE / "kernels"):
        if (candidate / "common.cuh").is_file() or any(candidate.glob("*.cu")):
            return candidate
    raise FileNotFoundError(f"gpuloss: no kernels/ folder next to {_HERE}; is the package installed whole?")


def kernel_sources() -> list[Path]:
    """Every compilable translation unit of device code, in a fixed order."""
    return sorted(kernels_dir().glob("*.cu"))
