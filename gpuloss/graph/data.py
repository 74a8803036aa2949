"""Data for ``gpuloss train``: scikit-learn's digits (shipped with it, no download) and ``.npz`` files.

Batches are a pure function of ``(seed, iteration)``: a fresh permutation per
epoch, drawn from a generator seeded by ``(seed, epoch)``. A run restored from
a snapshot at iteration k therefore sees exactly the batches an uninterrupted
run sees from k on.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

__all__ = ["load_digits_split", "load_npz", "BatchFeeder"]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[dict, dict]:
    """Digits (1797 8x8 images, 10 classes) as ``{"data": (n, 64) float32 in [0, 1], "label": (n,) int64}``.

    The split is stratified and fixed by ``seed``: 1437 train / 360 test by default.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)   # pixel counts 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return {"data": x_tr, "label": y_tr}, {"data": x_te, "label": y_te}


def load_npz(path: str | os.PathLike) -> dict:
    """Every array of an ``.npz`` file by key (keys are the net's input blob names).

    Anything else (a missing file, a ``.npy``, text, a damaged archive, object
    arrays, which would need pickle) is a :class:`GraphError` naming the file.
    """
    from .layer import GraphError
    path = os.fspath(path)
    try:
        if not zipfile.is_zipfile(path):
            raise GraphError(f"{path}: not an .npz archive (numpy.savez writes one)")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except GraphError:
        raise
    except OSError as exc:
        raise GraphError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:   # zipfile, zlib or numpy's format reader on a damaged or pickled archive
        raise GraphError(f"{path}: cannot be read as an .npz archive ({type(exc).__name__}: {exc})") from None


class BatchFeeder:
    """Mini-batches of equal-length arrays, as a function of the iteration number."""

    def __init__(self, arrays: dict, batch_size: int, seed: int = 0):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must share their first dimension, got {lengths}")
        self.n = next(iter(lengths.values()))
        if self.n == 0:
            raise ValueError("no samples to train on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.arrays, self.batch_size, self.seed = arrays, int(batch_size), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def batch(self, iteration: int) -> dict:
        pos = iteration * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(pos, self.n)
        idx = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._perm(int(e))[offsets[sel]]
        return {k: v[idx] for k, v in self.arrays.items()}
