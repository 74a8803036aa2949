"""``Blob``: a named array and its gradient, living on the backend's device (docs/graph.md §1.2)."""
from __future__ import annotations

__all__ = ["Blob"]


class Blob:
    """Caffe's blob: ``data`` (the values) and ``diff`` (d total loss / d data).

    Both are arrays of the net's array module ``xp`` (NumPy or CuPy), allocated
    lazily: ``data`` is ``None`` until something writes it; ``diff`` reads as
    zeros shaped like ``data`` until a backward pass writes it (a blob that no
    loss depends on has a zero gradient, and costs nothing until asked).

    Parameters carry the solver's multipliers from Caffe's ``ParamSpec``:
    ``lr_mult`` and ``decay_mult`` (both 1 unless the layer's ``param`` says so).
    """

    __slots__ = ("name", "xp", "_data", "_diff", "_diff_written", "need_backward", "lr_mult", "decay_mult")

    def __init__(self, name: str, xp, data=None, *, lr_mult: float = 1.0, decay_mult: float = 1.0):
        self.name = name
        self.xp = xp
        self._data = data
        self._diff = None
        self._diff_written = False
        self.need_backward = False
        self.lr_mult = float(lr_mult)
        self.decay_mult = float(decay_mult)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        self._data = value

    @property
    def diff(self):
        if self._diff is None and self._data is not None:
            self._diff = self.xp.zeros_like(self._data)
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self._diff = value
        self._diff_written = value is not None

    @property
    def has_diff(self) -> bool:
        """Whether a gradient was written here since the last clear (False: the gradient is zero)."""
        return self._diff_written

    @property
    def shape(self) -> tuple:
        return tuple(self._data.shape) if self._data is not None else ()

    def clear_diff(self) -> None:
        self._diff = None
        self._diff_written = False

    def __repr__(self) -> str:
        shape = "unset" if self._data is None else "x".join(map(str, self._data.shape)) or "scalar"
        return f"Blob({self.name!r}, {shape})"
